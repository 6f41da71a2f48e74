"""Served models written as a stranger would: their own prefill, decode step and KV cache.

Each builder returns `(prefill, decode_step, init_cache, params, vocab_size)` following the
engine's contract (models/functions.py) and nothing else of the reference models' style:

- `einsum_gqa`: einsum everywhere, grouped-query attention with RoPE, params a tuple of
  per-layer tuples, the cache a list of per-layer (k, v) tuples laid out (kv_heads, batch,
  length, d_head): heads before the batch. Decode writes with advanced indexing.
- `flax_mha`: a Flax linen module with learned positions whose cache is a dict of dicts,
  {"layer_0": {"key", "value"}} laid out (batch, length, heads, d_head) as Flax keeps its own
  decoding cache; decode writes with a one-hot blend.
- `broken`: functions that break the contract in the ways the engine refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

V = 61  # a vocabulary no reference preset has


def _normal(key, shape, scale=0.08):
    return scale * jax.random.normal(key, shape, jnp.float32)


# ---- einsum GQA, cache [(k, v)] per layer as (K, B, S, D) -------------------------------------

E, H, K, D, F, L = 32, 16, 8, 4, 64, 2


def _rope(x, positions):
    """x (..., D) rotated by positions broadcast against its leading dims."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    ang = positions[..., None].astype(jnp.float32) * freq
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _rms(x, g):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * g


