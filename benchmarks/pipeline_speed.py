"""Time per pass of the whole mw.shard pipeline, and of an export, as models get deeper.

    python benchmarks/pipeline_speed.py [--cases 8b,540b-loop,540b-scan] [--repeats 3]

Cases (shapes only, `jax.ShapeDtypeStruct` inputs: nothing is allocated; hardware profile
tpu-v4, so collective-einsum surveys the program):

- `8b`: PaLM 8B's shape (32 parallel layers as a scan, d_model 4096, multiquery), decode and
  prefill at batch 8 on 8 devices, the planner choosing the mesh. Budget: 2 s for the
  pipeline without XLA's compile.
- `540b-loop`, `540b-scan`: PaLM 540B (118 layers, as a Python loop or as a scan), decode at
  batch 64 on a 4x4x4 mesh, exported for TPU as `meshwright export palm-540b --platform tpu
  --mesh 4x4x4 --phase decode --batch 64` does. Budgets: meshwright's graph passes
  (infer-axes through collective-einsum) under 5 s, the whole export under 30 s.

Every stage's wall time (`Compiled.timings`), the passes' sum, the wall and CPU time of the
whole compile (and export); medians over the repeats, each a fresh mw.shard (nothing cached).
`trace` is JAX tracing the model; `lower` runs meshwright's lowering under JAX's tracer and
JAX's lowering to StableHLO. Prints a table per case and writes
benchmarks/results/pipeline_speed.json; exits 1 when a budget is missed. On a loaded machine
compare CPU seconds, and run a baseline side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import jax
from meshwright.models import build, get_config
from meshwright.passes import PIPELINE

import meshwright as mw

# mw.shard's stages that run on these cases (float weights: quantize-int8 does not)
STAGES = tuple(s.name for s in PIPELINE if not s.when)
# meshwright's passes over its graph (trace and lower are mostly JAX's tracing)
GRAPH_PASSES = STAGES[1:-1]


@dataclass(frozen=True)
class Case:
    model: str
    layers: int
    scan: bool  # layers as a scan (else a Python loop)
    phases: tuple[str, ...]
    batch: int
    devices: int
    mesh: tuple[int, int, int] | None  # None: the planner picks it
    export: bool  # time `step.export` for TPU (else compile for the host)
    budgets_s: dict = field(default_factory=dict)  # measured key -> seconds


CASES = {
    "8b": Case("palm-8b", 32, True, ("decode", "prefill"), 8, 8, None, False,
               {"wall_without_xla": 2.0}),
    "540b-loop": Case("palm-540b", 118, False, ("decode",), 64, 64, (4, 4, 4), True,
                      {"graph_passes": 5.0, "export_wall": 30.0}),
    "540b-scan": Case("palm-540b", 118, True, ("decode",), 64, 64, (4, 4, 4), True,
                      {"graph_passes": 5.0, "export_wall": 30.0}),
}


def one_run(case: Case, phase: str, length: int, hardware: str) -> dict:
    cfg = get_config(case.model).replace(n_layers=case.layers,
                                            scan_layers=case.scan)
    model = build(cfg)
    xs = jax.eval_shape(lambda: model.example_args(phase, batch=case.batch, length=length,
                                                   key=jax.random.PRNGKey(0)))
    devices = jax.devices()[:case.devices]
    if case.mesh:
        mesh = mw.make_mesh(dict(zip("xyz", case.mesh)), devices)
        force = {"mesh": case.mesh}
    else:
        mesh, force = mw.make_mesh({"z": case.devices}, devices), None
    step = mw.shard(model.fn(phase), mesh=mesh, phase=phase, hardware=hardware, force=force)
    t0, c0 = time.perf_counter(), time.process_time()
    if case.export:
        step.export(*xs, platforms=("tpu",))
        c = step._lowered(xs, {})  # the record the export lowered (cached)
        run = dict(c.timings)
        run["export_wall"] = time.perf_counter() - t0
        run["export_cpu"] = time.process_time() - c0
    else:
        c = step.compiled(*xs)
        run = dict(c.timings)
        run["wall_without_xla"] = time.perf_counter() - t0 - run["xla_compile"]
        run["cpu"] = time.process_time() - c0  # with XLA's compile
    run["graph_passes"] = sum(run.get(k, 0.0) for k in GRAPH_PASSES)
    run["stages"] = sum(run.get(k, 0.0) for k in STAGES)
    run["chosen"] = (f"FFN {c.ffn_layout}, attention {c.attention_layout}, mesh "
                     f"{'x'.join(str(c.mesh_shape[a]) for a in 'xyz')}; "
                     f"{sum(d.looped for d in c.graph.meta['collective_einsum'])} matmuls "
                     "looped")
    return run


def measure(name: str, phase: str, repeats: int, length: int, hardware: str) -> dict:
    case = CASES[name]
    runs = [one_run(case, phase, length, hardware) for _ in range(repeats)]
    keys = [k for k in runs[0] if k != "chosen"]
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
    budgets = case.budgets_s
    return {"case": name, "model": case.model, "layers": case.layers,
            "scan": case.scan, "phase": phase, "batch": case.batch,
            "devices": case.devices, "chosen": runs[0]["chosen"], "median_s": median,
            "runs_s": [{k: r[k] for k in keys} for r in runs], "budgets_s": budgets,
            "ok": all(median[k] < b for k, b in budgets.items())}


def print_result(r: dict, repeats: int) -> None:
    m = r["median_s"]
    print(f"{r['model']}, {r['layers']} layers as {'a scan' if r['scan'] else 'a loop'}, "
          f"{r['phase']}, batch {r['batch']}, {r['devices']} devices; median of {repeats}")
    print(f"  chosen: {r['chosen']}")
    print(f"{'stage':28} {'ms':>10}")
    for k in STAGES:
        if k in m:
            print(f"{k:28} {m[k] * 1e3:10.1f}")
    print(f"{'graph passes (no trace/lower)':28} {m['graph_passes'] * 1e3:10.1f}")
    rows = [("wall_without_xla", "wall, less XLA's compile"), ("cpu", "cpu, with XLA's compile"),
            ("xla_compile", "xla compile (not counted)"), ("export_wall", "export, wall"),
            ("export_cpu", "export, cpu")]
    for k, label in rows:
        if k in m:
            print(f"{label:28} {m[k] * 1e3:10.1f}")
    verdict = ", ".join(f"{k} {m[k]:.2f} s < {b:g} s: {'ok' if m[k] < b else 'OVER'}"
                        for k, b in r["budgets_s"].items())
    print(f"budget: {verdict}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated, from " + ", ".join(CASES) + " (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--length", type=int, default=128, help="prefill tokens per sequence")
    p.add_argument("--hardware", default="tpu-v4", help="profile the planner and "
                   "collective-einsum price with (default: %(default)s)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "pipeline_speed.json"))
    args = p.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    if jax.device_count() < max(CASES[n].devices for n in names):
        p.error("needs 64 devices: run it as a script (it sets XLA_FLAGS before JAX starts)")
    results = []
    for name in names:
        for phase in CASES[name].phases:
            r = measure(name, phase, args.repeats, args.length, args.hardware)
            results.append(r)
            print_result(r, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min) at the end: {load}")
    with open(args.out, "w") as f:
        json.dump({"hardware": args.hardware, "repeats": args.repeats, "load_average": load,
                   "results": results}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
