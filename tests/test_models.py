"""Reference models: cached decoding equals the full causal forward, loop equals scan, per-row
positions are independent, GQA/MQA work, shapes and errors are as documented.

Compiling is the slow part on CPU (~0.7 s per function), so every jitted function is made once
per config (`_compiled`) and every prefill+decode run once per config (`_run`); tests that only
need shapes use `jax.eval_shape` / `jax.make_jaxpr`, which do not compile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import Model, build, get_config

PRESETS = ["gpt2-tiny", "palm-tiny", "llama-tiny"]
BATCH, PROMPT, TOTAL = 3, 5, 8  # prefill PROMPT tokens, then decode up to TOTAL
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _config(name: str, scan: bool = False, **overrides):
    return get_config(name, scan_layers=scan, **overrides)


@functools.cache
def _compiled(config):
    model = build(config)
    return (model, jax.jit(model.logits), jax.jit(model.prefill), jax.jit(model.decode_step))


def _tokens(config, seed: int = 1) -> np.ndarray:
    # numpy from here on: slicing jax arrays eagerly would compile one small program per slice
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (BATCH, TOTAL), 0,
                                         config.vocab_size, jnp.int32))


@functools.cache
def _run(config):
    """Full logits, prefill logits, per-step decode logits and final cache for one sequence."""
    model, logits_fn, prefill_fn, decode_fn = _compiled(config)
    params = model.init_params(jax.random.PRNGKey(0))
    tokens = _tokens(config)
    full = logits_fn(params, tokens)  # (B, TOTAL, V)
    prompt_logits, cache = prefill_fn(params, tokens[:, :PROMPT], model.init_cache(BATCH))
    steps = []
    for t in range(PROMPT, TOTAL):
        step_logits, cache = decode_fn(params, tokens[:, t], cache, np.full(BATCH, t, np.int32))
        steps.append(step_logits)
    return params, full, prompt_logits, np.stack(steps, axis=1), cache


def _stacked(cache, name: str) -> np.ndarray:
    """K or V of every layer as one numpy array (n_layers, batch, kv_heads, positions, d_head),
    whether the cache holds one array per layer (a loop) or stacked arrays (a scan)."""
    c = cache[name]  # numpy, not jnp: every eager jnp op would be one more compile
    return np.stack([np.asarray(a) for a in c]) if isinstance(c, list) else np.asarray(c)


def _check_cached_decoding_matches_full_forward(config):
    _, full, prompt_logits, step_logits, cache = _run(config)
    assert full.shape == (BATCH, TOTAL, config.vocab_size)
    np.testing.assert_allclose(prompt_logits, full[:, :PROMPT], **TOL)
    np.testing.assert_allclose(step_logits, full[:, PROMPT:], **TOL)
    for name in ("k", "v"):
        c = _stacked(cache, name)
        assert c.shape == (config.n_layers, BATCH, config.n_kv_heads, config.max_len,
                           config.d_head)
        assert np.all(np.any(c[:, :, :, :TOTAL] != 0, axis=-1))  # positions 0..TOTAL-1 written
        assert not np.any(c[:, :, :, TOTAL:])  # the others stay zero


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_matches_full_logits(name, scan):
    _check_cached_decoding_matches_full_forward(_config(name, scan))


@pytest.mark.parametrize("name", PRESETS)
def test_loop_and_scan_agree(name):
    loop_params, loop_full, _, loop_steps, loop_cache = _run(_config(name, scan=False))
    scan_params, scan_full, _, scan_steps, scan_cache = _run(_config(name, scan=True))
    # same numbers from the same key: the loop variant is the stacked one, unstacked
    assert isinstance(loop_params["layers"], list) and isinstance(scan_params["layers"], dict)
    restacked = jax.tree.map(lambda *xs: np.stack(xs), *loop_params["layers"])
    jax.tree.map(np.testing.assert_array_equal, restacked, scan_params["layers"])
    np.testing.assert_allclose(loop_full, scan_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loop_steps, scan_steps, rtol=1e-6, atol=1e-6)
    for kv in ("k", "v"):
        np.testing.assert_allclose(_stacked(loop_cache, kv), _stacked(scan_cache, kv),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_decode_with_a_different_position_per_row(name):
    """Rows with prompts of lengths 2, 5, 3 share one batch (the Flover case): slots past a row's
    own length hold another prompt's K/V and must be masked, then overwritten as it grows."""
    config = _config(name)
    model, logits_fn, prefill_fn, decode_fn = _compiled(config)
    params = model.init_params(jax.random.PRNGKey(0))
    lengths = np.array([2, 5, 3], np.int32)
    sequences = _tokens(config, seed=2)  # (B, TOTAL): row b's prompt is sequences[b, :lengths[b]]
    garbage = _tokens(config, seed=3)[:, :PROMPT]
    padded = np.where(np.arange(PROMPT)[None, :] < lengths[:, None], sequences[:, :PROMPT],
                      garbage)  # (B, PROMPT)
    reference = np.asarray(logits_fn(params, sequences))  # causal: position p sees tokens 0..p
    _, cache = prefill_fn(params, padded, model.init_cache(BATCH))
    rows = np.arange(BATCH)
    for step in range(TOTAL - PROMPT):
        positions = lengths + step  # (B,)
        tokens = sequences[rows, positions]  # (B,)
        before = cache
        step_logits, cache = decode_fn(params, tokens, cache, positions)
        step_logits = np.asarray(step_logits)  # (B, V)
        np.testing.assert_allclose(step_logits, reference[rows, positions], **TOL)
        if step == 0:  # each row alone, batch 1, gives the same logits and cache row
            for b in range(BATCH):
                row_cache = jax.tree.map(lambda c, ax, b=b: np.take(c, [b], axis=ax.slot),
                                         before, model.cache_axes())
                alone, alone_cache = decode_fn(params, tokens[b:b + 1], row_cache,
                                               positions[b:b + 1])
                np.testing.assert_allclose(np.asarray(alone)[0], step_logits[b], **TOL)
                np.testing.assert_allclose(_stacked(alone_cache, "k")[:, 0],
                                           _stacked(cache, "k")[:, b], **TOL)


