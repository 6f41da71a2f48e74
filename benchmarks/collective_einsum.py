"""Looped collective einsums against plain collectives on the simulated 8-device CPU mesh:
collectives and bytes counted in the compiled HLO, and step time, for each variant (one-way or
bidirectional, unrolled or fori_loop).

    python benchmarks/collective_einsum.py [--layouts ws-2d,wg-xy] [--phases decode,prefill]

Prints a table and writes benchmarks/results/collective_einsum.json. The programs run in
interleaved rounds (the machine is shared); times are medians. The 8 devices share the CPU's
cores and a "transfer" is a memory copy by the same threads, so nothing can overlap here: the
table measures what the loops cost, not what they save on a TPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np
from meshwright.models import build, get_config
from meshwright.passes.collective_einsum import CollectiveEinsum
from meshwright.passes.hlo import collective_bytes

import meshwright as mw

VARIANTS = {  # name -> the mw.shard option
    "plain": "off",
    "one-way, unrolled": CollectiveEinsum(mode="on", direction="uni", unroll=True),
    "one-way, fori_loop": CollectiveEinsum(mode="on", direction="uni", unroll=False),
    "bidirectional, unrolled": CollectiveEinsum(mode="on", direction="bidi", unroll=True),
    "bidirectional, fori_loop": CollectiveEinsum(mode="on", direction="bidi", unroll=False),
}


def model_config():
    # PaLM-style, wide enough that the matmuls are not all overhead: 2 parallel layers,
    # d_model 512, d_ff 2048, 8 heads of 64, multiquery.
    return get_config("palm-tiny").replace(d_model=512, d_ff=2048, n_heads=8, d_head=64,
                                           n_layers=2, vocab_size=1024, max_len=256,
                                           scan_layers=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="ws-2d,ws-1d,wg-xy")
    p.add_argument("--phases", default="decode,prefill")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64, help="prefill tokens per sequence")
    args = p.parse_args(argv)
    cfg = model_config()
    model = build(cfg)
    rows = []
    for phase in args.phases.split(","):
        xs = model.example_args(phase, batch=args.batch, length=args.length,
                                key=jax.random.PRNGKey(0))
        want = jax.jit(model.fn(phase))(*xs)
        for ffn in args.layouts.split(","):
            force = {"ffn": ffn, "attention": "heads", "mesh": (2, 2, 2)}
            programs = {}
            for name, option in VARIANTS.items():
                step = mw.shard(model.fn(phase), force=force, collective_einsum=option)
                c = step.compiled(*xs)
                placed = c.place(jax.tree_util.tree_leaves(xs))
                out = c.compiled(*placed)
                err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                          for a, b in zip(jax.tree_util.tree_leaves(out),
                                          jax.tree_util.tree_leaves(want)))
                counted = collective_bytes(c.compiled.as_text())
                looped = [d for d in c.graph.meta["collective_einsum"] if d.looped]
                programs[name] = (c.compiled, placed)
                rows.append({"phase": phase, "ffn": ffn, "variant": name,
                             "looped_matmuls": len(looped), "wire_bytes": counted["wire"],
                             "counted_bytes": counted["total"], "count": counted["count"],
                             "max_abs_err": err, "times_ms": []})
            for _ in range(args.rounds):  # interleaved: every variant once per round
                for row in rows[-len(VARIANTS):]:
                    fn, placed = programs[row["variant"]]
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*placed))
                    row["times_ms"].append((time.perf_counter() - t0) * 1e3)
            base = None
            for row in rows[-len(VARIANTS):]:
                row["median_ms"] = statistics.median(row["times_ms"])
                row["min_ms"] = min(row["times_ms"])
                base = base or row["median_ms"]
                row["vs_plain"] = row["median_ms"] / base
                del row["times_ms"]
            print_rows(rows[-len(VARIANTS):], header=len(rows) == len(VARIANTS))
    out = os.path.join(os.path.dirname(__file__), "results", "collective_einsum.json")
    with open(out, "w") as f:
        json.dump({"model": cfg.name, "config": {"d_model": cfg.d_model, "d_ff": cfg.d_ff,
                                                 "n_layers": cfg.n_layers},
                   "batch": args.batch, "prefill_length": args.length, "mesh": "2x2x2",
                   "rounds": args.rounds, "host_cpus": os.cpu_count(), "rows": rows},
                  f, indent=2)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def print_rows(rows, header: bool) -> None:
    if header:
        print(f"{'phase':7} {'ffn':6} {'variant':25} {'looped':>6} {'wire B':>8} "
              f"{'AG':>3} {'RS':>3} {'CP':>3} {'median ms':>9} {'min ms':>7} {'vs plain':>8} "
              f"{'max err':>8}")
    for r in rows:
        c = r["count"]
        print(f"{r['phase']:7} {r['ffn']:6} {r['variant']:25} {r['looped_matmuls']:6d} "
              f"{r['wire_bytes']:8d} {c.get('all-gather', 0):3d} {c.get('reduce-scatter', 0):3d} "
              f"{c.get('collective-permute', 0):3d} {r['median_ms']:9.2f} {r['min_ms']:7.2f} "
              f"{r['vs_plain']:7.2f}x {r['max_abs_err']:8.1e}")


if __name__ == "__main__":
    sys.exit(main())
