"""The serving engine in a multi-process job: one process decides, every process computes.

    >>> import meshwright as mw                                          # doctest: +SKIP
    >>> mw.distributed.initialize()
    >>> served = distributed_sharded_engine(model, params, max_slots=4, max_len=64)
    >>> engine = served.engine
    >>> if engine.is_leader:
    ...     report = engine.serve(workload)       # requests go to process 0 only
    ...     engine.stop_followers()
    ... else:
    ...     engine.follow()                        # until the leader stops it

As Flover does with its broadcasts: the leader (process 0) takes the requests, runs the
scheduler, and broadcasts every iteration -- the requests submitted since the last one, the
time, and the decision (admissions with their slots, the bucket, the memory shuffle's moves,
the decode rows with their tokens and positions). Every follower feeds the same submissions
to its own copy of the scheduler (a deterministic state machine), checks that it decides the
same, and carries the decision out on its devices: the same sharded programs, in the same
order, so their collectives meet. After each step the leader broadcasts the tokens it
sampled, and every process records those, so all stay in step even if sampling could differ
in the last bit. Results come back on the leader. Policy changes are broadcast too.

The model steps' logits are gathered to the host of every process (an all-gather across
processes) before sampling; the KV cache stays sharded where the layout puts it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from meshwright.runtime import distributed as dist
from meshwright.runtime.engine import Engine
from meshwright.runtime.request import Request, SamplingParams
from meshwright.runtime.scheduler import SchedulerOutput


def decision(out: SchedulerOutput) -> dict:
    """The parts of a scheduling decision the devices act on, as JSON-able data."""
    return json.loads(json.dumps({
        "step": out.step, "bucket": out.bucket, "moves": out.moves,
        "prefills": [[p.request_id, p.slot, list(p.prompt)] for p in out.prefills],
        "decode_slots": out.decode_slots, "decode_ids": out.decode_ids,
        "tokens": out.tokens, "positions": out.positions, "idle": out.idle}))


def encode_request(request: Request) -> dict | None:
    """A request as JSON-able data; None when it cannot be (it will be refused anyway)."""
    try:
        data = {"prompt": [int(t) for t in request.prompt], "max_tokens": int(request.max_tokens),
                "sampling": asdict(request.sampling),
                "stop_tokens": [int(t) for t in request.stop_tokens], "name": request.name}
        json.dumps(data)
        return data
    except (TypeError, ValueError, AttributeError):
        return None


def decode_request(data: dict | None) -> Request:
    if data is None:  # refused on the leader: an empty prompt is refused here too
        return Request(prompt=())
    return Request(prompt=tuple(data["prompt"]), max_tokens=data["max_tokens"],
                   sampling=SamplingParams(**data["sampling"]),
                   stop_tokens=tuple(data["stop_tokens"]), name=data["name"])


class DistributedEngine(Engine):
    """`Engine` for every process of a multi-process job (see the module docstring).

    Construct it the same way on every process (same model, params, buckets, compile_fn:
    the start-up compiles and warm-up calls are collective). Then the leader submits and
    serves as with `Engine`, and calls `stop_followers()` at the end; the other processes
    call `follow()`. In a one-process job it is a plain Engine.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.process = dist.info()
        self._submissions: list[dict] = []
        self._ready = False  # set_policy broadcasts only once every process is constructed
        super().__init__(*args, **kwargs)
        self._ready = True

    @property
    def is_leader(self) -> bool:
        return self.process.is_leader

    @property
    def _multi(self) -> bool:
        return self.process.num_processes > 1

    # ---- the leader ---------------------------------------------------------------------
    def submit(self, request: Request, on_token: Callable[[int, int], None] | None = None, *,
               arrival_s: float | None = None):
        if self._multi and not self.is_leader:
            raise dist.DistributedError(
                f"requests go to process 0; process {self.process.process_id} only follows "
                "(call engine.follow() there)")
        now = self.clock.now() if arrival_s is None else arrival_s
        if self._multi:
            self._submissions.append({"request": encode_request(request), "arrival_s": now})
        return super().submit(request, on_token, arrival_s=now)

    def set_policy(self, policy: str, *, shuffle: bool = True, window_s: float | None = None,
                   max_queue: int | None = None) -> None:
        super().set_policy(policy, shuffle=shuffle, window_s=window_s, max_queue=max_queue)
        if self._ready and self._multi and self.is_leader:
            dist.broadcast({"op": "policy", "policy": policy, "shuffle": shuffle,
                            "window_s": window_s, "max_queue": max_queue})

    def step(self) -> float | None:
        """One iteration, as `Engine.step`, with the decision and the sampled tokens
        broadcast to the followers."""
        if not self._multi:
            return super().step()
        if not self.is_leader:
            raise dist.DistributedError("only process 0 steps the engine; the others follow()")
        with self.clock.compute():
            now = self.clock.now()
            out = self.scheduler.schedule(now)
            submissions, self._submissions = self._submissions, []
            dist.broadcast({"op": "step", "now": now, "submit": submissions,
                            "decision": decision(out)})
            if out.idle:
                self.scheduler.update(out, {}, now)
                return out.wait_until
            with dist.guard(f"step {out.step} (bucket {out.bucket})"):
                sampled = self._run(out)
        now = self.clock.now()
        dist.broadcast({"tokens": [[rid, int(t)] for rid, t in sampled.items()], "now": now})
        self._finish_step(out, sampled, now)
        return None

    def stop_followers(self) -> None:
        """Tell the followers to return from `follow()` (leader; a no-op in one process)."""
        if self._multi and self.is_leader:
            dist.broadcast({"op": "stop"})

    # ---- the followers ------------------------------------------------------------------
    def follow(self) -> int:
        """Carry out the leader's decisions until it calls `stop_followers()`; returns the
        number of iterations followed."""
        if not self._multi or self.is_leader:
            raise dist.DistributedError("follow() is for processes other than process 0")
        steps = 0
        while True:
            msg = dist.broadcast(what="the next scheduling decision")
            op = msg["op"]
            if op == "stop":
                return steps
            if op == "policy":
                Engine.set_policy(self, msg["policy"], shuffle=msg["shuffle"],
                                  window_s=msg["window_s"], max_queue=msg["max_queue"])
                continue
            for s in msg["submit"]:
                self.scheduler.submit(decode_request(s["request"]), s["arrival_s"])
            out = self.scheduler.schedule(msg["now"])
            mine = decision(out)
            if mine != msg["decision"]:
                raise dist.DistributedError(
                    f"process {self.process.process_id} scheduled step {out.step} differently "
                    f"from process 0: {mine} != {msg['decision']} (the processes' schedulers "
                    "were given different requests or settings)")
            if out.idle:
                self.scheduler.update(out, {}, msg["now"])
                continue
            with dist.guard(f"step {out.step} (bucket {out.bucket})"):
                self._run(out)  # the same programs as the leader; its tokens are the ones kept
            tokens = dist.broadcast(what=f"the tokens sampled at step {out.step}")
            self.scheduler.update(out, {rid: t for rid, t in tokens["tokens"]}, tokens["now"])
            self.stats.steps += 1
            steps += 1