@pytest.mark.parametrize("name,kv_heads", [
    ("llama-tiny", 1), ("llama-tiny", 2), ("llama-tiny", 8),  # MQA, GQA (preset), MHA
    ("palm-tiny", 1), ("palm-tiny", 2),  # MQA (preset), grouped
])
def test_grouped_and_multiquery_attention(name, kv_heads):
    """Every token through decode_step from an empty cache (no prefill: one compile fewer, and
    position 0 sees a single key) reproduces the full forward."""
    config = _config(name, scan=True, n_kv_heads=kv_heads)  # scan: compiles faster than a loop
    assert config.n_heads == 8
    model, logits_fn, _, decode_fn = _compiled(config)
    params = model.init_params(jax.random.PRNGKey(0))
    tokens = _tokens(config)
    full = np.asarray(logits_fn(params, tokens))  # (B, TOTAL, V)
    cache = model.init_cache(BATCH)
    for t in range(TOTAL):
        step_logits, cache = decode_fn(params, tokens[:, t], cache, np.full(BATCH, t, np.int32))
        np.testing.assert_allclose(step_logits, full[:, t], **TOL)
    assert cache["k"].shape == (config.n_layers, BATCH, kv_heads, config.max_len, config.d_head)


@pytest.mark.parametrize("name", PRESETS)
def test_prefill_logits_at_the_last_prompt_token_and_a_short_cache(name):
    """`prefill(..., last)` gives each row's logits at its own last prompt token only, and
    decoding with a cache of fewer positions than max_len (the serving engine's KV window)
    gives the same logits as with max_len: the model takes its length from the arrays."""
    config = _config(name)
    model, _, _, decode_fn = _compiled(config)
    params, full, _, step_logits, _ = _run(config)
    tokens = _tokens(config)
    last = np.array([PROMPT - 1, 1, 3], np.int32)
    at_last, short = jax.jit(model.prefill)(params, tokens[:, :PROMPT],
                                            model.init_cache(BATCH, 16), last)
    np.testing.assert_allclose(at_last, full[np.arange(BATCH), last], **TOL)
    assert jax.tree.leaves(short)[0].shape[-2] == 16
    steps = []
    for t in range(PROMPT, TOTAL):
        logits, short = decode_fn(params, tokens[:, t], short, np.full(BATCH, t, np.int32))
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, axis=1), step_logits, **TOL)


