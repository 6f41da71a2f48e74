"""The engine end to end on the tiny models: fused scheduling gives each request exactly the
tokens it gets alone, nothing is lost, bad requests bounce off, tokens stream.

The reference ("alone") never touches the KV cache, the slots or the padding: one cache-free
`model.logits` pass over each request's prompt + generated tokens (right-padded to max_len,
which a causal model ignores) gives the logits the model alone produces before every token.
Greedy decoding alone is then reproduced exactly iff every generated token is the argmax of
the logits before it (by induction over the tokens) and the request stops where it should.
Weights are the random init scaled x10 so that greedy outputs depend on the context instead
of repeating one token.

Numerics: a batch of 8 and a batch of 1 differ in the last bits of float32 (XLA CPU picks
different kernels), so a token may legitimately differ where the reference's top two logits
are within 1e-4 of each other (a near-tie). `check_greedy` allows exactly that and nothing
else, and counts such near-ties.
"""

from __future__ import annotations

import functools
import logging
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.runtime.engine import Bucket, Engine, StepClock
from meshwright.runtime.kv_cache import batch_sharding
from meshwright.runtime.request import Request, SamplingParams
from meshwright.runtime.workload import make_workload

MAX_LEN = 64
NEAR_TIE = 1e-4
CHUNK = 64  # rows per reference call (one compile per model)


def sharp_params(model, seed=0):
    params = model.init_params(jax.random.PRNGKey(seed))
    return jax.tree.map(lambda a: a * 10 if a.ndim >= 2 else a, params)


@functools.cache
def _logits_fn(model):
    return jax.jit(model.logits)


def check_greedy(model, params, requests, results, max_len=MAX_LEN) -> int:
    """Assert every result is what greedy decoding of its request alone gives (up to
    near-ties); return the number of near-ties."""
    assert len(requests) == len(results)
    near_ties = 0
    for lo in range(0, len(requests), CHUNK):
        batch = np.zeros((CHUNK, max_len), np.int32)
        rows = list(zip(requests[lo:lo + CHUNK], results[lo:lo + CHUNK]))
        for i, (req, res) in enumerate(rows):
            assert res.ok, res.error
            seq = list(req.prompt) + res.tokens[:-1]
            batch[i, :len(seq)] = seq
        logits = np.asarray(_logits_fn(model)(params, batch))  # (CHUNK, max_len, V)
        for i, (req, res) in enumerate(rows):
            T, toks = len(req.prompt), res.tokens
            for j, tok in enumerate(toks):
                row = logits[i, T - 1 + j]
                best = int(np.argmax(row))
                if tok != best:
                    gap = float(row[best] - row[tok])
                    assert gap < NEAR_TIE, (
                        f"request {res.request_id}: token {j} is {tok}, alone it is {best} "
                        f"(logit gap {gap:.3g}); tokens {toks}")
                    near_ties += 1
            assert all(t not in req.stop_tokens for t in toks[:-1]), "ran past a stop token"
            assert (toks[-1] in req.stop_tokens) == (res.finish_reason == "stop")
            assert res.finish_reason == "stop" or len(toks) == req.max_tokens
    return near_ties


def random_requests(n, seed, max_len=MAX_LEN, vocab=256, long_tail=True):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_prompt = rng.choice([1, 2, 3, 5, 8, 13, 16, 17, 21, 30])
        max_tokens = rng.randint(1, 12) if rng.random() < 0.7 or not long_tail \
            else rng.randint(12, max_len - n_prompt)
        stops = tuple(rng.sample(range(vocab), 3)) if rng.random() < 0.3 else ()
        out.append(Request(prompt=tuple(rng.randrange(vocab) for _ in range(n_prompt)),
                           max_tokens=max_tokens, stop_tokens=stops))
    return out


@pytest.fixture(scope="module")
def palm():
    model = build(get_config("palm-tiny").replace(max_len=MAX_LEN))
    params = sharp_params(model)
    # two KV windows (decode reads 32 or 64 positions), prefills of 1, 2 or 8 prompts
    engine = Engine(model, params, max_slots=8, kv_lengths=(32, MAX_LEN),
                    prefill_rows=(1, 2, 8), prefill_lengths=(16, MAX_LEN), progress=False)
    return model, params, engine


class _CompileLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def serve_logging_compiles(engine, arrivals, **kwargs):
    """`engine.serve`, and the messages of every compilation JAX logged meanwhile."""
    log = _CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(log)
    jax.config.update("jax_log_compiles", True)
    try:
        report = engine.serve(arrivals, **kwargs)
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(log)
    return report, [m for m in log.messages if "ompil" in m]


