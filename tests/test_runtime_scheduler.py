"""The scheduler, device-free: thousands of requests through a fake model and a fake KV cache.

The fake model is a deterministic function of the keys a row can see (KV positions
0..position of its own slot), so a wrong slot, a lost or stale KV row after a move or a bucket
shrink, an idle row writing over live data, or a wrong position all change the tokens, and
the comparison with each request run alone catches it.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshwright.runtime.request import Request, Result, SamplingParams
from meshwright.runtime.scheduler import (
    Scheduler,
    bucket_for,
    bucket_sizes,
    plan_moves,
)

VOCAB = 97
MAX_LEN = 48
GARBAGE = -1  # what padding and idle rows leave in the fake KV cache


def next_token(seen: list[int]) -> int:
    """The fake model: a hash of every key the row attends to."""
    return hash(tuple(seen)) % VOCAB


def run_alone(request: Request) -> list[int]:
    """The reference: the request on its own, no cache, no slots."""
    seq, out = list(request.prompt), []
    while True:
        token = next_token(seq)
        out.append(token)
        if token in request.stop_tokens or len(out) == request.max_tokens:
            return out
        seq.append(token)


class FakeRunner:
    """Carries out SchedulerOutputs on Python lists the way the engine does on device."""

    def __init__(self, max_len: int = MAX_LEN, pad_to: int = 8):
        self.rows: list[list[int | None]] = []  # one per slot on "device": the bucket
        self.max_len, self.pad_to = max_len, pad_to

    def run(self, out) -> dict[int, int]:
        if out.bucket > len(self.rows):
            self.rows += [[None] * self.max_len for _ in range(out.bucket - len(self.rows))]
        for src, dst in out.moves:
            self.rows[dst] = list(self.rows[src])
            self.rows[src] = [GARBAGE] * self.max_len  # stale: must never be read again
        if 0 < out.bucket < len(self.rows):
            del self.rows[out.bucket:]  # the slots of a smaller bucket are gone
        sampled = {}
        for p in out.prefills:
            T = len(p.prompt)
            padded = min(self.max_len, -(-T // self.pad_to) * self.pad_to)
            self.rows[p.slot][:padded] = list(p.prompt) + [GARBAGE] * (padded - T)
            sampled[p.request_id] = next_token(self.rows[p.slot][:T])
        if out.decode_slots:
            assert len(out.tokens) == len(out.positions) == out.bucket == len(self.rows)
            for row, (token, pos) in enumerate(zip(out.tokens, out.positions)):
                self.rows[row][pos] = token  # every row of the bucket writes, like decode_step
            for slot, request_id in zip(out.decode_slots, out.decode_ids):
                seen = self.rows[slot][:out.positions[slot] + 1]
                assert GARBAGE not in seen and None not in seen, (out.step, slot, seen)
                sampled[request_id] = next_token(seen)
        return sampled


def random_request(rng: random.Random, max_len: int = MAX_LEN) -> Request:
    n_prompt = rng.randint(1, 12)
    max_tokens = rng.randint(1, max_len - n_prompt)
    if rng.random() < 0.6:
        max_tokens = rng.randint(1, min(12, max_tokens))
    stops = tuple(rng.sample(range(VOCAB), rng.choice([0, 0, 1, 3])))
    return Request(prompt=tuple(rng.randrange(VOCAB) for _ in range(n_prompt)),
                   max_tokens=max_tokens, stop_tokens=stops)


def drive(scheduler: Scheduler, arrivals: list[tuple[float, Request]],
          check_step=None) -> dict[int, Result]:
    """Replay arrivals on a clock that advances one unit per iteration."""
    runner, results = FakeRunner(max_len=scheduler.max_len or MAX_LEN), {}
    now, i = 0.0, 0
    arrivals = sorted(arrivals, key=lambda a: a[0])
    while i < len(arrivals) or scheduler.has_work():
        while i < len(arrivals) and arrivals[i][0] <= now:
            state = scheduler.submit(arrivals[i][1], now=arrivals[i][0])
            if isinstance(state, Result):
                results[state.request_id] = state
            i += 1
        before = {s.slot: s.request_id for s in scheduler.running}
        out = scheduler.schedule(now)
        if check_step is not None:
            check_step(scheduler, out, before)
        sampled = runner.run(out)
        for result in scheduler.update(out, sampled, now + 1):
            results[result.request_id] = result
        if out.idle:
            nxt = arrivals[i][0] if i < len(arrivals) else now + 1
            now = max(now + 1, min(nxt, out.wait_until or nxt))
        else:
            now += 1
    return results


def poisson_arrivals(rng: random.Random, n: int, per_step: float) -> list:
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, random_request(rng)))
        t += rng.expovariate(per_step)
    return out


def check_fused_step(scheduler, out, before):
    """fused + shuffle: smallest bucket, every live row inside it, fewest moves."""
    live = [s.slot for s in scheduler.running]
    assert out.bucket == bucket_for(len(live), scheduler.max_slots)
    assert all(slot < out.bucket for slot in live)
    assert len(out.moves) == sum(slot >= out.bucket for slot in before)  # the lower bound
    assert sorted(out.decode_ids) == sorted(before.values())  # nobody skips a step


# ---------------------------------------------------------------------------------------------
# Thousands of requests: each one's tokens equal the request run alone


@pytest.mark.parametrize("policy,shuffle,max_slots", [
    ("fused", True, 8), ("fused", True, 6), ("fused", False, 8), ("static", True, 8),
    ("dynamic", True, 4)])
def test_many_requests_match_running_alone(policy, shuffle, max_slots):
    rng = random.Random(f"{policy}-{shuffle}-{max_slots}")
    arrivals = []
    for per_step in (3.0, 0.4, 0.25, 3.0, 0.4, 0.25):  # bursts above capacity, then lulls
        burst = poisson_arrivals(rng, 150, per_step=per_step)
        start = max((t for t, _ in arrivals), default=0.0) + 1
        arrivals += [(start + t, r) for t, r in burst]
    s = Scheduler(max_slots, max_queue=10_000, policy=policy, window_s=3.0, shuffle=shuffle,
                  max_len=MAX_LEN, vocab_size=VOCAB)
    moves = []
    check = check_fused_step if (policy, shuffle) == ("fused", True) else None

    def count_moves(scheduler, out, before):
        moves.append(len(out.moves))
        if check:
            check(scheduler, out, before)

    results = drive(s, arrivals, count_moves)
    assert len(results) == len(arrivals)
    by_id = sorted(results.values(), key=lambda r: r.request_id)
    for (_, request), result in zip(sorted(arrivals, key=lambda a: a[0]), by_id):
        assert result.ok, result.error
        assert result.tokens == run_alone(request), result.request_id
        assert result.finish_reason == ("stop" if result.tokens[-1] in request.stop_tokens
                                        else "length")
        assert len(result.token_times_s) == len(result.tokens)
    if check:
        assert sum(moves) > 50  # the shuffle really ran
    else:
        assert sum(moves) == 0


def test_fused_admits_at_the_next_iteration_and_leaves_at_once():
    s = Scheduler(4, policy="fused", max_len=MAX_LEN, vocab_size=VOCAB)
    long = s.submit(Request(prompt=(1,), max_tokens=10), now=0).request_id
    out = s.schedule(0)
    s.update(out, {long: 5}, 0)
    out = s.schedule(1)
    assert out.decode_ids == [long]
    late = s.submit(Request(prompt=(2, 3), max_tokens=2), now=1.5).request_id
    s.update(out, {long: 5}, 1.9)
    out = s.schedule(2)  # the late request is prefilled while the long one decodes
    assert [p.request_id for p in out.prefills] == [late] and out.decode_ids == [long]
    s.update(out, {late: 7, long: 5}, 2.5)
    out = s.schedule(3)
    assert sorted(out.decode_ids) == sorted([long, late])
    done = s.update(out, {late: 8, long: 5}, 3.5)
    assert [(r.request_id, r.tokens, r.finish_reason) for r in done] == [(late, [7, 8], "length")]
    assert s.schedule(4).decode_ids == [long]


def test_static_runs_a_batch_to_the_end_without_joins():
    s = Scheduler(4, policy="static", max_len=MAX_LEN, vocab_size=VOCAB)
    a = s.submit(Request(prompt=(1,), max_tokens=1), now=0).request_id
    b = s.submit(Request(prompt=(1,), max_tokens=3), now=0).request_id
    out = s.schedule(0)
    assert out.bucket == 2 and len(out.prefills) == 2
    done = s.update(out, {a: 1, b: 1}, 1)
    assert [r.request_id for r in done] == [a]  # delivered at once
    c = s.submit(Request(prompt=(1,), max_tokens=1), now=1).request_id
    for t in (1, 2):
        out = s.schedule(t)
        assert out.prefills == [] and out.decode_ids == [b] and out.bucket == 2
        s.update(out, {b: 1}, t + 1)
    out = s.schedule(3)  # the batch is over: c starts a new one
    assert [p.request_id for p in out.prefills] == [c] and out.bucket == 1


def test_dynamic_waits_for_its_window_or_a_full_batch():
    s = Scheduler(2, policy="dynamic", window_s=1.0, max_len=MAX_LEN, vocab_size=VOCAB)
    s.submit(Request(prompt=(1,), max_tokens=1), now=0.0)
    out = s.schedule(0.5)
    assert out.idle and out.wait_until == 1.0
    s.update(out, {}, 0.5)
    out = s.schedule(1.0)
    assert len(out.prefills) == 1
    s.update(out, {out.prefills[0].request_id: 3}, 1.0)
    s.submit(Request(prompt=(1,), max_tokens=1), now=2.0)
    s.submit(Request(prompt=(1,), max_tokens=1), now=2.1)
    out = s.schedule(2.1)  # max_slots are waiting: no need to wait for the window
    assert len(out.prefills) == 2


# ---------------------------------------------------------------------------------------------
# Memory shuffle: minimal against brute force


def brute_force_moves(occupied: set[int], window: int, offsets) -> int:
    """Fewest live requests whose slot changes, over every placement of all of them inside
    one candidate window (every injective assignment, tried exhaustively)."""
    live = sorted(occupied)
    best = None
    for o in offsets:
        for target in itertools.permutations(range(o, o + window), len(live)):
            moved = sum(a != b for a, b in zip(live, target))
            best = moved if best is None else min(best, moved)
    return best


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1)), st.integers(1, n), st.booleans())))
def test_plan_moves_is_minimal(case):
    n_slots, occupied, window, sliding = case
    if len(occupied) > window:
        with pytest.raises(ValueError, match="do not fit"):
            plan_moves(occupied, window)
        return
    offsets = list(range(n_slots - window + 1)) if sliding else [0]
    offset, moves = plan_moves(occupied, window, offsets)
    assert len(moves) == brute_force_moves(occupied, window, offsets)
    slots = set(occupied)
    for src, dst in moves:  # applied in order: a live source, a free destination
        assert src in slots and dst not in slots
        slots = (slots - {src}) | {dst}
    assert all(offset <= s < offset + window for s in slots) and len(slots) == len(occupied)


def test_flover_sliding_window_prefers_the_fullest_window():
    assert plan_moves({1, 4, 5, 6}, 4, range(5)) == (3, [(1, 3)])
    assert plan_moves({1, 4, 5, 6}, 4) == (0, [(4, 0), (5, 2), (6, 3)])


def test_buckets():
    assert bucket_sizes(8) == (1, 2, 4, 8) and bucket_sizes(1) == (1,)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(n, 8) for n in range(9)] == [0, 1, 2, 4, 4, 8, 8, 8, 8]


def test_shuffle_moves_the_fewest_when_a_middle_request_finishes():
    s = Scheduler(8, policy="fused", max_len=MAX_LEN, vocab_size=VOCAB)
    ids = [s.submit(Request(prompt=(1,), max_tokens=2 if i in (1, 2, 3) else 9), now=0)
           .request_id for i in range(5)]
    out = s.schedule(0)
    assert out.bucket == 8
    s.update(out, dict.fromkeys(ids, 0), 0)
    out = s.schedule(1)
    done = s.update(out, dict.fromkeys(ids, 0), 1)  # slots 1, 2, 3 finish: 0 and 4 remain
    assert sorted(r.request_id for r in done) == ids[1:4]
    out = s.schedule(2)
    assert out.bucket == 2 and out.moves == [(4, 1)]  # one move, not two
    assert out.decode_slots == [0, 1] and out.positions == [2, 2]


# ---------------------------------------------------------------------------------------------
# Refusals, waiting, the bounded queue


BAD = [
    (Request(prompt=()), "empty prompt"),
    (Request(prompt=(1,) * 49, max_tokens=1), "longer than max_len"),
    (Request(prompt=(1,) * 40, max_tokens=9), "exceeds max_len"),
    (Request(prompt=(1, VOCAB)), "outside the vocabulary"),
    (Request(prompt=(1, -3)), "outside the vocabulary"),
    (Request(prompt=(1, 2.5)), "must be integers"),
    (Request(prompt=(1,), max_tokens=0), "max_tokens"),
    (Request(prompt=(1,), sampling=SamplingParams(top_p=0.0)), "top_p"),
    (Request(prompt=(1,), sampling=SamplingParams(top_p=1.5)), "top_p"),
    (Request(prompt=(1,), sampling=SamplingParams(temperature=-1.0)), "temperature"),
    (Request(prompt=(1,), sampling=SamplingParams(temperature=float("nan"))), "temperature"),
    (Request(prompt=(1,), sampling=SamplingParams(top_k=-2)), "top_k"),
    (Request(prompt=(1,), sampling=SamplingParams(seed=-1)), "seed"),
    (Request(prompt=(1,), stop_tokens=(VOCAB + 5,)), "stop token"),
    (Request(prompt=None), "sequence of token ids"),
    ("not a request", "expected a Request"),
]


@pytest.mark.parametrize("request_,reason", BAD, ids=[r for _, r in BAD])
def test_bad_requests_are_refused_with_a_reason(request_, reason):
    s = Scheduler(2, max_len=MAX_LEN, vocab_size=VOCAB)
    result = s.submit(request_, now=1.0)
    assert isinstance(result, Result) and result.finish_reason == "refused"
    assert reason in result.error and not result.ok
    out = s.schedule(1.0)
    assert out.refused == [(result.request_id, result.error)] and out.idle


def test_bad_requests_do_not_disturb_requests_in_flight():
    rng = random.Random(7)
    good = poisson_arrivals(rng, 300, per_step=1.5)
    bad = [(rng.uniform(0, 200), request) for request, _ in BAD for _ in range(3)]
    s = Scheduler(4, max_queue=10_000, max_len=MAX_LEN, vocab_size=VOCAB)
    results = drive(s, good + bad, check_fused_step)
    assert len(results) == len(good) + len(bad)
    refused = [r for r in results.values() if not r.ok]
    assert len(refused) == len(bad)
    outputs = sorted(tuple(r.tokens) for r in results.values() if r.ok)
    assert outputs == sorted(tuple(run_alone(req)) for _, req in good)


def test_full_slots_make_requests_wait_and_the_queue_is_bounded():
    s = Scheduler(1, max_queue=2, policy="fused", max_len=MAX_LEN, vocab_size=VOCAB)
    first = s.submit(Request(prompt=(1,), max_tokens=2), now=0)
    out = s.schedule(0)
    s.update(out, {first.request_id: 4}, 0)
    waiting = [s.submit(Request(prompt=(2,), max_tokens=1), now=0.1) for _ in range(2)]
    assert all(w.status == "waiting" for w in waiting)
    over = s.submit(Request(prompt=(3,), max_tokens=1), now=0.2)
    assert over.finish_reason == "refused" and "queue full" in over.error
    assert "max_queue=2" in over.error
    out = s.schedule(1)  # slot busy: still waiting
    assert out.prefills == [] and out.decode_ids == [first.request_id]
    done = s.update(out, {first.request_id: 4}, 1)
    assert done[0].request_id == first.request_id
    served = []
    for t in range(2, 6):
        out = s.schedule(t)
        served += [p.request_id for p in out.prefills]
        s.update(out, {p.request_id: 0 for p in out.prefills}, t)
    assert served == [w.request_id for w in waiting]  # first come, first served
    assert not s.has_work()


def test_soak_nothing_is_lost():
    """Many short requests far above capacity, with some invalid ones: completed + refused ==
    submitted, and only the invalid ones are refused."""
    rng = random.Random(3)
    arrivals = []
    for i in range(2000):
        if i % 50 == 0:
            arrivals.append((i * 0.1, Request(prompt=())))
        else:
            arrivals.append((i * 0.1, Request(prompt=(rng.randrange(VOCAB),),
                                              max_tokens=rng.randint(1, 4))))
    s = Scheduler(8, max_queue=5000, max_len=MAX_LEN, vocab_size=VOCAB)
    results = drive(s, arrivals, check_fused_step)
    completed = sum(r.ok for r in results.values())
    failed = [r for r in results.values() if not r.ok]
    assert completed + len(failed) == len(arrivals)
    assert len(failed) == 40 and all("empty prompt" in r.error for r in failed)


def test_protocol_errors_are_clear():
    s = Scheduler(2, max_len=MAX_LEN, vocab_size=VOCAB)
    rid = s.submit(Request(prompt=(1,), max_tokens=3), now=0).request_id
    out = s.schedule(0)
    with pytest.raises(RuntimeError, match="without update"):
        s.schedule(0)
    with pytest.raises(ValueError, match=r"missing for requests \[0\]"):
        s.update(out, {}, 0)
    with pytest.raises(ValueError, match="unexpected"):
        s.update(out, {rid: 1, 99: 2}, 0)
    s.update(out, {rid: 1}, 0)
    with pytest.raises(ValueError, match="policy"):
        Scheduler(2, policy="greedy")


def test_the_scheduler_is_device_free():
    import subprocess
    import sys

    code = ("import sys; from meshwright.runtime.scheduler import Scheduler; "
            "from meshwright.runtime.request import Request; "
            "assert 'jax' not in sys.modules, 'the scheduler imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Aborts: a waiting or running request leaves between iterations, its slot free at once


@pytest.mark.parametrize("policy,shuffle", [("fused", True), ("fused", False), ("static", True),
                                            ("dynamic", True)])
def test_aborts_free_slots_and_never_disturb_the_others(policy, shuffle):
    rng = random.Random(f"abort-{policy}-{shuffle}")
    s = Scheduler(6, max_queue=10_000, policy=policy, window_s=3.0, shuffle=shuffle,
                  max_len=MAX_LEN, vocab_size=VOCAB)
    arrivals = poisson_arrivals(rng, 600, per_step=0.8)
    runner, results, submitted = FakeRunner(), {}, {}
    now, i, aborted_running = 0.0, 0, 0
    while i < len(arrivals) or s.has_work():
        while i < len(arrivals) and arrivals[i][0] <= now:
            state = s.submit(arrivals[i][1], now=now)
            submitted[state.request_id] = arrivals[i][1]
            i += 1
        waiting = [st.request_id for st in s.waiting]
        running = [st.request_id for st in s.running]
        if (waiting or running) and rng.random() < 0.15:
            victim = rng.choice(running if running and (rng.random() < 0.5 or not waiting)
                                else waiting)
            was_running = any(st.request_id == victim for st in s.running)
            result = s.abort(victim, now)
            assert result.finish_reason == "aborted" and not result.ok
            assert s.get(victim) is None and s.abort(victim, now) is None  # gone, once
            assert all(st is None or st.request_id != victim for st in s.slots)
            results[victim] = result
            aborted_running += was_running
        before = {st.slot: st.request_id for st in s.running}
        out = s.schedule(now)
        if policy == "fused" and shuffle:
            check_fused_step(s, out, before)  # the freed slot counts as free at once
        for result in s.update(out, runner.run(out), now + 1):
            results[result.request_id] = result
        now = max(now + 1, out.wait_until or 0)
    assert sorted(results) == sorted(submitted)  # every request ends exactly once
    aborted = [r for r in results.values() if r.finish_reason == "aborted"]
    assert len(aborted) > 30 and aborted_running > 10
    for rid, result in results.items():
        alone = run_alone(submitted[rid])
        if result.finish_reason == "aborted":
            assert result.tokens == alone[:len(result.tokens)]  # what it had, not more
        else:
            assert result.tokens == alone, rid


def test_abort_reports_and_frees_the_slot_at_the_next_schedule():
    s = Scheduler(2, max_len=MAX_LEN, vocab_size=VOCAB)
    a, b, c = (s.submit(Request(prompt=(i + 1,), max_tokens=20), now=0).request_id
               for i in range(3))
    out = s.schedule(0)
    assert [p.request_id for p in out.prefills] == [a, b]  # c waits: both slots taken
    with pytest.raises(RuntimeError, match="between schedule"):
        s.abort(a, 0)
    s.update(out, {a: 5, b: 6}, 1)
    assert s.abort(a, 1).tokens == [5]
    assert s.abort(99, 1) is None
    out = s.schedule(1)
    assert out.aborted == [a]
    assert [(p.request_id, p.slot) for p in out.prefills] == [(c, 0)]  # a's slot, reused
    s.update(out, {c: 7, b: 8}, 2)
    assert s.abort(b, 2).tokens == [6, 8] and s.abort(c, 2).tokens == [7]
    assert not s.has_work() and s.schedule(2).bucket == 0


def test_static_batch_keeps_its_bucket_until_its_last_member_is_gone():
    s = Scheduler(4, policy="static", max_len=MAX_LEN, vocab_size=VOCAB)
    ids = [s.submit(Request(prompt=(i + 1,), max_tokens=30), now=0).request_id
           for i in range(5)]
    out = s.schedule(0)
    s.update(out, {p.request_id: 1 for p in out.prefills}, 1)
    s.abort(ids[0], 1)
    out = s.schedule(1)
    assert out.bucket == 4 and not out.prefills  # the batch runs on; nobody joins it
    s.update(out, dict.fromkeys(out.decode_ids, 1), 2)
    for rid in ids[1:4]:
        s.abort(rid, 2)
    out = s.schedule(2)
    assert [p.request_id for p in out.prefills] == [ids[4]] and out.bucket == 1
