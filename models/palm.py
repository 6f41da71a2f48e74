"""PaLM in plain JAX, einsum style: every contraction is a `jnp.einsum`.

Parallel blocks `x + attn(ln(x)) + mlp(ln(x))` with ONE LayerNorm per block (bias only when
`config.bias`; projections never have biases); multiquery attention, generalised to K kv heads by
grouping the H query heads as (K, H/K); SwiGLU feed-forward (gate, up, down); rotary position
embeddings (rotate-half form); the unembedding is the shared input embedding.

    >>> import jax, jax.numpy as jnp
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("palm-tiny"))
    >>> params = model.init_params(jax.random.PRNGKey(0))
    >>> logits, cache = model.prefill(params, jnp.zeros((2, 8), jnp.int32), model.init_cache(2))
    >>> logits.shape, cache["k"][0].shape  # multiquery: one kv head; (B, K, positions, D)
    ((2, 8, 256), (2, 1, 128, 16))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from meshwright.models.cache import cache_length, write_prompt, write_token
from meshwright.models.common import (
    at_positions,
    check_decode,
    check_family,
    check_prompt,
    layers_for,
    logits_from_table,
    normals,
    rope_inv_freq,
    run_layers,
)
from meshwright.models.config import TransformerConfig


def validate(config: TransformerConfig) -> None:
    """Raise a ValueError unless `config` describes a PaLM-style architecture."""
    check_family(config, "palm", parallel_block=True, norm="layernorm", activation="swiglu",
                 positions="rope", tie_embeddings=True, qkv_bias=False)


def init_params(config: TransformerConfig, key: jax.Array) -> dict:
    """Embedding (V, E), stacked blocks (unstacked unless scan_layers), final LayerNorm."""
    N, E, F = config.n_layers, config.d_model, config.d_ff
    H, K, D = config.n_heads, config.n_kv_heads, config.d_head
    dtype = jnp.dtype(config.dtype)
    w = normals(key, {"embedding": (config.vocab_size, E), "q": (N, E, H, D), "k": (N, E, K, D),
                      "v": (N, E, K, D), "o": (N, H, D, E), "gate": (N, E, F), "up": (N, E, F),
                      "down": (N, F, E)}, dtype)

    def layer_norm(*lead):
        p = {"scale": jnp.ones((*lead, E), dtype)}
        if config.bias:
            p["bias"] = jnp.zeros((*lead, E), dtype)
        return p

    layers = {"norm": layer_norm(N)} | {
        name: w[name] for name in ("q", "k", "v", "o", "gate", "up", "down")}
    return {"embedding": w["embedding"],
            "layers": layers_for(config, layers),
            "final_norm": layer_norm()}


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)  # (B, T, 1)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # (B, T, 1)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x (B, T, N, D), positions (B, T) or (1, T), inv_freq (D/2,)."""
    angles = jnp.einsum("bt,f->btf", positions.astype(jnp.float32), inv_freq)  # (B, T, D/2)
    sin = jnp.sin(angles)[:, :, None, :]  # (B, T, 1, D/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # 2 x (B, T, N, D/2)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (B,T,N,D)
    return rotated.astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """q (B, T, H, D); k/v (B, K, S, D) as the cache stores them; visible bool broadcastable to
    (B, K, G, T, S). The H query heads are grouped as (K, G): G heads share one kv head."""
    B, T, H, D = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, H // K, D)  # (B, T, K, G, D): G query heads share one kv head
    # the cache as the left operand: XLA then reads it as stored, for any number of query rows
    scores = jnp.einsum("bksd,btkgd->bkgts", k, q) * (D ** -0.5)  # (B, K, G, T, S)
    scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # (B, K, G, T, S)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)  # (B, K, G, T, D)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, D)  # (B, T, H, D)