# ---- shapes, dtypes and the API contract (trace only, no compiles) ------------------------

def _param_shapes(name: str) -> dict[str, tuple]:
    c = get_config(name)
    E, F, V, H, K, D = c.d_model, c.d_ff, c.vocab_size, c.n_heads, c.n_kv_heads, c.d_head
    return {
        "gpt2-tiny": {"wte": (V, E), "wpe": (c.max_len, E), "ln_f/scale": (E,),
                      "attn/c_attn/w": (E, 3 * H * D), "attn/c_attn/b": (3 * H * D,),
                      "attn/c_proj/w": (H * D, E), "mlp/c_fc/w": (E, F), "mlp/c_proj/w": (F, E)},
        "palm-tiny": {"embedding": (V, E), "final_norm/scale": (E,), "q": (E, H, D),
                      "k": (E, K, D), "v": (E, K, D), "o": (H, D, E), "gate": (E, F),
                      "up": (E, F), "down": (F, E)},
        "llama-tiny": {"tok_embeddings": (V, E), "output": (E, V), "norm": (E,),
                       "wq": (E, H * D), "wk": (E, K * D), "wv": (E, K * D), "wo": (H * D, E),
                       "w1": (E, F), "w3": (E, F), "w2": (F, E)},
    }[name]


def _lookup(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", PRESETS)
def test_param_and_cache_shapes(name, scan):
    config = _config(name, scan)
    model = build(config)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    N = config.n_layers
    layers = params["layers"]
    assert isinstance(layers, dict) if scan else (isinstance(layers, list) and len(layers) == N)
    for path, shape in _param_shapes(name).items():
        top = path.split("/")[0] in params
        if top:
            leaf = _lookup(params, path)
        elif scan:
            leaf, shape = _lookup(layers, path), (N, *shape)
        else:
            leaf = _lookup(layers[N - 1], path)
        assert leaf.shape == shape, path
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    # not tied: llama has its own output matrix; gpt2/palm unembed with the input embedding
    assert ("output" in params) == (name == "llama-tiny")

    cache = model.init_cache(4)
    assert set(cache) == {"k", "v"}
    for kv in cache:
        c = _stacked(cache, kv)
        assert c.shape == (N, 4, config.n_kv_heads, config.max_len, config.d_head)
        assert c.dtype == jnp.float32 and not np.any(c)
        assert isinstance(cache[kv], list) != scan  # one array per layer in a loop
    axes = model.cache_axes()
    assert jax.tree.structure(axes) == jax.tree.structure(cache)
    slot, length = (1, 3) if scan else (0, 2)
    assert all((a.slot, a.length) == (slot, length) for a in jax.tree.leaves(axes))
    short = model.init_cache(2, 16)
    assert all(a.shape[slot] == 2 and a.shape[length] == 16 for a in jax.tree.leaves(short))


@pytest.mark.parametrize("name", PRESETS)
def test_example_args_and_tracing(name):
    model = build(get_config(name))
    cfg = model.config
    # shapes for every family (traced, not run: the generating code is shared by all families)
    params, tokens, cache = jax.eval_shape(lambda: model.example_args("prefill", 2, length=6))
    assert tokens.shape == (2, 6) and tokens.dtype == jnp.int32
    assert [c.shape for c in cache["k"]] == [(2, cfg.n_kv_heads, cfg.max_len, cfg.d_head)] * \
        cfg.n_layers
    out, new_cache = jax.eval_shape(model.fn("prefill"), params, tokens, cache)
    assert out.shape == (2, 6, cfg.vocab_size)
    assert jax.tree.map(lambda a: a.shape, new_cache) == jax.tree.map(lambda a: a.shape, cache)

    params, tokens, cache, positions = jax.eval_shape(lambda: model.example_args("decode", 3))
    assert tokens.shape == positions.shape == (3,)
    assert tokens.dtype == positions.dtype == jnp.int32
    out, _ = jax.eval_shape(model.fn("decode"), params, tokens, cache, positions)
    assert out.shape == (3, cfg.vocab_size)
    # the functions trace with arrays only: the config lives in the Model
    jaxpr = str(jax.make_jaxpr(model.fn("decode"))(params, tokens, cache, positions))
    assert "dot_general" in jaxpr
    assert model.fn("prefill") == model.prefill and model.fn("decode") == model.decode_step


def test_example_args_values():
    model = build("palm-tiny")
    params, tokens, cache, positions = model.example_args("decode", batch=16)
    assert np.all((np.asarray(positions) >= 0) & (np.asarray(positions) < model.config.max_len))
    assert len(set(np.asarray(positions).tolist())) > 1  # random, not one shared position
    k, v = _stacked(cache, "k"), _stacked(cache, "v")
    assert np.all(k != 0) and np.all(v != 0) and not np.array_equal(k, v)
    jax.tree.map(np.testing.assert_array_equal, params, model.init_params(jax.random.split(
        jax.random.PRNGKey(0), 4)[0]))  # default key PRNGKey(0), params from its first split
    again = model.example_args("decode", batch=16)
    jax.tree.map(np.testing.assert_array_equal, again, (params, tokens, cache, positions))


def test_build_and_model():
    model = build("palm-tiny")
    assert isinstance(model, Model) and model == build(get_config("palm-tiny"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config = get_config("gpt2-tiny")


@pytest.mark.parametrize("name", PRESETS)
def test_bfloat16_dtypes(name):
    model = build(get_config(name, dtype="bfloat16"))
    params, tokens, cache, positions = jax.eval_shape(lambda: model.example_args("decode"))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out, new_cache = jax.eval_shape(model.decode_step, params, tokens, cache, positions)
    assert out.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(new_cache)} == {jnp.dtype(jnp.bfloat16)}


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,match", [
    ("gpt2-tiny", {"n_kv_heads": 2}, "n_kv_heads"),
    ("gpt2-tiny", {"positions": "rope"}, "positions='rope'"),
    ("palm-tiny", {"parallel_block": False}, "parallel_block"),
    ("llama-tiny", {"tie_embeddings": True}, "tie_embeddings"),
    ("llama-tiny", {"norm": "layernorm", "bias": True}, "norm='layernorm'.*bias=True"),
    ("llama-tiny", {"family": "bert"}, "unknown family 'bert'"),
    ("llama-tiny", {"dtype": "float33"}, "float33"),
])
def test_bad_config_is_a_clear_value_error(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        build(get_config(name, **overrides))


def test_bad_inputs_are_clear_value_errors():
    model = build("llama-tiny")
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    too_long = jnp.zeros((1, model.config.max_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(model.prefill, params, too_long, model.init_cache(1))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        jax.eval_shape(model.decode_step, params, jnp.zeros((2, 1), jnp.int32),
                       model.init_cache(2), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="phase"):
        model.fn("auto")
    with pytest.raises(ValueError, match="phase"):
        model.example_args("train")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        get_config("llama-tiny", n_kv_heads=3)
