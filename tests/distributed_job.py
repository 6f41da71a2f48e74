"""One process of the multi-process jobs in test_distributed.py (run by `meshwright launch`).

    python tests/distributed_job.py OUT_DIR layouts=0,1,2 serve checkpoint   # parts to run
    meshwright launch -n 2 --devices-per-process 4 -- \
        python tests/distributed_job.py OUT_DIR every-layout                   # all 30, by hand

Every process runs the same parts in the same order and writes what it measured to
OUT_DIR/resultN.json: for each layout, the gathered outputs' hash (the same on every
process) and, on process 0, their largest difference from the same function run unsharded
on one device. `kill` runs guarded steps
until the test kills a process. Kept small: the tiny models, a persistent compilation cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import jax
import numpy as np

import meshwright as mw

info = None  # this process's mw.distributed.ProcessInfo, set by main()

# (model, phase, ffn, attention, mesh): every FFN layout and both attention layouts
LAYOUTS = [
    ("palm-tiny", "decode", "ws-1d", "heads", (1, 1, 8)),
    ("palm-tiny", "decode", "ws-2d", "batch", (2, 2, 2)),
    ("palm-tiny", "decode", "wg-x", "heads", (2, 2, 2)),
    ("llama-tiny", "decode", "wg-xy", "batch", (2, 2, 2)),
    ("gpt2-tiny", "prefill", "wg-xyz", "heads", (2, 2, 2)),
]

# `every-layout`: each reference model's decode step in every FFN x attention layout on 2x2x2
EVERY_LAYOUT = [(m, "decode", f, a, (2, 2, 2)) for m in ("palm-tiny", "llama-tiny", "gpt2-tiny")
                for f in ("ws-1d", "ws-2d", "wg-x", "wg-xy", "wg-xyz") for a in ("heads", "batch")]


def layout_args(name, phase):
    from meshwright.models import build, get_config

    model = build(get_config(name).replace(scan_layers=True))
    return model, model.example_args(phase, batch=8, length=8, key=jax.random.PRNGKey(11))


def run_layouts(result: dict, out_dir: str, which: list[int]) -> None:
    rows = []
    for i in which:
        name, phase, ffn, attention, mesh = LAYOUTS[i]
        model, args = layout_args(name, phase)
        t0 = time.perf_counter()
        step = mw.shard(model.fn(phase), force={"ffn": ffn, "attention": attention,
                                                "mesh": mesh})
        with mw.distributed.guard(f"layout {ffn}/{attention}"):
            out = mw.distributed.gather(step(*args))
        err = None
        if info.is_leader:  # the same function unsharded, on one device of this process
            want = jax.jit(model.fn(phase))(*args)
            err = max(float(np.max(np.abs(a - np.asarray(b))))
                      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                         for a in jax.tree.leaves(out))).hexdigest()
        sharded = [not leaf.is_fully_addressable for leaf in jax.tree.leaves(
            step.compiled(*args).place(jax.tree.leaves(args)))]
        rows.append({"index": i, "model": name, "phase": phase, "ffn": ffn, "attention": attention,
                     "mesh": list(mesh), "max_abs_err_vs_unsharded": err,
                     "output_sha256": digest,
                     "inputs_spanning_processes": sum(sharded),
                     "seconds": time.perf_counter() - t0})
    result["layouts"] = rows


_UNSHARDED: dict = {}


def run_planned(result: dict, key: str = "planned", hardware=None, force=None) -> None:
    """mw.shard on every process's devices: the planner prices the processes as nodes and
    what it lowers across them runs (2 replicas of palm-tiny; with `hardware` whose chips
    cannot hold a copy per node, a 2-stage pipeline; `force` pins the way across), equal to
    one device. Also what crosses the processes in the compiled program."""
    from meshwright.passes.hlo import collective_bytes

    model, args = layout_args("palm-tiny", "decode")
    step = mw.shard(model.decode_step, hardware=hardware, force=force)
    with mw.distributed.guard(f"{key} across processes"):
        out = mw.distributed.gather(step(*args))
    c = step.compiled(*args)
    err = None
    if info.is_leader:  # the function unsharded (computed once for both parts)
        if "palm-tiny decode" not in _UNSHARDED:
            _UNSHARDED["palm-tiny decode"] = jax.jit(model.decode_step)(*args)
        want = _UNSHARDED["palm-tiny decode"]
        err = max(float(np.max(np.abs(a - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
    placed = c.place(jax.tree.leaves(args))
    mesh = c.jax_mesh
    counted = collective_bytes(c.compiled.as_text(),
                               nodes=[d.process_index for d in mesh.devices.flat])
    result[key] = {
        "max_abs_err_vs_unsharded": err, "nodes": c.plan.nodes,
        "cross_node": c.plan.cross_node.kind, "replicas": c.plan.cross_node.replicas,
        "slow": list(c.slow), "mesh": c.mesh_shape, "axes": list(mesh.axis_names),
        "layouts": [c.ffn_layout, c.attention_layout],
        "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
        "replica_processes": [sorted({d.process_index for d in mesh.devices[r].flat})
                              for r in range(mesh.shape.get("replica", 0))],
        "stage_processes": [sorted({d.process_index for d in mesh.devices[r].flat})
                            for r in range(mesh.shape.get("stage", 0))],
        "stacked_inputs_on_stages": [str(x.sharding.spec) for x in placed
                                     if "stage" in str(x.sharding.spec)],
        "inputs_spanning_processes": sum(not x.is_fully_addressable for x in placed),
        "slow_bytes": counted["slow"], "collective_bytes": counted["total"],
        "slow_bytes_predicted": c.plan.cross_node.slow_bytes_per_chip,
        "explain": step.explain(*args)}


def run_pipeline(result: dict) -> None:
    """As `planned`, on a cpu profile whose chips hold too little for a copy of palm-tiny per
    node of 4 (150 kB): the planner's best is a 2-stage pipeline, one process each."""
    from meshwright.passes.hardware import CPU_DEFAULT

    run_planned(result, "pipeline", CPU_DEFAULT.replace(hbm_bytes=150_000))