def _block(config: TransformerConfig, p: dict, x: jax.Array, positions: jax.Array, attend):
    """x + attn(ln(x)) + mlp(ln(x)). `attend(q, k, v) -> (out (B, T, H, D), layer_cache)`."""
    h = _layer_norm(p["norm"], x, config.norm_eps)  # (B, T, E)
    inv_freq = rope_inv_freq(config, config.d_head)  # (D/2,)
    q = _rope(jnp.einsum("bte,ehd->bthd", h, p["q"]), positions, inv_freq)  # (B, T, H, D)
    k = _rope(jnp.einsum("bte,ekd->btkd", h, p["k"]), positions, inv_freq)  # (B, T, K, D)
    v = jnp.einsum("bte,ekd->btkd", h, p["v"])  # (B, T, K, D)
    out, layer_cache = attend(q, k, v)  # (B, T, H, D)
    B, T, H, D = out.shape
    # contracted as one (H*D) dimension, so that XLA reads `o` as stored (E rows of H*D);
    # over (h, d) it may pick an order of the heads' output that copies `o` every step
    attn = jnp.einsum("btf,fe->bte", out.reshape(B, T, H * D), p["o"].reshape(H * D, -1))
    gate = jnp.einsum("bte,ef->btf", h, p["gate"])  # (B, T, F)
    up = jnp.einsum("bte,ef->btf", h, p["up"])  # (B, T, F)
    mlp = jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, p["down"])  # (B, T, E)
    return x + attn + mlp, layer_cache


def _unembed(config: TransformerConfig, params: dict, x: jax.Array) -> jax.Array:
    """x (N, E) -> logits (N, V) against the shared embedding table."""
    return logits_from_table(_layer_norm(params["final_norm"], x, config.norm_eps),
                             params["embedding"])


def _prompt_forward(config: TransformerConfig, params: dict, tokens: jax.Array,
                    cache: dict | None, last: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Causal forward over a whole prompt; writes K/V to positions 0..T-1 when given a cache.
    Logits (B, T, V), or (B, V) at position last[b] of each row when `last` is given."""
    check_prompt(config, tokens)
    B, T = tokens.shape
    x = jnp.take(params["embedding"], tokens, axis=0)  # (B, T, E)
    positions = jnp.arange(T)[None, :]  # (1, T)
    visible = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]  # (T, S=T): causal

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, K, T, D): cache order
            written = layer_cache
            if layer_cache is not None:  # K/V of the prompt go to positions 0..T-1
                written = {"k": write_prompt(layer_cache["k"], k),
                           "v": write_prompt(layer_cache["v"], v)}
            return _attend(q, k, v, visible), written

        return _block(config, p, x, positions, attend)

    x, cache = run_layers(params["layers"], x, cache, layer, scan=config.scan_layers)
    if last is not None:
        return _unembed(config, params, at_positions(x, last)), cache  # (B, V)
    return _unembed(config, params, x.reshape(B * T, -1)).reshape(B, T, -1), cache  # (B,T,V)


def logits(config: TransformerConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """Full-sequence causal logits (B, T, V) for tokens (B, T), without a cache."""
    return _prompt_forward(config, params, tokens, None)[0]


def prefill(config: TransformerConfig, params: dict, tokens: jax.Array, cache: dict,
            last: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits (B, T, V) for the prompt tokens (B, T) -- or (B, V) at position last[b] of each
    row -- and the cache with positions 0..T-1 written."""
    return _prompt_forward(config, params, tokens, cache, last)


def decode_step(config: TransformerConfig, params: dict, tokens: jax.Array, cache: dict,
                positions: jax.Array) -> tuple[jax.Array, dict]:
    """One token per row; row b writes K/V at positions[b] and attends to keys 0..positions[b]
    (the cache holds S = cache_length(cache) positions, positions[b] < S)."""
    check_decode(tokens, positions)
    S = cache_length(cache)
    x = jnp.take(params["embedding"], tokens[:, None], axis=0)  # (B, 1, E)
    key_index = jax.lax.broadcasted_iota(jnp.int32, (1, S), 1)  # (1, S)
    visible = (key_index <= positions[:, None])[:, None, None, None, :]  # (B, 1, 1, 1, S)

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            written = {name: write_token(layer_cache[name], new[:, 0], positions)  # (B,K,S,D)
                       for name, new in (("k", k), ("v", v))}
            return _attend(q, written["k"], written["v"], visible), written

        return _block(config, p, x, positions[:, None], attend)

    x, cache = run_layers(params["layers"], x, cache, layer, scan=config.scan_layers)
    return _unembed(config, params, x[:, 0, :]), cache  # (B, V)
