"""Every layout on the simulated 8-device mesh: collective bytes predicted, emitted by the
explicit lowering, counted in its compiled HLO, and counted in the GSPMD baseline (the same
layout written the ordinary way: `jax.jit` with the inputs placed alike and every activation
and gathered weight pinned by `with_sharding_constraint`, XLA's partitioner inserting the
collectives); step time sharded, GSPMD and unsharded.

    python benchmarks/layouts.py [--models palm-tiny,llama-tiny] [--phases decode] [--quick]
    python benchmarks/layouts.py --markdown benchmarks/results/layouts.json   # the docs table

Prints a table and writes benchmarks/results/layouts.json. The 8 devices share 2 CPU cores:
step times measure lowering overhead, not speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the GSPMD baseline's partitioner warnings

import argparse
import json
import sys

import jax
import numpy as np
from common import timed
from jax.sharding import NamedSharding
from meshwright.models import build, get_config
from meshwright.passes.cost_model import ATTENTION_LAYOUTS, FFN_LAYOUTS
from meshwright.passes.gspmd import gspmd_program
from meshwright.passes.hlo import collective_bytes

import meshwright as mw

FFNS = tuple(FFN_LAYOUTS)  # every registered layout (passes/layouts.py)
ATTENTION = tuple(ATTENTION_LAYOUTS)


def gspmd_baseline(args, compiled):
    """The same layout the ordinary way (`meshwright.passes.gspmd`: jax.jit, the parameters
    placed alike, every activation and gathered weight pinned with with_sharding_constraint,
    XLA's partitioner inserting the collectives): (collective bytes, placed args, program)."""
    program = gspmd_program(compiled)
    flat = [jax.device_put(x, NamedSharding(compiled.jax_mesh, s.partition_spec()))
            for x, s in zip(jax.tree.leaves(args), compiled.in_specs)]
    hlo = program.lower(*flat).compile().as_text()
    return collective_bytes(hlo)["total"], flat, program


def markdown(path: str) -> str:
    """The results file as the table in docs/lowering.md."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    out = [("| model | phase | FFN | attention | predicted | measured | measured/predicted | "
            "GSPMD baseline | measured/GSPMD |"),
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pred = r["predicted_bytes"]
        ratio = f"{r['measured_bytes'] / pred:.2f}" if pred else "-"
        out.append(f"| {r['model']} | {r['phase']} | {r['ffn']} | {r['attention']} | "
                   f"{pred if pred else 'n/a'} | {r['measured_bytes']} | {ratio} | "
                   f"{r['gspmd_bytes']} | {r['measured_bytes'] / r['gspmd_bytes']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", metavar="JSON",
                   help="print the table of an earlier run's results file and exit")
    p.add_argument("--models", default="palm-tiny,llama-tiny,gpt2-tiny")
    p.add_argument("--phases", default="decode,prefill")
    p.add_argument("--mesh", default="2x2x2", help="x*y*z of the simulated mesh")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="ws-2d and wg-xy only")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    mesh = tuple(int(v) for v in args.mesh.split("x"))
    ffns = ("ws-2d", "wg-xy") if args.quick else FFNS
    rows = []
    header = (f"{'model':11} {'phase':7} {'ffn':7} {'attn':5} {'predicted':>9} {'emitted':>9} "
              f"{'measured':>9} {'meas/pred':>9} {'gspmd':>9} {'step ms':>8} {'gspmd ms':>8} "
              f"{'1-dev ms':>8} "
              f"{'ratio':>6} {'max err':>8}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        model = build(get_config(name).replace(scan_layers=True))
        for phase in args.phases.split(","):
            xs = model.example_args(phase, batch=8, length=8, key=jax.random.PRNGKey(0))
            fn = model.fn(phase)
            single = jax.jit(fn)
            want = single(*xs)
            single_s = timed(single, xs, args.repeats)
            for ffn in ffns:
                for attention in ATTENTION:
                    step = mw.shard(fn, force={"ffn": ffn, "attention": attention,
                                               "mesh": mesh})
                    got = step(*xs)
                    err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
                    rep = step.report(*xs)["collective_bytes"]
                    c = step.compiled(*xs)
                    placed = c.place(jax.tree.leaves(xs))
                    step_s = timed(c.compiled, placed, args.repeats)
                    base, base_flat, base_fn = gspmd_baseline(xs, c)
                    base_s = timed(base_fn, base_flat, args.repeats)
                    row = {"model": name, "phase": phase, "ffn": ffn, "attention": attention,
                           "mesh": dict(c.mesh_shape), "predicted_bytes": rep["predicted"],
                           "emitted_bytes": rep["emitted"], "measured_bytes": rep["measured"],
                           "measured_by_kind": rep["by_kind"], "gspmd_bytes": base,
                           "gspmd_step_s": base_s,
                           "step_s": step_s, "single_device_step_s": single_s,
                           "max_abs_error": err}
                    rows.append(row)
                    pred = rep["predicted"]
                    ratio = f"{rep['measured'] / pred:.2f}" if pred else "-"
                    print(f"{name:11} {phase:7} {ffn:7} {attention:5} {pred or 0:9d} "
                          f"{rep['emitted']:9d} {rep['measured']:9d} {ratio:>9} {base:9d} "
                          f"{step_s * 1e3:8.2f} {base_s * 1e3:8.2f} {single_s * 1e3:8.2f} "
                          f"{step_s / single_s:6.2f} {err:8.1e}", flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "layouts.json")
    with open(out, "w") as f:
        json.dump({"mesh": args.mesh, "repeats": args.repeats, "statistic": "median",
                   "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
