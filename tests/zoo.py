"""Transformers written as a stranger would: not in the reference models' style.

Each entry builds `(fn, args)` for a small full-sequence forward pass returning logits. The IR,
axis inference and block finding must cope with all of them. Sizes are tiny (B=2, T=8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

B, T, E, H, D, F, V = 2, 8, 32, 4, 8, 64, 50


def _normal(key, shape, scale=0.05):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _tokens(key):
    return jax.random.randint(key, (B, T), 0, V, dtype=jnp.int32)


# ---- 1. einsum everything, separate Q/K/V weights shaped (E, H, D), causal mask from iota ----


def einsum_transformer(key):
    ks = jax.random.split(key, 8)
    params = {
        "emb": _normal(ks[0], (V, E)),
        "wq": _normal(ks[1], (E, H, D)), "wk": _normal(ks[2], (E, H, D)),
        "wv": _normal(ks[3], (E, H, D)), "wo": _normal(ks[4], (H, D, E)),
        "w1": _normal(ks[5], (E, F)), "w2": _normal(ks[6], (F, E)),
        "g": jnp.ones((E,)),
    }

    def forward(p, tokens):
        x = p["emb"][tokens]  # (B, T, E)
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * p["g"]
        q = jnp.einsum("bte,ehd->bthd", h, p["wq"])
        k = jnp.einsum("bte,ehd->bthd", h, p["wk"])
        v = jnp.einsum("bte,ehd->bthd", h, p["wv"])
        s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(D)
        mask = jax.lax.broadcasted_iota(jnp.int32, (T, T), 0) >= \
            jax.lax.broadcasted_iota(jnp.int32, (T, T), 1)
        s = jnp.where(mask, s, -1e9)
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", a, v)
        x = x + jnp.einsum("bthd,hde->bte", o, p["wo"])
        x = x + jax.nn.relu(x @ p["w1"]) @ p["w2"]
        return jnp.einsum("bte,ve->btv", x, p["emb"])

    return forward, (params, _tokens(ks[7]))


# ---- 2. fused QKV weight (E, 3E), heads split after the projection, matmul style -----------


def fused_qkv_transformer(key):
    ks = jax.random.split(key, 6)
    params = {"wte": _normal(ks[0], (V, E)), "qkv": _normal(ks[1], (E, 3 * E)),
                  "qkv_b": jnp.zeros((3 * E,)), "proj": _normal(ks[2], (E, E)),
                  "fc": _normal(ks[3], (E, F)), "out": _normal(ks[4], (F, E)),
                  "ln_g": jnp.ones(E), "ln_b": jnp.zeros(E), "head": _normal(ks[5], (E, V))}

    def layernorm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * g + b

    def forward(params, ids):
        x = params["wte"][ids]
        h = layernorm(x, params["ln_g"], params["ln_b"])
        q, k, v = jnp.split(h @ params["qkv"] + params["qkv_b"], 3, axis=-1)
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, H, D).transpose(0, 2, 1, 3)
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(D))
        att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -jnp.inf)
        y = jax.nn.softmax(att, axis=-1) @ v  # (B, H, T, D)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, E)
        x = x + y @ params["proj"]
        x = x + jax.nn.gelu(layernorm(x, params["ln_g"], params["ln_b"]) @ params["fc"]) \
            @ params["out"]
        return x @ params["head"]

    return forward, (params, _tokens(key))


# ---- 3. jax.nn.dot_product_attention, grouped-query with jnp.repeat, SwiGLU, RoPE ----------

KV = 2


def _rope(x, positions):
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000.0 ** (jnp.arange(half) / half))
    ang = positions[:, None] * freqs[None, :]  # (T, D/2)
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def gqa_dpa_transformer(key):
    ks = jax.random.split(key, 9)
    params = {
        "embed": _normal(ks[0], (V, E)),
        "q": _normal(ks[1], (E, H * D)), "k": _normal(ks[2], (E, KV * D)),
        "v": _normal(ks[3], (E, KV * D)), "o": _normal(ks[4], (H * D, E)),
        "gate": _normal(ks[5], (E, F)), "up": _normal(ks[6], (E, F)),
        "down": _normal(ks[7], (F, E)), "lm_head": _normal(ks[8], (E, V)),
    }

    def forward(params, tokens):
        x = jnp.take(params["embed"], tokens, axis=0)
        pos = jnp.arange(T, dtype=jnp.float32)
        q = _rope((x @ params["q"]).reshape(B, T, H, D), pos)
        k = _rope((x @ params["k"]).reshape(B, T, KV, D), pos)
        v = (x @ params["v"]).reshape(B, T, KV, D)
        k = jnp.repeat(k, H // KV, axis=2)
        v = jnp.repeat(v, H // KV, axis=2)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, H, D)
        x = x + o.reshape(B, T, H * D) @ params["o"]
        x = x + (jax.nn.silu(x @ params["gate"]) * (x @ params["up"])) @ params["down"]
        return x @ params["lm_head"]

    return forward, (params, _tokens(key))


# ---- 4. layers as a scan over stacked weights, multiquery, parallel block ------------------

L_SCAN = 3


def scan_parallel_mqa_transformer(key):
    ks = jax.random.split(key, 6)
    params = {
        "tok": _normal(ks[0], (V, E)),
        "layers": {
            "wq": _normal(ks[1], (L_SCAN, E, H, D)),
            "wkv": _normal(ks[2], (L_SCAN, E, 2, D)),  # one K head and one V head: multiquery
            "wo": _normal(ks[3], (L_SCAN, H, D, E)),
            "wi": _normal(ks[4], (L_SCAN, E, F)),
            "wf": _normal(ks[5], (L_SCAN, F, E)),
        },
    }

    def block(x, w):
        h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)
        q = jnp.einsum("bte,ehd->bthd", h, w["wq"])
        kv = jnp.einsum("bte,ecd->btcd", h, w["wkv"])
        k, v = kv[:, :, 0], kv[:, :, 1]  # (B, T, D) each
        s = jnp.einsum("bthd,bsd->bhts", q, k) * D ** -0.5
        s = jnp.where(jnp.tril(jnp.ones((T, T))) > 0, s, -1e30)
        o = jnp.einsum("bhts,bsd->bthd", jax.nn.softmax(s), v)
        attn = jnp.einsum("bthd,hde->bte", o, w["wo"])
        mlp = jax.nn.gelu(h @ w["wi"], approximate=False) @ w["wf"]
        return x + attn + mlp, None

    def forward(params, tokens):
        x = params["tok"][tokens]
        x, _ = jax.lax.scan(block, x, params["layers"])
        return x @ params["tok"].T

    return forward, (params, _tokens(key))


# ---- 5. a Flax (linen) module ---------------------------------------------------------------


def flax_transformer(key):
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            y = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E)(
                h, mask=nn.make_causal_mask(jnp.ones((B, T))))
            x = x + y
            h = nn.LayerNorm()(x)
            return x + nn.Dense(E)(nn.gelu(nn.Dense(F)(h)))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            emb = nn.Embed(V, E)
            x = emb(tokens)
            for _ in range(2):
                x = Block()(x)
            return emb.attend(nn.LayerNorm()(x))

    model = LM()
    tokens = _tokens(key)
    variables = model.init(key, tokens)
    return model.apply, (variables, tokens)


# ---- 6. an Equinox module ------------------------------------------------------------------


def equinox_transformer(key):
    import equinox as eqx

    class Block(eqx.Module):
        attn: eqx.nn.MultiheadAttention
        ln1: eqx.nn.LayerNorm
        ln2: eqx.nn.LayerNorm
        mlp_in: eqx.nn.Linear
        mlp_out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.attn = eqx.nn.MultiheadAttention(H, E, key=k1)
            self.ln1, self.ln2 = eqx.nn.LayerNorm(E), eqx.nn.LayerNorm(E)
            self.mlp_in = eqx.nn.Linear(E, F, key=k2)
            self.mlp_out = eqx.nn.Linear(F, E, key=k3)

        def __call__(self, x):  # x: (T, E), one sequence
            h = jax.vmap(self.ln1)(x)
            mask = jnp.tril(jnp.ones((T, T), bool))
            x = x + self.attn(h, h, h, mask=mask)
            h = jax.vmap(self.ln2)(x)
            return x + jax.vmap(lambda r: self.mlp_out(jax.nn.gelu(self.mlp_in(r))))(h)

    class LM(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: list
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(V, E, key=k1)
            self.blocks = [Block(k) for k in jax.random.split(k2, 2)]
            self.head = eqx.nn.Linear(E, V, key=k3)

        def __call__(self, tokens):  # tokens: (B, T)
            def one(seq):
                x = jax.vmap(self.embed)(seq)
                for blk in self.blocks:
                    x = blk(x)
                return jax.vmap(self.head)(x)

            return jax.vmap(one)(tokens)

    lm = LM(key)
    params, static = eqx.partition(lm, eqx.is_array)

    def forward(params, tokens):
        return eqx.combine(params, static)(tokens)

    return forward, (params, _tokens(key))


ZOO = {
    "einsum": einsum_transformer,
    "fused_qkv": fused_qkv_transformer,
    "gqa_dpa": gqa_dpa_transformer,
    "scan_parallel_mqa": scan_parallel_mqa_transformer,
    "flax": flax_transformer,
    "equinox": equinox_transformer,
}