@pytest.fixture(scope="module")
def arrivals():
    requests = random_requests(300, seed=1)
    rng = random.Random(2)
    t, out = 0.0, []
    for i, r in enumerate(requests):  # bursts and lulls, so buckets grow and shrink
        out.append((t, r))
        t += rng.expovariate(3000.0 if (i // 40) % 2 == 0 else 300.0)
    return out


@pytest.mark.parametrize("policy,shuffle", [("fused", True), ("fused", False),
                                            ("static", True), ("dynamic", True)])
def test_greedy_tokens_equal_running_each_request_alone(palm, arrivals, policy, shuffle):
    model, params, engine = palm
    engine.set_policy(policy, shuffle=shuffle, window_s=0.002)
    # deterministic: 1 ms per step
    report, compiles = serve_logging_compiles(engine, arrivals, clock=StepClock(1e-3))
    engine.set_policy("fused")
    assert not compiles, compiles[:3]  # every bucket and helper was compiled at start-up
    assert len(report.results) == len(arrivals)
    near_ties = check_greedy(model, params, [r for _, r in arrivals], report.results)
    print(f"{policy} shuffle={shuffle}: {len(arrivals)} requests, {near_ties} near-ties")
    assert near_ties <= 2
    m = report.metrics
    assert m["requests_completed"] == len(arrivals) and m["requests_failed"] == 0
    if policy == "fused":
        assert len(m["buckets_used"]) >= 3  # the batch grew and shrank
        assert (m["kv_moves"] > 0) == shuffle  # the shuffle ran (and only with shuffle)
    ran = {(phase, b) for (phase, b), n in engine.stats.runs.items() if n}
    assert {b.length for phase, b in ran if phase == "decode"} == {32, MAX_LEN}  # live prefix
    assert {b.batch for phase, b in ran if phase == "prefill"} > {1}  # batched prefills
    assert m["prefills"] == len(arrivals) > engine.stats.prefill_calls


def test_step_clock_replays_are_deterministic(palm, arrivals):
    _, _, engine = palm
    first = engine.serve(arrivals[:60], clock=StepClock(1e-3))
    again = engine.serve(arrivals[:60], clock=StepClock(1e-3))
    assert [(r.tokens, r.token_times_s) for r in first.results] == \
        [(r.tokens, r.token_times_s) for r in again.results]
    assert first.metrics["latency_s"] == again.metrics["latency_s"]


def test_padded_prefill_matches_the_unpadded_model(palm):
    model, params, engine = palm
    prompt = tuple(range(3, 14))  # 11 tokens, padded to 16
    r = engine.generate([prompt], max_tokens=1)[0]
    logits, cache = jax.jit(model.prefill)(params, jnp.array([prompt]), model.init_cache(1))
    assert r.tokens == [int(jnp.argmax(logits[0, -1]))]
    stored = engine.kv.read(0)  # slot 0's K/V, every layer, max_len positions
    for got, want in zip(jax.tree.leaves(stored), jax.tree.leaves(cache)):  # (K, S, D), (1, ...)
        np.testing.assert_allclose(np.asarray(got)[:, :11], np.asarray(want)[0, :, :11],
                                   rtol=1e-5, atol=1e-5)  # weights-first: summed in another order


def test_requests_admitted_together_are_prefilled_together(palm):
    model, params, engine = palm
    requests = random_requests(8, seed=9, long_tail=False)  # 8 slots: all admitted at once
    before = engine.stats.prefill_calls
    results = engine.generate(requests)
    # shortest first, as many per call as fit: one call of 8 rows if all pad to 16 tokens,
    # else the short ones together and the longer ones (padded to 64) together
    groups = engine.prefill_groups([type("P", (), {"prompt": r.prompt})() for r in requests])
    assert engine.stats.prefill_calls - before == len(groups) <= 2
    assert sum(len(g) for _, g in groups) == 8 and all(b.batch >= len(g) for b, g in groups)
    check_greedy(model, params, requests, results)


def test_tokens_stream_as_they_are_produced(palm):
    _, _, engine = palm
    seen = []
    a = engine.submit(Request(prompt=(1, 2, 3), max_tokens=6),
                      on_token=lambda rid, tok: seen.append((rid, tok)))
    b = engine.submit(Request(prompt=(9, 8), max_tokens=3))
    streamed = []
    for token in a:
        streamed.append(token)
        assert len(a.tokens) == len(streamed)  # one token at a time, not the whole result
        assert not a.done or len(streamed) == 6
    assert streamed == a.result().tokens and len(streamed) == 6
    assert seen == [(a.request_id, t) for t in streamed]
    assert b.done and len(b.result().tokens) == 3  # ran alongside
    r = a.result()
    assert r.ttft_s > 0 and r.latency_s >= r.ttft_s and len(r.token_times_s) == 6
    assert r.token_times_s == sorted(r.token_times_s)


def test_generate_and_sampling_are_deterministic_in_any_batch(palm):
    _, _, engine = palm
    prompts = [[5, 6, 7], [1], [200, 100, 3, 4], [42] * 9]
    settings = [SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=1.0,
                top_k=5, seed=2), SamplingParams(temperature=0.7, top_p=0.8, seed=3),
                SamplingParams()]
    requests = [Request(prompt=tuple(p), max_tokens=10, sampling=s)
                for p, s in zip(prompts, settings)]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    again = engine.generate(requests)
    assert [r.tokens for r in again] == [r.tokens for r in together]
    other_seed = engine.generate([Request(prompt=(5, 6, 7), max_tokens=10,
                                          sampling=SamplingParams(temperature=0.9, seed=99))])
    assert other_seed[0].tokens != together[0].tokens
    plain = engine.generate([[5, 6, 7]], max_tokens=4)
    assert plain[0].finish_reason == "length" and len(plain[0].tokens) == 4


def test_bad_requests_bounce_without_disturbing_requests_in_flight(palm):
    model, params, engine = palm
    good = random_requests(24, seed=5, long_tail=False)
    bad = [Request(prompt=()), Request(prompt=(1,) * 70), Request(prompt=(1, 256)),
           Request(prompt=(1,), max_tokens=0), Request(prompt=(1,) * 60, max_tokens=10),
           Request(prompt=(1,), sampling=SamplingParams(top_p=0.0)),
           Request(prompt=(1,), sampling=SamplingParams(temperature=-0.5))]
    handles = [engine.submit(r) for r in good[:12]]
    engine.step()
    engine.step()  # some are mid-flight now
    refused = [engine.submit(r) for r in bad]
    handles += [engine.submit(r) for r in good[12:]]
    assert all(h.done and h.result().finish_reason == "refused" for h in refused)
    reasons = [h.result().error for h in refused]
    for word, reason in zip(["empty", "longer than max_len", "vocabulary", "max_tokens",
                             "exceeds max_len", "top_p", "temperature"], reasons):
        assert word in reason
    check_greedy(model, params, good, [h.result() for h in handles])
    assert not engine.scheduler.has_work()
    engine.run_until_idle()


def test_full_slots_wait_and_the_queue_bound_refuses_clearly(palm):
    _, _, engine = palm
    engine.set_policy("fused", max_queue=4)
    try:
        def submit(n):
            return [engine.submit(Request(prompt=(i + 1,), max_tokens=20)) for i in range(n)]

        first = submit(12)
        assert [h.done for h in first] == [False] * 4 + [True] * 8  # only 4 may wait
        assert "queue full" in first[4].result().error and "max_queue=4" in first[4].result().error
        engine.step()  # the 4 are admitted: the queue has room again
        second = submit(8)
        assert [h.done for h in second] == [False] * 4 + [True] * 4
        engine.step()  # 8 slots now busy
        third = submit(4)
        engine.step()
        assert not any(h.done for h in third)
        assert len(engine.scheduler.waiting) == 4  # slots full: they wait, they are not lost
        engine.run_until_idle()
        accepted = first[:4] + second[:4] + third
        assert all(h.result().ok and len(h.result().tokens) == 20 for h in accepted)
        assert all(h.result().token_times_s[0] > first[0].result().token_times_s[0]
                   for h in third)  # they ran later
    finally:
        engine.run_until_idle()
        engine.set_policy("fused", max_queue=1024)


def test_soak_completed_plus_failed_equals_submitted(palm):
    _, _, engine = palm
    rng = random.Random(11)
    arrivals = []
    for i in range(2000):
        if i % 40 == 0:
            request = Request(prompt=(rng.randrange(300),) * 3, max_tokens=2)  # maybe invalid
        else:
            request = Request(prompt=tuple(rng.randrange(256) for _ in range(rng.randint(1, 6))),
                              max_tokens=rng.randint(1, 4))
        arrivals.append((i * 1e-5, request))  # far faster than the engine serves
    invalid = sum(any(t >= 256 for t in r.prompt) for _, r in arrivals)
    engine.set_policy("fused", max_queue=5000)
    try:
        m = engine.serve(arrivals).metrics
    finally:
        engine.set_policy("fused", max_queue=1024)
    assert m["requests_submitted"] == 2000
    assert m["requests_completed"] + m["requests_failed"] == 2000
    assert m["requests_failed"] == invalid > 0
    assert all("vocabulary" in reason for reason in m["failure_reasons"])


def test_wall_clock_serving_and_dynamic_waiting(palm):
    _, _, engine = palm
    w = make_workload(6, interval=0.01, out_len=(2, 4), prompt_len=(1, 4), max_len=MAX_LEN,
                      seed=3)
    engine.set_policy("dynamic", window_s=0.005)
    try:
        report = engine.serve(w, clock="wall")
    finally:
        engine.set_policy("fused")
    assert report.metrics["requests_completed"] == 6
    assert report.metrics["elapsed_s"] >= 0.05  # really waited for the arrivals
    # the first arrival finds the engine idle and waits out its window; later ones may arrive
    # while a batch runs and start as soon as it ends (their window has already passed)
    first = min(report.results, key=lambda r: r.arrival_s)
    assert first.token_times_s[0] - first.arrival_s >= 0.004


def test_hooks_see_every_bucket_and_layout_switches_are_counted(palm):
    model, params, _ = palm
    calls = []

    def compile_fn(phase, bucket):
        calls.append((phase, bucket))
        return jax.jit(model.fn(phase), donate_argnums=(2,))

    def planner_fn(phase, bucket):
        return "attention=batch" if phase == "decode" and bucket.batch >= 2 else "heads"

    engine = Engine(model, params, max_slots=2, kv_lengths=(MAX_LEN,), prefill_rows=(1,),
                    prefill_lengths=(MAX_LEN,), compile_fn=compile_fn,
                    planner_fn=planner_fn, progress=False)
    assert calls == [("decode", Bucket(1, MAX_LEN)), ("decode", Bucket(2, MAX_LEN)),
                     ("prefill", Bucket(1, MAX_LEN))]
    arrivals = [(0.0, Request(prompt=(1,), max_tokens=8)),
                (0.0, Request(prompt=(2,), max_tokens=2))]
    m = engine.serve(arrivals, clock=StepClock(1e-3)).metrics
    assert m["buckets_used"] == {"1": 6, "2": 1}
    assert m["layout_switches"] == 1  # bucket 2 -> 1 changed the layout once
    assert m["layouts"]["decode:2x64"] == "attention=batch"
    assert len(calls) == 3  # nothing compiled while serving


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_other_families_match_running_alone(name):
    model = build(get_config(name).replace(max_len=32))
    params = sharp_params(model, seed=1)
    engine = Engine(model, params, max_slots=2, prefill_lengths=(32,), progress=False)
    assert engine.kv_lengths == (32,) and engine.prefill_rows == (1, 2)
    requests = random_requests(60, seed=4, max_len=32, long_tail=False)
    requests = [r for r in requests if len(r.prompt) + r.max_tokens <= 32]
    arrivals = [((i // 3) * 0.05, r) for i, r in enumerate(requests)]  # groups of 3, lulls
    report = engine.serve(arrivals, clock=StepClock(1e-3))
    assert check_greedy(model, params, requests, report.results, max_len=32) <= 1
    assert report.metrics["kv_moves"] > 0


def test_batch_sharded_kv_cache_on_a_mesh():
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    model = build(get_config("palm-tiny").replace(max_len=32))
    params = sharp_params(model)
    engine = Engine(model, params, mesh=mesh, max_slots=2, prefill_lengths=(32,),
                    cache_sharding=batch_sharding(mesh, "batch"), progress=False)
    requests = random_requests(16, seed=8, max_len=32, long_tail=False)
    requests = [r for r in requests if len(r.prompt) + r.max_tokens <= 32]
    handles = [engine.submit(r) for r in requests]
    engine.step()
    engine.step()
    assert engine.kv.capacity == 2
    window = jax.tree.leaves(engine.kv.window(2, 32))[0]
    assert window.sharding.spec == jax.sharding.PartitionSpec("batch")
    results = [h.result() for h in handles]
    check_greedy(model, params, requests, results, max_len=32)


def test_engine_arguments_are_checked():
    with pytest.raises(ValueError, match="prefill_lengths"):
        Engine("palm-tiny", max_len=64, prefill_lengths=(16,), warmup=False)
    with pytest.raises(ValueError, match="policy"):
        Engine("palm-tiny", max_len=64, policy="eager", warmup=False)
    with pytest.raises(ValueError, match="prefill_lengths"):
        Engine("palm-tiny", max_len=64, prefill_lengths=(16, 128), warmup=False)
    with pytest.raises(ValueError, match="kv_lengths"):
        Engine("palm-tiny", max_len=64, kv_lengths=(32,), warmup=False)
    with pytest.raises(ValueError, match="prefill_rows"):
        Engine("palm-tiny", max_len=64, max_slots=4, prefill_rows=(1, 8), warmup=False)
    with pytest.raises(TypeError, match="preset name"):
        Engine(42, warmup=False)
    gpt2 = build(get_config("gpt2-tiny"))
    with pytest.raises(ValueError, match="learned position embeddings"):
        Engine(gpt2, gpt2.init_params(jax.random.PRNGKey(0)), max_len=256, warmup=False)


def test_int8_weights_serve_within_the_stated_bound():
    """`weights="int8"`: the steps compiled after quantize-int8 (weights converted once, int8
    values in engine.params); a prefill's logits within the pass's stated error bound of the
    float model's (max |error| <= 0.15 std of the logits)."""
    from meshwright.passes.quantize import Int8Weight

    model = build(get_config("llama-tiny").replace(max_len=32))
    params = model.init_params(jax.random.PRNGKey(0))  # the init the bound is stated for
    engine = Engine(model, params, max_slots=2, kv_lengths=(32,), prefill_rows=(1,),
                    prefill_lengths=(32,), weights="int8", progress=False)
    assert any("int8" in note for note in engine.notes)
    leaves = jax.tree.leaves(engine.params, is_leaf=lambda x: isinstance(x, Int8Weight))
    quantized = [w for w in leaves if isinstance(w, Int8Weight)]
    assert len(quantized) == 7 * model.config.n_layers
    assert all(w.values.dtype == jnp.int8 for w in quantized)
    prompt = np.array([[5, 9, 2, 7, 1, 3] + [0] * 26], np.int32)
    last = np.array([5], np.int32)
    step = engine._step_fn("prefill", Bucket(1, 32))
    got, _ = step(engine.params, prompt, model.init_cache(1, 32), last)
    want = model.logits(params, jnp.asarray(prompt))[0, 5]
    assert float(jnp.abs(got[0] - want).max()) <= 0.15 * float(want.std())
    results = engine.generate([[1, 2, 3], [4, 5]], max_tokens=5)
    assert [len(r.tokens) for r in results] == [5, 5]
    with pytest.raises(ValueError, match="only the quantized weights"):
        engine.model_params()


# ---------------------------------------------------------------------------------------------
# Abort and the loop in its own thread


def test_abort_frees_the_slot_at_the_next_iteration(palm):
    model, params, engine = palm
    engine.set_policy("fused")
    engine.reset_stats()
    requests = random_requests(10, seed=11, long_tail=False)
    long = [Request(prompt=(i + 1, 7), max_tokens=40) for i in range(8)]
    running = [engine.submit(r) for r in long]  # fill all 8 slots
    engine.step()
    engine.step()
    waiting = [engine.submit(r) for r in requests]
    victim, queued_victim = running[3], waiting[-1]
    assert engine.abort(victim.request_id) and queued_victim.abort()
    assert not engine.abort(victim.request_id)  # already being aborted
    assert not victim.done  # leaves at the next iteration, not before
    engine.step()
    assert victim.done and queued_victim.done and engine.stats.aborted == 2
    r = victim.result()
    assert r.finish_reason == "aborted" and len(r.tokens) == 2 and not r.ok
    assert queued_victim.result().tokens == []
    assert engine.scheduler.get(waiting[0].request_id).status == "running"  # took the slot
    for h in running:
        if h is not victim:
            h.abort()
    engine.step()
    assert not engine.abort(running[0].request_id)  # gone
    check_greedy(model, params, requests[:-1], [h.result() for h in waiting[:-1]])
    assert not engine.scheduler.has_work()
    engine.run_until_idle()


def test_the_loop_in_a_thread_serves_concurrent_submits_and_aborts(palm):
    """run_forever in one thread; eight threads submit, stream, and some abort mid-stream;
    everything ends exactly once, greedy outputs are each request's alone."""
    import threading

    model, params, engine = palm
    engine.set_policy("fused")
    engine.reset_stats()
    stop = threading.Event()
    steps = []
    loop = threading.Thread(target=engine.run_forever, args=(stop,),
                            kwargs={"on_step": steps.append})
    loop.start()
    requests = random_requests(64, seed=12, long_tail=True)
    results, finished, lock = {}, [], threading.Lock()

    def client(k):
        for i in range(k, len(requests), 8):
            abort_after = 3 if i % 5 == 0 and requests[i].max_tokens > 5 else None
            h = engine.submit(requests[i], on_finish=lambda r: finished.append(r.request_id))
            for n, _ in enumerate(h, 1):
                if n == abort_after:
                    h.abort()
            with lock:
                results[i] = (h.result(), abort_after)

    try:
        clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in clients)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive() and len(results) == 64
    assert sorted(finished) == sorted(r.request_id for r, _ in results.values())
    aborted = [i for i, (r, cut) in results.items() if r.finish_reason == "aborted"]
    cut = [i for i, (r, n) in results.items() if n is not None]
    assert aborted and set(aborted) <= set(cut) and engine.stats.aborted == len(aborted)
    for i in aborted:  # stopped early: a few tokens past the abort at most
        assert 3 <= len(results[i][0].tokens) < requests[i].max_tokens
    done = [i for i in results if i not in aborted]
    check_greedy(model, params, [requests[i] for i in done], [results[i][0] for i in done])
    assert steps and all(s > 0 for s in steps) and not engine.scheduler.has_work()
    assert engine.generate([[1, 2, 3]], max_tokens=2)[0].ok  # single-threaded use again


def test_the_loop_takes_work_in_its_own_thread_through_idle_wait(palm):
    """run_forever with idle_wait and after_iteration: requests arrive by another way than a
    thread's submit (here a list, as the engine process's pipe) and the loop's own thread
    submits them, between iterations and while it waits; every one ends with its greedy
    tokens, and the loop waits through idle_wait only (never on its own condition)."""
    import threading

    model, params, engine = palm
    engine.set_policy("fused")
    incoming = random_requests(12, seed=21)
    arrive_at = {0: incoming[:3], 2: incoming[3:8], 9: incoming[8:]}  # by iteration
    stop, results, waits, loop_thread = threading.Event(), {}, [], []
    iterations = [0]
    deadline = time.monotonic() + 120

    def take(timeout: float = 0.0) -> None:
        for r in arrive_at.pop(iterations[0], []):
            i = incoming.index(r)
            engine.submit(r, on_finish=lambda res, i=i: results.__setitem__(i, res))
        loop_thread.append(threading.get_ident())
        if len(results) == len(incoming) or time.monotonic() > deadline:  # (a hang: fail)
            stop.set()

    def after(waits_: bool) -> None:
        iterations[0] += 1
        take()

    def idle(timeout: float) -> None:  # nothing to run: time passes to the next arrival
        waits.append(timeout)
        if arrive_at:
            iterations[0] = max(iterations[0], min(arrive_at))
        take(timeout)

    engine.run_forever(stop, after_iteration=after, idle_wait=idle)  # in this thread
    assert sorted(results) == list(range(len(incoming))) and not arrive_at
    assert set(loop_thread) == {threading.get_ident()}
    assert waits  # it waited for work through idle_wait
    check_greedy(model, params, incoming, [results[i] for i in range(len(incoming))])


def test_a_prefill_calls_first_tokens_go_out_when_the_call_ends(palm):
    """Three prompts admitted in one iteration, prefilled in two calls (lengths 5 and 6 share
    a 16-token bucket; 40 needs the long one): the first call's tokens are handed out, and
    stamped, before the second call runs; the decode step comes after both."""
    from meshwright.runtime.scheduler import Prefill

    _, _, engine = palm
    prompts = [tuple(range(1, 6)), tuple(range(1, 7)), tuple(range(1, 41))]
    groups = engine.prefill_groups([Prefill(i, i, p) for i, p in enumerate(prompts)])
    assert [len(g) for _, g in groups] == [2, 1]
    arrivals = [(0.0, Request(prompt=p, max_tokens=3)) for p in prompts]
    report = engine.serve(arrivals, clock="virtual", progress=False)
    first = [r.token_times_s[0] for r in report.results]
    second = [r.token_times_s[1] for r in report.results]
    assert first[0] == first[1] < first[2]  # one call, then the other
    assert max(first) < min(second)  # both calls before the first decode step
    assert [r.ttft_s for r in report.results] == [t - r.arrival_s
                                                  for t, r in zip(first, report.results)]
