"""Step time and collective bytes: one process with 8 devices vs 2 processes x 4 devices.

    python benchmarks/distributed.py [--repeats 30] [--output benchmarks/results/distributed.json]

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


def worker(out: str, repeats: int) -> None:
    """Measure every layout in this job (one process, or every process of a launched job)."""
    import meshwright as mw

    info = mw.distributed.initialize()
    import jax
    from meshwright.models import build, load_demo_model

    config, params = load_demo_model()
    model = build(config.replace(max_len=MAX_LEN))
    _, tokens, cache, positions = model.example_args("decode", batch=BATCH,
                                                     key=jax.random.PRNGKey(0))
    args = (params, tokens, cache, positions)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" /
                                                "distributed.json"))
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
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