def run_stretched(result: dict) -> None:
    """As `pipeline`, with the layout stretched over both processes pinned."""
    from meshwright.passes.hardware import CPU_DEFAULT

    run_planned(result, "stretched", CPU_DEFAULT.replace(hbm_bytes=150_000),
                force={"cross_node": "stretched"})


def run_calibrate(result: dict, out_dir: str) -> None:
    """`meshwright calibrate` under launch: the network between the processes measured and
    written into the profile process 0 saves (OUT_DIR/cpu.json)."""
    from meshwright.passes.calibrate import calibrate_network, format_report

    report = calibrate_network(output=os.path.join(out_dir, "cpu.json"), quick=True)
    result["calibrate"] = {"saved": report["saved"], "network": report["network"],
                           "profile": report["profile"], "text": format_report(report)}


def serve_workload():
    from meshwright.runtime.workload import make_workload

    return make_workload(10, rate=400.0, out_len=(2, 8), prompt_len=(2, 7),
                         vocab_size=256, seed=3)


def run_serve(result: dict) -> None:
    from meshwright.models import build, get_config
    from meshwright.runtime.distributed_engine import distributed_sharded_engine
    from meshwright.runtime.engine import StepClock

    model = build(get_config("palm-tiny").replace(scan_layers=True))
    params = jax.tree.map(lambda a: a * 10 if a.ndim >= 2 else a,
                          model.init_params(jax.random.PRNGKey(0)))
    t0 = time.perf_counter()
    # nothing pinned: planned over the two processes' devices as two nodes
    served = distributed_sharded_engine(model, params, max_slots=4, max_len=16,
                                        prefill_lengths=(16,))
    engine = served.engine
    compile_s = time.perf_counter() - t0
    if engine.is_leader:
        report = engine.serve(serve_workload(), clock=StepClock(1e-3))
        engine.stop_followers()
        result["serve"] = {"tokens": [r.tokens for r in report.results],
                           "finish": [r.finish_reason for r in report.results],
                           "decode_steps": report.metrics["decode_steps"],
                           "steps": engine.stats.steps,
                           "kv_moves": report.metrics["kv_moves"],
                           "buckets_used": report.metrics["buckets_used"],
                           "compile_s": compile_s,
                           "mesh_processes": sorted({d.process_index for c in
                                                     served.buckets.values()
                                                     for d in c.mesh.devices.flat})}
    else:
        result["followed_steps"] = engine.follow()