# ---------------------------------------------------------------------------------------------
# Building one: every bucket through mw.shard on a mesh over every process's devices


class _GatheredStep:
    """A compiled step whose logits come back as numpy on every process (the KV cache stays
    where the layout puts it)."""

    def __init__(self, step) -> None:
        self.step = step

    def __call__(self, *args):
        logits, cache = self.step(*args)
        return dist.gather(logits), cache


def distributed_sharded_engine(model, params: dict, devices: Sequence | None = None, *,
                               pin: dict | None = None, max_slots: int = 8, max_len: int = 128,
                               **engine_kwargs: Any):
    """A sharded engine for a multi-process job, on `runtime.layouts`' pinned build
    (`compile_buckets`): every bucket `mw.shard`-compiled on one mesh over `devices` (default:
    `jax.devices()`, every process's) in one pinned layout, the weights put in it once (each
    process builds only its own devices' blocks), and a `DistributedEngine` on top. The
    buckets are the engine's (`kv_lengths`, `prefill_rows`, `prefill_lengths`,
    `prefill_tokens` among `engine_kwargs`). Returns a `layouts.ShardedEngine` record."""
    import jax
    from meshwright.runtime.layouts import ShardedEngine, choose_pin, compile_buckets, plan_for

    import meshwright as mw

    devices = list(devices if devices is not None else jax.devices())
    engine = DistributedEngine(model, params, max_slots=max_slots, max_len=max_len,
                               warmup=False, **{"progress": False, **engine_kwargs})
    model = engine.model  # layers unrolled when they were a scan
    buckets = engine.buckets()
    if pin is None:
        pin, _ = choose_pin(plan_for(model.config, phase="decode", batch=max_slots,
                                     context=max_len, devices=devices))
    mesh = mw.make_mesh(pin["mesh"], devices)
    compiled = compile_buckets(model, engine.params, mesh, buckets, pin=pin)
    biggest = compiled[max(k for k in compiled if k[0] == "decode")]
    moved = [f"{c.phase} {c.batch}x{c.length}" for c in compiled.values()
             if jax.tree.leaves(c.specs[0]) != jax.tree.leaves(biggest.specs[0])]
    jmesh = biggest.mesh
    engine.params = jax.tree.map(
        lambda x, s: dist.put(x, jax.sharding.NamedSharding(jmesh, s)), engine.params,
        biggest.specs[0])
    cache_specs = {(c.batch, c.length): c.specs[2] for c in compiled.values()
                   if c.phase == "decode"}
    store_spec = biggest.specs[2]

    def cache_sharding(capacity: int, length: int):
        spec = cache_specs.get((capacity, length), store_spec)
        return jax.tree.map(lambda s: jax.sharding.NamedSharding(jmesh, s), spec)

    runners = {key: _GatheredStep(c.step) for key, c in compiled.items()}
    engine.compile_fn = lambda phase, bucket: runners[(phase, bucket)]
    engine.planner_fn = lambda phase, bucket: compiled[(phase, bucket)].compiled
    engine.set_cache_sharding(cache_sharding)
    engine.compile_all(progress=False)
    return ShardedEngine(engine, compiled, moved)
