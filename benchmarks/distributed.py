"""Step time and collective bytes: one process with 8 devices vs 2 processes x 4 devices.

    python benchmarks/distributed.py [--repeats 30] [--output benchmarks/results/distributed.json]
    python benchmarks/distributed.py --stretched [--rounds 3] [--repeats 30]

`--stretched`: the step `mw.shard` plans with nothing pinned over 2 processes x 4 devices
(each process a node: a layout stretched over both) against the same layout and mesh in one
8-device process, the two jobs alternated (2x4, 1x8, 2x4, 1x8, ...) `--rounds` times; the
medians of each job's per-call medians, and the cost model's prediction for both (writes
benchmarks/results/distributed_stretched.json).

The same sharded decode step of the bundled demo model (batch 8, KV length 256) runs in each
layout on one 8-device mesh, first inside one process, then spread over two processes
(`meshwright launch -n 2 --devices-per-process 4`), whose collectives cross the process
boundary through gloo over TCP on 127.0.0.1. Collective bytes are counted in the compiled HLO
(the same program in both cases, so they agree); step time is the median of `--repeats`
calls after a warm-up, inputs already placed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAYOUTS = [("ws-1d", "heads", (1, 1, 8)), ("ws-2d", "batch", (2, 2, 2)),
           ("wg-xy", "batch", (2, 2, 2))]
BATCH, MAX_LEN = 8, 256


def _demo_decode():
    """The bundled demo model and one decode step's arguments at BATCH x MAX_LEN."""
    import jax
    from meshwright.models import build, load_demo_model

    config, params = load_demo_model()
    model = build(config.replace(max_len=MAX_LEN))
    _, tokens, cache, positions = model.example_args("decode", batch=BATCH,
                                                     key=jax.random.PRNGKey(0))
    return model, (params, tokens, cache, positions)


def worker(out: str, repeats: int) -> None:
    """Measure every layout in this job (one process, or every process of a launched job)."""
    import meshwright as mw

    info = mw.distributed.initialize()
    import jax

    model, args = _demo_decode()
    rows = []
    for ffn, attention, mesh in LAYOUTS:
        step = mw.shard(model.decode_step, force={"ffn": ffn, "attention": attention,
                                                  "mesh": mesh})
        c = step.compiled(*args)
        placed = c.place(jax.tree.leaves(args))
        times = []
        for i in range(repeats + 3):
            with mw.distributed.guard(f"{ffn}/{attention} call {i}"):
                t0 = time.perf_counter()
                jax.block_until_ready(c.compiled(*placed))
                if i >= 3:  # warm-up calls
                    times.append(time.perf_counter() - t0)
        report = step.report(*args)["collective_bytes"]
        rows.append({"ffn": ffn, "attention": attention, "mesh": list(mesh),
                     "step_ms_median": 1e3 * statistics.median(times),
                     "step_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
                     "collective_bytes_per_device": report["measured"],
                     "collectives": report["count"]})
    if info.is_leader:
        Path(out).write_text(json.dumps({"processes": info.num_processes,
                                         "local_devices": info.local_devices,
                                         "devices": info.devices, "rows": rows}))
    mw.distributed.shutdown()


def stretched_worker(out: str, repeats: int, pin: str | None) -> None:
    """One job of `--stretched`: over several processes mw.shard plans (nothing pinned); in
    one process `pin` ("ffn,attention,x,y,z") pins the layout the planned job ran."""
    import meshwright as mw

    info = mw.distributed.initialize()
    import jax

    model, args = _demo_decode()
    force = None
    if pin:
        ffn, attention, *mesh = pin.split(",")
        force = {"ffn": ffn, "attention": attention, "mesh": tuple(int(m) for m in mesh)}
    step = mw.shard(model.decode_step, force=force)
    c = step.compiled(*args)
    placed = c.place(jax.tree.leaves(args))
    times = []
    for i in range(repeats + 3):
        with mw.distributed.guard(f"call {i}"):
            t0 = time.perf_counter()
            jax.block_until_ready(c.compiled(*placed))
            if i >= 3:
                times.append(time.perf_counter() - t0)
    if info.is_leader:
        Path(out).write_text(json.dumps({
            "processes": info.num_processes, "ffn": c.ffn_layout,
            "attention": c.attention_layout, "mesh": [c.mesh_shape[a] for a in "xyz"],
            "slow": list(c.slow), "step_ms_median": 1e3 * statistics.median(times),
            "predicted_ms": None if c.predicted is None else 1e3 * c.predicted.step_s,
            "cross_node": None if c.plan is None or c.plan.cross_node is None
            else c.plan.cross_node.label,
            "notes": [] if c.plan is None else list(c.plan.notes)}))
    mw.distributed.shutdown()


