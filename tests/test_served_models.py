"""Serving the user's own model (models/functions.py): the engine takes prefill, decode_step and
init_cache written in any style, finds the cache's slot and length axes by tracing, serves
every request the tokens the model gives it alone (fused, static and dynamic batching, one
device and a mesh of 8), and refuses functions that break its contract by naming the rule."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import ModelContractError, build, from_functions, get_config
from meshwright.models.cache import CacheAxes
from meshwright.models.functions import infer_cache_axes
from meshwright.runtime.demo import greedy_reference
from meshwright.runtime.engine import Engine, StepClock
from meshwright.runtime.layouts import sharded_engine
from meshwright.runtime.request import Request, SamplingParams
from served_zoo import SERVED

MAX_LEN = 32
BUCKETS = {"max_slots": 4, "max_len": MAX_LEN, "kv_lengths": (16, 32),
           "prefill_lengths": (16, 32), "prefill_rows": (1, 2), "progress": False}


@pytest.fixture(scope="module", params=sorted(SERVED))
def served(request):
    prefill, decode, init_cache, params, vocab = SERVED[request.param](jax.random.PRNGKey(3))
    model = from_functions(prefill, decode, init_cache, vocab, max_len=MAX_LEN,
                           name=request.param)
    return model, params


def _arrivals(vocab: int, n: int = 7, seed: int = 0) -> list:
    """More requests than slots, arriving over time, of different lengths: requests join and
    leave the running batch, and the shuffle moves them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(2, 15))))
        out.append((0.002 * i, Request(prompt=prompt, max_tokens=int(rng.integers(3, 12)))))
    return out


@pytest.fixture(scope="module")
def references(served):
    model, params = served
    return {r.prompt: greedy_reference(model, params, r.prompt, r.max_tokens)
            for _, r in _arrivals(model.vocab_size)}


def test_the_cache_axes_are_found_by_tracing_the_decode_step(served):
    model, params = served
    axes = jax.tree.leaves(model.cache_axes(params))
    want = {"einsum_gqa": CacheAxes(slot=1, length=2),  # (kv_heads, batch, length, d_head)
            "flax_mha": CacheAxes(slot=0, length=1)}[model.name]  # (batch, length, heads, d)
    assert axes == [want] * 4


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "palm-tiny"])
@pytest.mark.parametrize("scan", [False, True])
def test_tracing_reads_the_reference_models_declared_axes(name, scan):
    model = build(get_config(name).replace(scan_layers=scan, n_layers=2))
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    assert infer_cache_axes(model, params) == model.cache_axes()


@pytest.mark.parametrize("policy", ["fused", "static", "dynamic"])
def test_every_request_gets_the_tokens_it_gets_alone(served, references, policy):
    model, params = served
    engine = _engine(model, params)
    engine.set_policy(policy, window_s=0.003)
    report = engine.serve(_arrivals(model.vocab_size), clock=StepClock(1e-3))
    got = {r.prompt: r.tokens for r in report.results}
    assert got == references
    if policy == "fused":  # requests joined a running batch, and the shuffle moved them
        assert report.metrics["kv_moves"] > 0
        assert len(engine.stats.buckets_used) > 1


def test_streaming_and_sampling(served, references):
    model, params = served
    engine = _engine(model, params)
    prompt, want = next(iter(references.items()))
    handle = engine.submit(Request(prompt=prompt, max_tokens=len(want)))
    assert list(handle) == want  # streamed token by token
    sampled = Request(prompt=prompt, max_tokens=6,
                      sampling=SamplingParams(temperature=0.8, top_k=20, seed=7))
    alone = engine.generate([sampled])[0].tokens
    batched = engine.generate([sampled] + [Request(prompt=p, max_tokens=4)
                                           for p in list(references)[1:4]])[0].tokens
    assert alone == batched and all(0 <= t < model.vocab_size for t in alone)


_ENGINES: dict = {}


def _engine(model, params) -> Engine:
    """One engine per model, shared by the tests (compiling is most of their time); each
    bucket compiled when first used: these requests use some only (no prompt fills a
    prefill of 32)."""
    if model.name not in _ENGINES:
        _ENGINES[model.name] = Engine(model, params, **BUCKETS, warmup=False)
    return _ENGINES[model.name]


def test_served_on_8_devices_with_the_planners_layout_per_bucket(served, references):
    model, params = served
    # share_weights=False: every bucket runs the planner's cheapest layout on the mesh, which
    # shards attention over the heads at 1 row and over the sequences at 8
    engine = sharded_engine(model, params, jax.devices()[:8], share_weights=False,
                            **{**BUCKETS, "max_slots": 8, "kv_lengths": (32,)})
    report = engine.serve(_arrivals(model.vocab_size), clock=StepClock(1e-3))
    assert {r.prompt: r.tokens for r in report.results} == references
    assert report.metrics["kv_moves"] > 0
    layouts = {b.batch: name for (p, b), name in engine.layouts.items() if p == "decode"}
    assert layouts[8].endswith("/batch") and layouts[1].endswith("/heads")
    # and the cache is split in the model's own layout: the sequences axis under batch
    # attention, the heads axis under heads attention
    slot = jax.tree.leaves(model.cache_axes(params))[0].slot
    heads = {"einsum_gqa": 0, "flax_mha": 2}[model.name]
    for capacity, axis in ((8, slot), (1, heads)):
        spec = jax.tree.leaves(engine._window_shardings[(capacity, 32)])[0].spec
        assert [i for i, s in enumerate(spec) if s is not None] == [axis], (capacity, spec)


