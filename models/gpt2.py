"""GPT-2 in plain JAX, matmul style (`x @ w`), with parameter names as in Hugging Face's GPT-2.

Serial pre-norm blocks; attention with ONE fused QKV weight `c_attn` (E, (H+2K)·D), laid out
[Q | K | V], that is split and reshaped into heads; LayerNorm (with bias when `config.bias`);
GELU (tanh approximation); learned position embeddings; biases on projections (when
`config.bias`); the unembedding is the transposed token embedding. GPT-2 itself is multi-head
(K == H, c_attn (E, 3·H·D)); K == 1 is GPT-BigCode's (SantaCoder, StarCoder) multiquery
attention, where the H query heads are grouped onto the single K/V head in the matmuls.
The KV cache is laid out as `models.cache` says: per layer (batch, kv heads, positions, d_head),
written in place one position per row in decode.

    >>> import jax, jax.numpy as jnp
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("gpt2-tiny"))
    >>> params = model.init_params(jax.random.PRNGKey(0))
    >>> tokens = jnp.zeros((2, 8), jnp.int32)
    >>> logits, cache = model.prefill(params, tokens, model.init_cache(2))
    >>> logits.shape, len(cache["k"]), cache["k"][0].shape  # (batch, kv heads, positions, d_head)
    ((2, 8, 256), 2, (2, 4, 128, 16))
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
    logits_from_table,
    normals,
    run_layers,
)
from meshwright.models.config import TransformerConfig


def validate(config: TransformerConfig) -> None:
    """Raise a ValueError unless `config` describes a GPT-2-style architecture."""
    check_family(config, "gpt2", parallel_block=False, norm="layernorm", activation="gelu",
                 positions="learned", tie_embeddings=True, qkv_bias=False)
    if config.n_kv_heads not in (config.n_heads, 1):
        raise ValueError(
            f"config {config.name!r}: the gpt2 reference model is multi-head (GPT-2) or "
            f"multiquery (GPT-BigCode) attention, so n_kv_heads ({config.n_kv_heads}) must equal "
            f"n_heads ({config.n_heads}) or 1; use family 'llama' for grouped-query attention")


def init_params(config: TransformerConfig, key: jax.Array) -> dict:
    """Token/position embeddings, stacked blocks (unstacked unless scan_layers), final LayerNorm."""
    N, E, F, V = config.n_layers, config.d_model, config.d_ff, config.vocab_size
    HD = config.n_heads * config.d_head
    QKV = (config.n_heads + 2 * config.n_kv_heads) * config.d_head  # 3·HD unless multiquery
    dtype = jnp.dtype(config.dtype)
    w = normals(key, {"wte": (V, E), "wpe": (config.max_len, E), "c_attn": (N, E, QKV),
                      "attn_proj": (N, HD, E), "c_fc": (N, E, F), "mlp_proj": (N, F, E)}, dtype)

    def linear(weight):  # (N, fan_in, fan_out)
        p = {"w": weight}
        if config.bias:
            p["b"] = jnp.zeros((N, weight.shape[-1]), dtype)
        return p

    def layer_norm(*lead):
        p = {"scale": jnp.ones((*lead, E), dtype)}
        if config.bias:
            p["bias"] = jnp.zeros((*lead, E), dtype)
        return p

    layers = {
        "ln_1": layer_norm(N),
        "attn": {"c_attn": linear(w["c_attn"]), "c_proj": linear(w["attn_proj"])},
        "ln_2": layer_norm(N),
        "mlp": {"c_fc": linear(w["c_fc"]), "c_proj": linear(w["mlp_proj"])},
    }
    return {
        "wte": w["wte"],
        "wpe": w["wpe"],
        "layers": layers_for(config, layers),
        "ln_f": layer_norm(),
    }


def _linear(p: dict, x: jax.Array) -> jax.Array:
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)  # (B, T, 1)
    var = ((x32 - mean) ** 2).mean(axis=-1, keepdims=True)  # (B, T, 1)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """q (B, T, H, D); k, v (B, K, S, D) as the cache stores them, K == H or 1 (multiquery:
    the H query heads share the one kv head as a group, K/V are never repeated); visible
    bool broadcastable to (B, K, G, T, S) with G = H // K."""
    B, T, H, D = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
    k, v = k[:, :, None], v[:, :, None]  # (B, K, 1, S, D): one kv head for its group
    # the cache as the left operand: XLA then reads it as stored, for any number of query rows
    att = (k @ q.swapaxes(-1, -2)).swapaxes(-1, -2) * (1.0 / math.sqrt(D))  # (B, K, G, T, S)
    att = jnp.where(visible, att.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(att, axis=-1).astype(q.dtype)  # (B, K, G, T, S)
    y = att @ v  # (B, K, G, T, D)
    return y.transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)  # (B, T, H*D)