def stretched(args) -> None:
    from meshwright.runtime.launch import launch

    tmp = Path(args.output).with_suffix(".tmp")
    me = [sys.executable, __file__, "--repeats", str(args.repeats), "--stretched-worker"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    two, one = [], []
    for _ in range(args.rounds):
        result = launch(me + [f"{tmp}.2"], 2, devices_per_process=4, timeout_s=120,
                        out=None, keep_output=True)
        if result.returncode != 0:
            sys.exit("\n".join(line for lines in result.output.values() for line in lines[-20:]))
        two.append(json.loads(Path(f"{tmp}.2").read_text()))
        b = two[-1]
        pin = ",".join([b["ffn"], b["attention"], *map(str, b["mesh"])])
        subprocess.run(me + [f"{tmp}.1", "--pin", pin], env=env, check=True)
        one.append(json.loads(Path(f"{tmp}.1").read_text()))
    for f in (f"{tmp}.1", f"{tmp}.2"):
        os.remove(f)
    b = two[-1]
    t2 = statistics.median(r["step_ms_median"] for r in two)
    t1 = statistics.median(r["step_ms_median"] for r in one)
    mesh = "x".join(map(str, b["mesh"]))
    across = ", ".join(f"{ax} over {k}" for ax, k in zip("xyz", b["slow"]) if k > 1)
    print(f"demo model decode step, batch {BATCH}, KV length {MAX_LEN}: mw.shard with nothing "
          f"pinned on 2 processes x 4 devices, against the same layout in 1 process x 8; "
          f"{args.rounds} rounds alternated, median of {args.repeats} calls each")
    print(f"planned: {b['ffn']}/{b['attention']} on {mesh} ({across} nodes); "
          f"{'; '.join(b['notes']) or b['cross_node']}")
    head = f"{'job':<22}{'step ms':>10}{'predicted ms':>14}{'rounds (ms)':>30}"
    print(head)
    print("-" * len(head))
    for name, rows, t in (("2 processes x 4", two, t2), ("1 process x 8", one, t1)):
        pred = rows[-1]["predicted_ms"]
        each = " ".join(f"{r['step_ms_median']:.1f}" for r in rows)
        print(f"{name:<22}{t:>10.2f}{pred if pred is None else f'{pred:.2f}':>14}{each:>30}")
    print(f"ratio 2x4 / 1x8: {t2 / t1:.1f}")
    out = {"two_processes": two, "one_process": one, "step_ms_2x4": t2, "step_ms_1x8": t1,
           "batch": BATCH, "max_len": MAX_LEN, "repeats": args.repeats,
           "rounds": args.rounds, "load_average": os.getloadavg(),
           "command": f"python benchmarks/distributed.py --stretched --rounds {args.rounds}"}
    path = Path(args.output).with_name("distributed_stretched.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" /
                                                "distributed.json"))
    parser.add_argument("--stretched", action="store_true",
                        help="the planned step over 2 processes vs 1 process, alternated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--stretched-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--pin", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    if args.stretched_worker:
        stretched_worker(args.stretched_worker, args.repeats, args.pin)
        return
    if args.stretched:
        stretched(args)
        return
    from meshwright.runtime.launch import launch

    tmp = Path(args.output).with_suffix(".tmp")
    me = [sys.executable, __file__, "--repeats", str(args.repeats), "--worker"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run(me + [f"{tmp}.1"], env=env, check=True)
    single = json.loads(Path(f"{tmp}.1").read_text())
    result = launch(me + [f"{tmp}.2"], 2, devices_per_process=4, timeout_s=120,
                    out=None, keep_output=True)
    if result.returncode != 0:
        sys.exit("\n".join(line for lines in result.output.values() for line in lines[-20:]))
    multi = json.loads(Path(f"{tmp}.2").read_text())
    for f in (f"{tmp}.1", f"{tmp}.2"):
        os.remove(f)
    head = (f"{'layout':<22}{'1 x 8 ms':>10}{'2 x 4 ms':>10}{'ratio':>7}"
            f"{'coll. bytes 1x8':>17}{'coll. bytes 2x4':>17}")
    print(f"demo model decode step, batch {BATCH}, KV length {MAX_LEN}; median of "
          f"{args.repeats} calls")
    print(head)
    print("-" * len(head))
    for a, b in zip(single["rows"], multi["rows"]):
        name = f"{a['ffn']}/{a['attention']} {'x'.join(map(str, a['mesh']))}"
        print(f"{name:<22}{a['step_ms_median']:>10.2f}{b['step_ms_median']:>10.2f}"
              f"{b['step_ms_median'] / a['step_ms_median']:>7.1f}"
              f"{a['collective_bytes_per_device']:>17}{b['collective_bytes_per_device']:>17}")
    out = {"single_process": single, "two_processes": multi, "batch": BATCH,
           "max_len": MAX_LEN, "repeats": args.repeats,
           "command": "python benchmarks/distributed.py"}
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