def run_kill(result: dict) -> None:
    """Guarded collective steps until killed; prints each step (the test waits for them)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = mw.make_mesh({"x": jax.device_count()})
    f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "x"), mesh=mesh, in_specs=P("x"),
                              out_specs=P()))
    x = mw.distributed.put(np.ones(jax.device_count(), np.float32),
                           NamedSharding(mesh, P("x")))
    # compiled and run once before the guarded steps: on a loaded machine one process can
    # reach its first collective seconds after the other (the guard measures the wait)
    jax.block_until_ready(f(x))
    for i in range(10**6):
        with mw.distributed.guard(f"kill-test step {i}"):
            jax.block_until_ready(f(x))
        print(f"step {i}", flush=True)
        time.sleep(0.05)


def run_checkpoint(result: dict) -> None:
    """`checkpoint_io.place` (what `from_pretrained` uses) on a sharding over every process's
    devices: each process reads only its own devices' blocks."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from meshwright.models import checkpoint_io

    full = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    reads = []

    class Recorded(checkpoint_io.Constant):
        def read(self, index):
            reads.append([[s.start, s.stop] for s in index])
            return super().read(index)

    mesh = mw.make_mesh({"x": 2, "y": 2, "z": 2})
    sharding = NamedSharding(mesh, P(("x", "y"), "z"))  # 4 x 2 blocks of (4, 12)
    placed = checkpoint_io.place(Recorded(full), sharding, np.float32)
    mine = sorted({tuple(map(tuple, ([s.start, s.stop] for s in
                                     checkpoint_io.normalize_index(idx, full.shape))))
                   for idx in sharding.addressable_devices_indices_map(full.shape).values()})
    result["checkpoint"] = {
        "reads": sorted(tuple(map(tuple, r)) for r in reads) == mine,
        "blocks_read": len(reads), "rows_read": sum(r[0][1] - r[0][0] for r in reads),
        "equal": bool(np.array_equal(mw.distributed.gather(placed), full))}


def main() -> None:
    global info
    info = mw.distributed.initialize()
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "MESHWRIGHT_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    out_dir, parts = sys.argv[1], sys.argv[2:]
    result = {"process_id": info.process_id, "num_processes": info.num_processes,
              "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    for part in parts:
        name, _, arg = part.partition("=")
        if name == "layouts":
            run_layouts(result, out_dir, [int(i) for i in arg.split(",")] if arg
                        else list(range(len(LAYOUTS))))
        elif name == "calibrate":
            run_calibrate(result, out_dir)
        elif name == "every-layout":  # not in the tests (slow): 3 models x 10 layouts
            LAYOUTS[:] = EVERY_LAYOUT
            run_layouts(result, out_dir, list(range(len(LAYOUTS))))
        else:
            {"serve": run_serve, "kill": run_kill, "checkpoint": run_checkpoint,
             "planned": run_planned, "stretched": run_stretched,
             "pipeline": run_pipeline}[name](result)
    with open(os.path.join(out_dir, f"result{info.process_id}.json"), "w") as f:
        json.dump(result, f)
    mw.distributed.shutdown()


if __name__ == "__main__":
    main()