def einsum_gqa(key):
    ks = iter(jax.random.split(key, 4 + 6 * L))
    emb = _normal(next(ks), (V, E))
    layers = tuple((jnp.ones((E,)), _normal(next(ks), (E, K, H // K, D)),
                    _normal(next(ks), (E, 2, K, D)), _normal(next(ks), (K, H // K, D, E)),
                    _normal(next(ks), (E, 2, F)), _normal(next(ks), (F, E)))
                   for _ in range(L))
    params = (emb, layers, jnp.ones((E,)), _normal(next(ks), (E, V)))

    def init_cache(batch, length):
        return [(jnp.zeros((K, batch, length, D)), jnp.zeros((K, batch, length, D)))
                for _ in range(L)]

    def attend(q, k, v, allowed):
        # q (B, T, K, G, D); k, v (K, B, S, D); allowed (B, T, S)
        s = jnp.einsum("btkgd,kbsd->bkgts", q, k) / jnp.sqrt(jnp.float32(D))
        s = jnp.where(allowed[:, None, None], s, -1e30)
        return jnp.einsum("bkgts,kbsd->btkgd", jax.nn.softmax(s, axis=-1), v)

    def layer(p, x, positions, kv, write, allowed):
        g, wq, wkv, wo, w13, w2 = p
        h = _rms(x, g)
        q = _rope(jnp.einsum("bte,ekgd->btkgd", h, wq), positions[:, :, None, None])
        k_new = _rope(jnp.einsum("bte,ekd->kbtd", h, wkv[:, 0]), positions[None])
        v_new = jnp.einsum("bte,ekd->kbtd", h, wkv[:, 1])
        k, v = write(kv[0], k_new), write(kv[1], v_new)
        x = x + jnp.einsum("btkgd,kgde->bte", attend(q, k, v, allowed), wo)
        up = jnp.einsum("bte,eif->ibtf", _rms(x, g), w13)
        return x + (jax.nn.silu(up[0]) * up[1]) @ w2, (k, v)

    def forward(params, tokens, cache, positions, write, allowed):
        emb, layers, g, head = params
        x = emb[tokens]
        new = []
        for p, kv in zip(layers, cache):
            x, kv = layer(p, x, positions, kv, write, allowed)
            new.append(kv)
        return _rms(x, g) @ head, new

    def prefill(params, tokens, cache):
        B, T = tokens.shape
        S = cache[0][0].shape[2]
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        allowed = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], (B, T, S))

        def write(c, new):
            return jax.lax.dynamic_update_slice(c, new, (0, 0, 0, 0))

        return forward(params, tokens, cache, positions, write, allowed)

    def decode_step(params, tokens, cache, positions):
        B = tokens.shape[0]
        S = cache[0][0].shape[2]
        allowed = (jnp.arange(S)[None, :] <= positions[:, None])[:, None, :]  # (B, 1, S)

        def write(c, new):  # new (K, B, 1, D) at [:, b, positions[b]]
            return c.at[:, jnp.arange(B), positions].set(new[:, :, 0])

        logits, cache = forward(params, tokens[:, None], cache, positions[:, None], write,
                                allowed)
        return logits[:, 0], cache

    return prefill, decode_step, init_cache, params, V


# ---- a Flax linen module, cache {"layer_i": {"key", "value"}} as (B, S, H, D) ------------------

FE, FH, FD, FF, FL, FMAX = 32, 8, 4, 64, 2, 128


def flax_mha(key):
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, cache, write, allowed):
            h = nn.LayerNorm()(x)
            q = nn.DenseGeneral((FH, FD), name="query")(h)
            k = write(cache["key"], nn.DenseGeneral((FH, FD), name="key")(h))
            v = write(cache["value"], nn.DenseGeneral((FH, FD), name="value")(h))
            s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(FD))
            s = jnp.where(allowed[:, None], s, -1e30)
            o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)
            x = x + nn.DenseGeneral(FE, axis=(-2, -1), name="out")(o)
            h = nn.LayerNorm()(x)
            return x + nn.Dense(FE)(nn.gelu(nn.Dense(FF)(h))), {"key": k, "value": v}

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens, cache, positions, write, allowed):
            emb = nn.Embed(V, FE)
            x = emb(tokens) + nn.Embed(FMAX, FE, name="positions")(positions)
            new = {}
            for i in range(FL):
                x, new[f"layer_{i}"] = Layer(name=f"layer_{i}")(x, cache[f"layer_{i}"],
                                                                write, allowed)
            return emb.attend(nn.LayerNorm()(x)), new

    lm = LM()

    def init_cache(batch, length):
        return {f"layer_{i}": {"key": jnp.zeros((batch, length, FH, FD)),
                               "value": jnp.zeros((batch, length, FH, FD))}
                for i in range(FL)}

    def prefill(params, tokens, cache):
        B, T = tokens.shape
        S = cache["layer_0"]["key"].shape[1]
        allowed = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], (B, T, S))

        def write(c, new):
            return jax.lax.dynamic_update_slice(c, new, (0, 0, 0, 0))

        return lm.apply(params, tokens, cache, jnp.broadcast_to(jnp.arange(T), (B, T)),
                        write, allowed)

    def decode_step(params, tokens, cache, positions):
        S = cache["layer_0"]["key"].shape[1]
        hot = jnp.arange(S)[None, :] == positions[:, None]  # (B, S)

        def write(c, new):  # new (B, 1, H, D): a one-hot blend at each row's position
            return jnp.where(hot[:, :, None, None], new, c)

        allowed = (jnp.arange(S)[None, :] <= positions[:, None])[:, None, :]
        logits, cache = lm.apply(params, tokens[:, None], cache, positions[:, None], write,
                                 allowed)
        return logits[:, 0], cache

    params = lm.init(
        key, jnp.zeros((1, 4), jnp.int32), init_cache(1, 4), jnp.zeros((1, 4), jnp.int32),
        lambda c, n: jax.lax.dynamic_update_slice(c, n, (0, 0, 0, 0)),
        jnp.ones((1, 4, 4), bool))
    return prefill, decode_step, init_cache, params, V


SERVED = {"einsum_gqa": einsum_gqa, "flax_mha": flax_mha}


def einsum_gqa_served():
    """`meshwright serve --model-fn served_zoo:einsum_gqa_served` (tests/ on the path): the
    einsum model as the engine takes it, and its params."""
    from meshwright.models import from_functions

    prefill, decode_step, init_cache, params, vocab = einsum_gqa(jax.random.PRNGKey(3))
    return from_functions(prefill, decode_step, init_cache, vocab, max_len=64,
                          name="einsum-gqa"), params
