"""Serve your own model: a multiquery Transformer written in plain JAX, served by the engine.

    python docs/examples/own_model.py                       # the output shown in docs/serving.md
    meshwright bench serve --model-fn own_model:make ...    # from docs/examples

Nothing here follows meshwright's reference models: the cache is a list with one dict per
layer, {"k", "v"}, each (batch, length, d_head) -- one key/value head shared by every query
head, so no heads axis at all. The engine finds which axis holds the sequences and which the
positions by tracing `decode_step`.
"""

import jax
import jax.numpy as jnp

VOCAB, D_MODEL, HEADS, D_HEAD, D_FF, LAYERS, MAX_LEN = 256, 64, 4, 16, 256, 2, 128


def init_params(key):
    keys = iter(jax.random.split(key, 2 + 5 * LAYERS))

    def normal(*shape):
        return 0.05 * jax.random.normal(next(keys), shape, jnp.float32)

    return {"embed": normal(VOCAB, D_MODEL), "pos": normal(MAX_LEN, D_MODEL),
            "layers": [{"wq": normal(D_MODEL, HEADS, D_HEAD), "wkv": normal(D_MODEL, 2, D_HEAD),
                        "wo": normal(HEADS, D_HEAD, D_MODEL), "w_in": normal(D_MODEL, D_FF),
                        "w_out": normal(D_FF, D_MODEL)} for _ in range(LAYERS)]}


def init_cache(batch, length):
    """The empty cache: one {"k", "v"} per layer, (batch, length, d_head)."""
    return [{"k": jnp.zeros((batch, length, D_HEAD)), "v": jnp.zeros((batch, length, D_HEAD))}
            for _ in range(LAYERS)]


def _norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _forward(params, tokens, positions, cache, write, allowed):
    """tokens, positions (B, T); allowed (B, T, S): which cached positions each token sees."""
    x = params["embed"][tokens] + params["pos"][positions]
    new_cache = []
    for p, c in zip(params["layers"], cache):
        h = _norm(x)
        q = jnp.einsum("bte,ehd->bthd", h, p["wq"])
        kv = jnp.einsum("bte,ecd->cbtd", h, p["wkv"])  # (2, B, T, D)
        c = {"k": write(c["k"], kv[0]), "v": write(c["v"], kv[1])}
        scores = jnp.einsum("bthd,bsd->bhts", q, c["k"]) / jnp.sqrt(jnp.float32(D_HEAD))
        scores = jnp.where(allowed[:, None], scores, -1e30)
        out = jnp.einsum("bhts,bsd->bthd", jax.nn.softmax(scores, axis=-1), c["v"])
        x = x + jnp.einsum("bthd,hde->bte", out, p["wo"])
        x = x + jax.nn.gelu(_norm(x) @ p["w_in"]) @ p["w_out"]
        new_cache.append(c)
    return _norm(x) @ params["embed"].T, new_cache


def prefill(params, tokens, cache):
    """Prompts (B, T) -> logits (B, T, V); writes cache positions 0..T-1."""
    B, T = tokens.shape
    S = cache[0]["k"].shape[1]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    allowed = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], (B, T, S))

    def write(c, new):
        return jax.lax.dynamic_update_slice(c, new, (0, 0, 0))

    return _forward(params, tokens, positions, cache, write, allowed)


def decode_step(params, tokens, cache, positions):
    """One token per row (B,) at positions (B,) -> logits (B, V)."""
    S = cache[0]["k"].shape[1]
    rows = jnp.arange(tokens.shape[0])

    def write(c, new):  # new (B, 1, D) -> c[b, positions[b]]
        return c.at[rows, positions].set(new[:, 0])

    allowed = (jnp.arange(S)[None, :] <= positions[:, None])[:, None, :]
    logits, cache = _forward(params, tokens[:, None], positions[:, None], cache, write, allowed)
    return logits[:, 0], cache


def make():
    """(model, params): what `--model-fn own_model:make` loads."""
    import meshwright as mw

    model = mw.models.from_functions(prefill=prefill, decode_step=decode_step,
                                     init_cache=init_cache, vocab_size=VOCAB,
                                     max_len=MAX_LEN, name="own-mqa")
    return model, init_params(jax.random.PRNGKey(0))


if __name__ == "__main__":
    import meshwright as mw

    model, params = make()
    print("cache axes found:", model.cache_axes(params)[0])
    engine = mw.runtime.Engine(model, params, max_slots=4, max_len=64, progress=False)
    results = engine.generate([[72, 101, 108, 108, 111], [1, 2, 3]], max_tokens=6)
    for r in results:
        print(r.request_id, r.prompt, "->", r.tokens, r.finish_reason)
    print(engine.notes[0])
