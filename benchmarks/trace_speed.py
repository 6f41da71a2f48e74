"""Tracing and analysis time vs number of layers, layers as a scan and as a Python loop.

    python benchmarks/trace_speed.py            # prints a table, writes results/trace_speed.json

A scan keeps the graph the same size whatever the depth; a Python loop grows with it.
Inputs are ShapeDtypeStructs: nothing is allocated, so real sizes (PaLM 8B) trace here.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
from meshwright.models import build, get_config
from meshwright.passes import PassManager

import meshwright as mw

REPEATS = 5


def measure(config, phase: str) -> dict:
    model = build(config)
    args = jax.eval_shape(lambda: model.example_args(phase, batch=8, length=128,
                                                     key=jax.random.PRNGKey(0)))
    trace_s, analyse_s = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        g = mw.trace(model.fn(phase), *args)
        t1 = time.perf_counter()
        PassManager(["infer-axes", "find-blocks"]).run(g)
        t2 = time.perf_counter()
        trace_s.append(t1 - t0)
        analyse_s.append(t2 - t1)
    nodes = sum(1 for _ in g.walk())
    return {"model": config.name, "n_layers": config.n_layers, "scan": config.scan_layers,
            "phase": phase, "trace_s": statistics.median(trace_s),
            "analyse_s": statistics.median(analyse_s), "equations": len(g.equations()),
            "equations_including_regions": nodes,
            "attention_blocks": g.meta["blocks"].count("attention")}


def main() -> int:
    rows = []
    base = get_config("palm-8b")
    for scan in (True, False):
        for layers in (2, 8, 32):
            cfg = base.replace(n_layers=layers, scan_layers=scan)
            rows.append(measure(cfg, "decode"))
    print(f"{'model':10} {'layers':>6} {'style':>5} {'trace s':>8} {'analyse s':>9} "
          f"{'equations':>9} {'incl. bodies':>12} {'attention':>9}")
    for r in rows:
        print(f"{r['model']:10} {r['n_layers']:6d} {'scan' if r['scan'] else 'loop':>5} "
              f"{r['trace_s']:8.3f} {r['analyse_s']:9.3f} {r['equations']:9d} "
              f"{r['equations_including_regions']:12d} {r['attention_blocks']:9d}")
    out = os.path.join(os.path.dirname(__file__), "results", "trace_speed.json")
    with open(out, "w") as f:
        json.dump({"repeats": REPEATS, "statistic": "median", "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    scan32 = next(r for r in rows if r["scan"] and r["n_layers"] == 32)
    return 0 if scan32["trace_s"] < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
