"""Step time and collective bytes: one process with 8 devices vs 2 processes x 4 devices.

    python benchmarks/distributed.py [--repeats 30] [--output benchmarks/results/distributed.json]
    python benchmarks/distributed.py --stretched [--rounds 3] [--repeats 30]
    python benchmarks/distributed.py --across [--rounds 3] [--repeats 20]

`--across`: over 2 processes x 4 devices (each process a node), what the slow network
between them carries: the network calibrated first in the same job (`meshwright calibrate`'s
launched measurement, process 0's profile broadcast, nothing saved), then the step as
replicas (what `mw.shard` plans with nothing pinned: the batch split, a replica per process),
as the best layout stretched over both processes, and as 2 pipeline stages (the demo
model's 4 layers, 2 per process, in the planner's microbatches), alternated `--rounds`
times; each with its step time against the model's prediction (with the calibrated network
and with the profile's defaults) and the bytes a device sends across the processes, counted
in the compiled HLO, against the prediction. Writes benchmarks/results/distributed_across.json.

`--stretched`: the best layout stretched over 2 processes x 4 devices as the planner prices
it (each process a node) against the same layout and mesh in one 8-device process, the two jobs alternated (2x4, 1x8, 2x4, 1x8, ...) `--rounds` times; the
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


def _timed_calls(compiled, args, repeats: int, what: str) -> list[float]:
    """Seconds of `repeats` calls of a compiled step after 3 warm-up calls, each guarded (a lost
    process stops the job with a clear error instead of hanging in a collective)."""
    import jax

    import meshwright as mw

    times = []
    for i in range(repeats + 3):
        with mw.distributed.guard(f"{what} call {i}"):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            if i >= 3:  # warm-up calls
                times.append(time.perf_counter() - t0)
    return times


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
        times = _timed_calls(c.compiled, placed, repeats, f"{ffn}/{attention}")
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
    if c.plan is not None and c.plan.cross_node is not None and c.plan.cross_node.kind != \
            "stretched":  # the planner's replicas: pin its best stretched layout instead
        best = next(x.layout for x in c.plan.cross_node_candidates
                    if x.kind == "stretched" and x.replicas == 1)
        step = mw.shard(model.decode_step, force={
            "ffn": best.ffn_layout, "attention": best.attention_layout,
            "mesh": (best.mesh.x, best.mesh.y, best.mesh.z)})
        c = step.compiled(*args)
    placed = c.place(jax.tree.leaves(args))
    times = _timed_calls(c.compiled, placed, repeats, "stretched")
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


def across_worker(out: str, repeats: int, rounds: int) -> None:
    """One job of `--across` (every process runs it): calibrate the network between the
    processes, compile replicas and the best stretched layout, time them alternated."""
    import meshwright as mw

    info = mw.distributed.initialize()
    import jax
    from meshwright.passes.calibrate import calibrate_network
    from meshwright.passes.cost_model import Mesh, StepWorkload, evaluate
    from meshwright.passes.hardware import CPU_DEFAULT, HardwareProfile, get_hardware
    from meshwright.passes.hlo import collective_bytes
    from meshwright.passes.planner import plan_config

    network = calibrate_network(save=False)
    # every process plans with process 0's figures (the same plan, the same programs)
    profile = mw.distributed.broadcast(network["profile"] if info.is_leader else None,
                                       "the calibrated profile")
    hw = HardwareProfile.from_dict(profile)
    model, args = _demo_decode()
    planned = mw.shard(model.decode_step, hardware=hw)
    c = planned.compiled(*args)
    plan = c.plan
    by_kind = {}
    for x in plan.cross_node_candidates:  # the cheapest of each kind (one replica group)
        if x.replicas == 1 or x.kind == "replicas":
            by_kind.setdefault(x.kind, x)
    stretch = by_kind["stretched"].layout
    steps = {plan.cross_node.kind: planned}
    if "stretched" not in steps:
        steps["stretched"] = mw.shard(model.decode_step, hardware=hw, force={
            "ffn": stretch.ffn_layout, "attention": stretch.attention_layout,
            "mesh": (stretch.mesh.x, stretch.mesh.y, stretch.mesh.z)})
    if "pipeline" not in steps:  # the demo model's layers run in a scan: stages lower
        steps["pipeline"] = mw.shard(model.decode_step, hardware=hw,
                                     force={"cross_node": "pipeline"})
    config = c.config
    rows, placed = {}, {}
    for kind, step in steps.items():
        k = step.compiled(*args)
        placed[kind] = (k, k.place(jax.tree.leaves(args)))
        nodes = [d.process_index for d in k.jax_mesh.devices.flat]
        counted = collective_bytes(k.compiled.as_text(), nodes=nodes)
        pred = k.predicted
        if kind == "pipeline":  # the stages' loop as a whole, with its microbatches
            pred = k.plan.cross_node
            default = plan_config(config, hardware=CPU_DEFAULT, chips=plan.chips,
                                  nodes=plan.nodes, batch=plan.batch, context=plan.context,
                                  phase=plan.phase, weights=plan.weights, cross_node="pipeline",
                                  microbatches=pred.microbatches).cross_node
        else:
            replicas = k.jax_mesh.shape.get("replica", 1)
            work = StepWorkload(plan.batch // replicas, plan.context, plan.phase, plan.weights)
            default = evaluate(config, CPU_DEFAULT,
                               Mesh(pred.mesh.x, pred.mesh.y, pred.mesh.z,
                                    slow=tuple(pred.mesh.slow)),
                               work, k.ffn_layout, k.attention_layout, nodes=plan.nodes)
        rows[kind] = {
            "way": kind, "label": (k.plan.cross_node.label if kind == "pipeline" else
                                   plan.cross_node.label if kind == plan.cross_node.kind
                                   else by_kind[kind].label),
            "ffn": k.ffn_layout, "attention": k.attention_layout,
            "mesh": {a: int(n) for a, n in k.jax_mesh.shape.items()},
            "slow": list(k.slow), "rounds_ms": [],
            "predicted_ms": 1e3 * pred.step_s, "predicted_default_ms": 1e3 * default.step_s,
            "predicted_slow_ms": 1e3 * pred.slow_network_s,
            "slow_bytes_hlo": counted["slow"], "slow_bytes_predicted": pred.slow_bytes_per_chip,
            "slow_collectives_hlo": sum(counted["slow_count"].values()),
            "collectives_hlo": sum(counted["count"].values()),
            "collective_bytes_hlo": counted["total"]}
    for _ in range(rounds):
        for kind, (k, args_on_mesh) in placed.items():
            times = _timed_calls(k.compiled, args_on_mesh, repeats, kind)
            rows[kind]["rounds_ms"].append(1e3 * statistics.median(times))
    if info.is_leader:
        Path(out).write_text(json.dumps({
            "processes": info.num_processes, "local_devices": info.local_devices,
            "network": {k: network["network"][k] for k in ("bandwidth_per_device",
                                                            "latency_s", "collectives",
                                                            "in_node")},
            "in_process": {"collective_s": hw.multinode_collective_s,
                           "bandwidth_per_device": hw.multinode_bandwidth},
            "default_network": {"bandwidth_per_device": CPU_DEFAULT.dcn_bandwidth,
                                "latency_s": CPU_DEFAULT.dcn_latency_s},
            "in_node_from": get_hardware("cpu").source,
            "planned": plan.cross_node.label, "notes": list(plan.notes),
            "rows": [rows[k] for k in ("replicas", "stretched", "pipeline") if k in rows]}))
    mw.distributed.shutdown()


def across(args) -> None:
    from meshwright.runtime.launch import launch

    tmp = Path(args.output).with_name("distributed_across.tmp")
    me = [sys.executable, __file__, "--repeats", str(args.repeats), "--rounds",
          str(args.rounds), "--across-worker", str(tmp)]
    result = launch(me, 2, devices_per_process=4, timeout_s=300, out=None, keep_output=True)
    if result.returncode != 0:
        sys.exit("\n".join(line for lines in result.output.values() for line in lines[-20:]))
    job = json.loads(tmp.read_text())
    os.remove(tmp)
    net = job["network"]
    print(f"demo model decode step, batch {BATCH}, KV length {MAX_LEN}, on 2 processes x 4 "
          f"devices (each process a node); {args.rounds} rounds alternated, median of "
          f"{args.repeats} calls each; load average {os.getloadavg()[0]:.1f}")
    print(f"network between the processes, calibrated in the job: "
          f"{net['bandwidth_per_device'] / 1e6:.0f} MB/s per device, "
          f"{net['latency_s'] * 1e3:.2f} ms per exchange (the profile's defaults: "
          f"{job['default_network']['bandwidth_per_device'] / 1e6:.0f} MB/s, "
          f"{job['default_network']['latency_s'] * 1e3:.1f} ms); a collective among one "
          f"process's devices, a gloo exchange in such a job: "
          f"{job['in_process']['collective_s'] * 1e3:.2f} ms + bytes at "
          f"{job['in_process']['bandwidth_per_device'] / 1e6:.0f} MB/s")
    head = (f"{'slow axis carries':<26}{'layout':<13}{'mesh':<13}{'step ms':>9}"
            f"{'predicted':>10}{'(defaults)':>11}{'ratio':>7}{'slow B/dev':>11}"
            f"{'predicted':>10}{'crossing':>9}")
    print(head)
    print("-" * len(head))
    for r in job["rows"]:
        mesh = "x".join(str(n) for n in r["mesh"].values())
        layout = f"{r['ffn']}/{r['attention']}"
        default = r["predicted_default_ms"]
        dtext = "-" if default is None else f"{default:.1f}"
        measured = statistics.median(r["rounds_ms"])
        r["measured_over_predicted"] = measured / r["predicted_ms"]
        print(f"{r['label']:<26}{layout:<13}{mesh:<13}{measured:>9.1f}{r['predicted_ms']:>10.1f}"
              f"{dtext:>11}{r['measured_over_predicted']:>7.2f}{r['slow_bytes_hlo']:>11.0f}"
              f"{r['slow_bytes_predicted']:>10.0f}{r['slow_collectives_hlo']:>9}")
    print("(step ms: measured, median of the rounds; predicted: the cost model with the "
          "network and the in-process collectives calibrated in the job (defaults: with the "
          "profile's); ratio: measured / predicted; slow B/dev: bytes a device sends to the "
          "other process per step (averaged over the devices), counted in the compiled HLO, "
          "and predicted; crossing: collectives that cross)")
    for r in job["rows"]:
        if r["rounds_ms"]:
            print(f"{r['label']}: rounds {' '.join(f'{t:.1f}' for t in r['rounds_ms'])} ms; "
                  f"{r['collectives_hlo']} collectives a step")
    out = {**job, "batch": BATCH, "max_len": MAX_LEN, "repeats": args.repeats,
           "rounds": args.rounds, "load_average": os.getloadavg(),
           "command": f"python benchmarks/distributed.py --across --rounds {args.rounds} "
                      f"--repeats {args.repeats}"}
    path = Path(args.output).with_name("distributed_across.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


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
    print(f"demo model decode step, batch {BATCH}, KV length {MAX_LEN}: the best layout "
          f"stretched over 2 processes x 4 devices, against the same layout in 1 process x 8; "
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
    parser.add_argument("--across", action="store_true",
                        help="2 processes x 4: replicas vs a stretched layout vs the model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--across-worker", metavar="OUT", help=argparse.SUPPRESS)
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
    if args.across_worker:
        across_worker(args.across_worker, args.repeats, args.rounds)
        return
    if args.stretched:
        stretched(args)
        return
    if args.across:
        across(args)
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
