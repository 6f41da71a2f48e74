"""Llama in plain JAX, `jnp.dot`/`jnp.matmul` style with explicit reshapes and transposes.

Serial pre-norm blocks; grouped-query attention (the H query heads grouped onto the K kv
heads with reshapes; K == H is multi-head, K == 1 multiquery); RMSNorm; SwiGLU feed-forward
(w1 gate, w3 up, w2 down); rotary position embeddings on interleaved pairs (as Meta's reference code) with
base `config.rope_theta` and `config.rope_scaling`; no biases, except on Q/K/V (bq, bk, bv)
when `config.qkv_bias` (Qwen2); a separate, untied output matrix. Parameter names follow
Meta's checkpoints. The KV cache is laid out as `models.cache` says.

    >>> import jax, jax.numpy as jnp
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("llama-tiny"))
    >>> params = model.init_params(jax.random.PRNGKey(0))
    >>> logits, cache = model.prefill(params, jnp.zeros((2, 8), jnp.int32), model.init_cache(2))
    >>> logits.shape, cache["k"][0].shape  # two kv heads for eight query heads: (B, K, S, D)
    ((2, 8, 256), (2, 2, 128, 8))
"""

from __future__ import annotations

import math
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
    normals,
    rope_inv_freq,
    run_layers,
)
from meshwright.models.config import TransformerConfig


def validate(config: TransformerConfig) -> None:
    """Raise a ValueError unless `config` describes a Llama-style architecture."""
    check_family(config, "llama", parallel_block=False, norm="rmsnorm", activation="swiglu",
                 positions="rope", bias=False, tie_embeddings=False)


def init_params(config: TransformerConfig, key: jax.Array) -> dict:
    """Token embedding, stacked blocks (unstacked unless scan_layers), final norm, output."""
    N, E, F, V = config.n_layers, config.d_model, config.d_ff, config.vocab_size
    HD, KD = config.n_heads * config.d_head, config.n_kv_heads * config.d_head
    dtype = jnp.dtype(config.dtype)
    w = normals(key, {"tok_embeddings": (V, E), "output": (E, V), "wq": (N, E, HD),
                      "wk": (N, E, KD), "wv": (N, E, KD), "wo": (N, HD, E), "w1": (N, E, F),
                      "w3": (N, E, F), "w2": (N, F, E)}, dtype)
    layers = {
        "attention_norm": jnp.ones((N, E), dtype),
        "wq": w["wq"], "wk": w["wk"], "wv": w["wv"], "wo": w["wo"],
        **({"bq": jnp.zeros((N, HD), dtype), "bk": jnp.zeros((N, KD), dtype),
            "bv": jnp.zeros((N, KD), dtype)} if config.qkv_bias else {}),
        "ffn_norm": jnp.ones((N, E), dtype),
        "w1": w["w1"], "w3": w["w3"], "w2": w["w2"],
    }
    return {"tok_embeddings": w["tok_embeddings"],
            "layers": layers_for(config, layers),
            "norm": jnp.ones((E,), dtype),
            "output": w["output"]}