# ---- the contract ----------------------------------------------------------------------------


def _tiny():
    """A correct one-layer model to break in one place at a time."""
    return SERVED["flax_mha"](jax.random.PRNGKey(0))


def _refused(match: str, **changes):
    prefill, decode, init_cache, params, vocab = _tiny()
    fns = {"prefill": prefill, "decode_step": decode, "init_cache": init_cache}
    fns.update(changes)
    model = from_functions(**fns, vocab_size=vocab, max_len=MAX_LEN, name="broken")
    with pytest.raises(ModelContractError, match=match):
        Engine(model, params, warmup=False, progress=False)


def test_wrong_logits_shape_is_refused():
    _, decode, *_ = _tiny()
    _refused(r"decode_step returns logits \(3, 1, 61\); the contract is \(batch, vocab_size\)",
             decode_step=lambda p, t, c, pos: (decode(p, t, c, pos)[0][:, None],
                                               decode(p, t, c, pos)[1]))


def test_a_cache_that_changes_structure_is_refused():
    _, decode, *_ = _tiny()

    def drops_a_layer(p, t, c, pos):
        logits, cache = decode(p, t, c, pos)
        return logits, {"layer_0": cache["layer_0"]}

    _refused("decode_step returns a cache structured as", decode_step=drops_a_layer)


def test_a_cache_that_grows_is_refused():
    prefill, *_ = _tiny()

    def grows(p, tokens, cache):
        logits, cache = prefill(p, tokens, cache)
        return logits, jax.tree.map(lambda a: jnp.concatenate([a, a], axis=1), cache)

    _refused(r"prefill returns cache\['layer_0'\]\['key'\] as float32\[3, 14, 8, 4\]; it was "
             r"given float32\[3, 7, 8, 4\]", prefill=grows)


def test_a_cache_array_without_positions_is_refused_naming_it():
    _, decode, init_cache, *_ = _tiny()

    def with_counter(batch, length):
        return {**init_cache(batch, length), "count": jnp.zeros((batch,), jnp.int32)}

    def counts(p, t, c, pos):
        logits, cache = decode(p, t, {k: v for k, v in c.items() if k != "count"}, pos)
        return logits, {**cache, "count": c["count"] + 1}

    _refused(r"cache array cache\['count'\] \(3,\) has roles .*exactly one 'batch'.*one "
             r"'kv_length'.*cache_axes=", init_cache=with_counter, decode_step=counts)


def test_a_decode_step_that_does_not_trace_is_refused():
    def python_control_flow(p, t, c, pos):
        return (p, c) if pos[0] > 0 else (t, c)  # a traced value in an if

    _refused(r"decode_step\(params, tokens \(3,\), cache, positions \(3,\)\) does not trace",
             decode_step=python_control_flow)


def test_explicit_axes_are_used_and_checked():
    prefill, decode, init_cache, params, vocab = _tiny()
    right = jax.tree.map(lambda _: CacheAxes(slot=0, length=1), init_cache(1, 4))
    model = from_functions(prefill, decode, init_cache, vocab, max_len=MAX_LEN,
                           cache_axes=right)
    assert model.cache_axes(params) is right
    wrong = jax.tree.map(lambda _: CacheAxes(slot=2, length=1), init_cache(1, 4))
    model = from_functions(prefill, decode, init_cache, vocab, max_len=MAX_LEN,
                           cache_axes=wrong, name="wrong")
    with pytest.raises(ModelContractError, match=r"its axis 2 \(sequences\) must be the batch"):
        Engine(model, params, warmup=False, progress=False)


def test_a_model_from_functions_needs_params_and_a_max_len():
    prefill, decode, init_cache, params, vocab = _tiny()
    model = from_functions(prefill, decode, init_cache, vocab, name="tiny")
    with pytest.raises(ValueError, match="needs its params"):
        Engine(model, warmup=False, progress=False)
    with pytest.raises(ValueError, match="no max_len"):
        Engine(model, params, warmup=False, progress=False)
    with pytest.raises(TypeError, match="decode_step must be a function"):
        from_functions(prefill, None, init_cache, vocab)


# ---- the command line and the documented example ------------------------------------------


EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_bench_serve_takes_a_model_fn(capsys, monkeypatch):
    """The example of docs/serving.md, served by `meshwright bench serve --model-fn`: its
    3-d cache (one key/value head, no heads axis) read correctly."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from meshwright.cli import main

    assert main(["bench", "serve", "--model-fn", "own_model:make", "--requests", "6",
                 "--out-len", "2", "6", "--prompt-len", "1", "6", "--max-slots", "2",
                 "--max-len", "16", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "own-mqa" and result["requests_completed"] == 6
    import own_model

    model, params = own_model.make()
    assert model.cache_axes(params)[0] == {"k": CacheAxes(slot=0, length=1),
                                           "v": CacheAxes(slot=0, length=1)}
    monkeypatch.setattr(own_model, "wrong", lambda: 3, raising=False)
    for spec, message in (("own_model", "expected package.module:factory"),
                          ("no_such_module:make", "cannot import 'no_such_module'"),
                          ("own_model:nothing", "own_model has no function 'nothing'"),
                          ("own_model:init_cache", "init_cache() failed: TypeError"),
                          ("own_model:wrong", "must return (model, params)")):
        assert main(["bench", "serve", "--model-fn", spec, "--no-progress"]) == 2
        assert message in capsys.readouterr().err, spec