def _block(config: TransformerConfig, p: dict, x: jax.Array, attend):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)). `attend(q, k, v) -> (y, layer_cache)`."""
    B, T, _ = x.shape
    H, K, D = config.n_heads, config.n_kv_heads, config.d_head
    qkv = _linear(p["attn"]["c_attn"], _layer_norm(p["ln_1"], x, config.norm_eps))  # (B,T,(H+2K)D)
    if K == H:
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x (B, T, H*D)
    else:
        q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=-1)  # (B,T,H*D), 2 x (B,T,K*D)
    q = q.reshape(B, T, H, D)  # (B, T, H, D)
    k = k.reshape(B, T, K, D)  # (B, T, K, D)
    v = v.reshape(B, T, K, D)  # (B, T, K, D)
    y, layer_cache = attend(q, k, v)  # (B, T, H*D)
    x = x + _linear(p["attn"]["c_proj"], y)  # (B, T, E)
    h = _linear(p["mlp"]["c_fc"], _layer_norm(p["ln_2"], x, config.norm_eps))  # (B, T, F)
    h = jax.nn.gelu(h, approximate=True)  # (B, T, F)
    x = x + _linear(p["mlp"]["c_proj"], h)  # (B, T, E)
    return x, layer_cache


def _unembed(config: TransformerConfig, params: dict, x: jax.Array) -> jax.Array:
    """x (N, E) -> logits (N, V) against the transposed token embedding."""
    return logits_from_table(_layer_norm(params["ln_f"], x, config.norm_eps), params["wte"])


def _prompt_forward(config: TransformerConfig, params: dict, tokens: jax.Array,
                    cache: dict | None, last: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Causal forward over a whole prompt; writes K/V to positions 0..T-1 when given a cache.
    Logits (B, T, V), or (B, V) at position last[b] of each row when `last` is given."""
    check_prompt(config, tokens)
    B, T = tokens.shape
    x = params["wte"][tokens] + params["wpe"][:T]  # (B, T, E)
    visible = jnp.tril(jnp.ones((T, T), bool))  # (T, S=T): causal

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # (B, K, T, D): the cache's order
            written = layer_cache
            if layer_cache is not None:  # K/V of the prompt go to positions 0..T-1
                written = {"k": write_prompt(layer_cache["k"], k),
                           "v": write_prompt(layer_cache["v"], v)}
            return _attend(q, k, v, visible), written

        return _block(config, p, x, attend)

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
    x = params["wte"][tokens] + params["wpe"][positions]  # (B, E)
    x = x[:, None, :]  # (B, 1, E)
    key_index = jnp.arange(S)[None, :]  # (1, S)
    visible = (key_index <= positions[:, None])[:, None, None, None, :]  # (B, 1, 1, 1, S)

    def layer(p, x, layer_cache):
        def attend(q, k, v):
            k_all = write_token(layer_cache["k"], k[:, 0], positions)  # (B, K, S, D)
            v_all = write_token(layer_cache["v"], v[:, 0], positions)  # (B, K, S, D)
            return _attend(q, k_all, v_all, visible), {"k": k_all, "v": v_all}

        return _block(config, p, x, attend)

    x, cache = run_layers(params["layers"], x, cache, layer, scan=config.scan_layers)
    return _unembed(config, params, x[:, 0, :]), cache  # (B, V)