def _rms_norm(scale: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # (B, T, 1)
    return (x32 * inv_rms).astype(x.dtype) * scale


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """RoPE on interleaved pairs (x[2i], x[2i+1]). x (B, T, N, D), positions (B, T) or (1, T),
    inv_freq (D/2,)."""
    B, T, N, D = x.shape
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # (B, T, D/2)
    cos = jnp.cos(angles)[:, :, None, :]  # (B, T, 1, D/2)
    sin = jnp.sin(angles)[:, :, None, :]  # (B, T, 1, D/2)
    pairs = x.astype(jnp.float32).reshape(B, T, N, D // 2, 2)  # (B, T, N, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # 2 x (B, T, N, D/2)
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(B, T, N, D).astype(x.dtype)  # (B, T, N, D)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """q (B, T, H, D); k, v (B, K, S, D) as the cache stores them; visible bool broadcastable
    to (B, K, G, T, S). Grouped-query attention by grouping: the G = H/K query heads of kv
    head j are rows of one matmul against that head's K and V, which are read once."""
    B, T, H, D = q.shape
    K = k.shape[1]
    q = jnp.transpose(q.reshape(B, T, K, H // K, D), (0, 2, 3, 1, 4))  # (B, K, G, T, D)
    k = jnp.expand_dims(k, 2)  # (B, K, 1, S, D): one kv head for its group of query heads
    v = jnp.expand_dims(v, 2)  # (B, K, 1, S, D)
    # the cache as the left operand: XLA then reads it as stored, for any number of query rows
    scores = jnp.matmul(k, jnp.swapaxes(q, -1, -2))  # (B, K, G, S, T)
    scores = jnp.swapaxes(scores, -1, -2) / math.sqrt(D)  # (B, K, G, T, S)
    scores = jnp.where(visible, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # (B, K, G, T, S)
    out = jnp.matmul(probs, v)  # (B, K, G, T, D)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H * D)  # (B, T, H*D)


def _block(config: TransformerConfig, p: dict, x: jax.Array, positions: jax.Array, attend):
    """h = x + attn(norm(x)); h + ffn(norm(h)). `attend(q, k, v) -> (out, layer_cache)`."""
    B, T, _ = x.shape
    H, K, D = config.n_heads, config.n_kv_heads, config.d_head
    h = _rms_norm(p["attention_norm"], x, config.norm_eps)  # (B, T, E)
    q, k, v = jnp.dot(h, p["wq"]), jnp.dot(h, p["wk"]), jnp.dot(h, p["wv"])  # (B, T, HD|KD)
    if config.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(B, T, H, D)  # (B, T, H, D)
    k = k.reshape(B, T, K, D)  # (B, T, K, D)
    v = v.reshape(B, T, K, D)  # (B, T, K, D)
    inv_freq = rope_inv_freq(config, D)  # (D/2,)
    q = _rope(q, positions, inv_freq)  # (B, T, H, D)
    k = _rope(k, positions, inv_freq)  # (B, T, K, D)
    out, layer_cache = attend(q, k, v)  # (B, T, H*D)
    x = x + jnp.dot(out, p["wo"])  # (B, T, E)
    h = _rms_norm(p["ffn_norm"], x, config.norm_eps)  # (B, T, E)
    hidden = jax.nn.silu(jnp.dot(h, p["w1"])) * jnp.dot(h, p["w3"])  # (B, T, F)
    x = x + jnp.dot(hidden, p["w2"])  # (B, T, E)
    return x, layer_cache


def _unembed(config: TransformerConfig, params: dict, x: jax.Array) -> jax.Array:
    x = _rms_norm(params["norm"], x, config.norm_eps)  # (..., E)
    return jnp.dot(x, params["output"])  # (..., V)


def _prompt_forward(config: TransformerConfig, params: dict, tokens: jax.Array,
                    cache: dict | None, last: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Causal forward over a whole prompt; writes K/V to positions 0..T-1 when given a cache.
    Logits (B, T, V), or (B, V) at position last[b] of each row when `last` is given."""
    check_prompt(config, tokens)
    T = tokens.shape[1]
    x = params["tok_embeddings"][tokens]  # (B, T, E)
    positions = jnp.arange(T).reshape(1, T)  # (1, T)
    visible = jnp.tril(jnp.ones((T, T), dtype=bool))  # (T, S=T): causal

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            k = jnp.transpose(k, (0, 2, 1, 3))  # (B, K, T, D): the cache's order
            v = jnp.transpose(v, (0, 2, 1, 3))  # (B, K, T, D)
            written = layer_cache
            if layer_cache is not None:  # K/V of the prompt go to positions 0..T-1
                written = {"k": write_prompt(layer_cache["k"], k),
                           "v": write_prompt(layer_cache["v"], v)}
            return _attend(q, k, v, visible), written

        return _block(config, p, x, positions, attend)

    x, cache = run_layers(params["layers"], x, cache, layer, scan=config.scan_layers)
    if last is not None:
        x = at_positions(x, last)  # (B, E)
    return _unembed(config, params, x), cache


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
    B, S = tokens.shape[0], cache_length(cache)
    x = params["tok_embeddings"][tokens].reshape(B, 1, -1)  # (B, 1, E)
    key_index = jnp.arange(S).reshape(1, S)  # (1, S)
    visible = (key_index <= positions.reshape(B, 1)).reshape(B, 1, 1, 1, S)  # (B, 1, 1, 1, S)

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            ck = write_token(layer_cache["k"], k.reshape(B, -1, k.shape[-1]), positions)
            cv = write_token(layer_cache["v"], v.reshape(B, -1, v.shape[-1]), positions)
            return _attend(q, ck, cv, visible), {"k": ck, "v": cv}  # ck, cv (B, K, S, D)

        return _block(config, p, x, positions.reshape(B, 1), attend)

    x, cache = run_layers(params["layers"], x, cache, layer, scan=config.scan_layers)
    return _unembed(config, params, x.reshape(B, -1)), cache  # (B, V)
