"""Decode on the simulated 8-device mesh vs one device, and the one-device step vs this
machine's memory-bandwidth roofline.

    python benchmarks/decode_overhead.py [--models palm-tiny,palm-small] [--repeats 50]

For each model (batch 8, one decode step, KV cache of max_len positions):
- `1-dev ms`: the plain `jax.jit` step on one CPU device (median);
- `roofline ms`: (weight bytes + KV-cache bytes read per step) / measured bandwidth, the least
  time any implementation on this machine needs to read them once;
- `8-dev ms`: the `mw.shard` step on 2x2x2 (the layout the planner picks for this mesh on the
  CPU profile, and ws-2d/heads), its ratio to the one-device step, and the number of
  collectives per step counted in the compiled HLO;
- `per-collective us`: what one collective costs on this simulated mesh (a chain of k tiny
  psums inside one shard_map, the slope over k): the 8 "devices" are threads sharing 2 cores,
  so every collective is a rendezvous of 8 threads. The 8-device step pays roughly
  collectives x this on top of its share of the work, which is why the ratio is large for the
  tiny test models (a 0.5 ms step) and falls as the model grows.

The 8 devices share 2 CPU cores: this measures the lowering's overhead, not a speed-up.
Writes benchmarks/results/decode_overhead.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import timed
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshwright.models import build, get_config
from meshwright.passes.hlo import collective_bytes
from meshwright.runtime.bench import measure_bandwidth

import meshwright as mw

# Bigger "small" models: the same families, widths where the step is no longer dominated by
# fixed per-collective costs.
SIZES = {
    "palm-small": ("palm-tiny", {"n_layers": 4, "d_model": 512, "d_ff": 2048, "n_heads": 8,
                                     "d_head": 64, "vocab_size": 1024, "max_len": 256}),
    "palm-medium": ("palm-tiny", {"n_layers": 4, "d_model": 1024, "d_ff": 4096, "n_heads": 16,
                                      "d_head": 64, "vocab_size": 1024, "max_len": 256}),
    "llama-medium": ("llama-tiny", {"n_layers": 4, "d_model": 1024, "d_ff": 2816, "n_heads": 16,
                                        "n_kv_heads": 4, "d_head": 64, "vocab_size": 1024,
                                        "max_len": 256}),
}


def config_of(name: str):
    if name in SIZES:
        base, fields = SIZES[name]
        return get_config(base).replace(name=name, **fields)
    return get_config(name)


def per_collective_seconds(mesh, repeats: int) -> float:
    """The slope of step time over a chain of k tiny psums (k = 2 ... 32)."""
    spec = P(("x", "y", "z"))
    x = jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, spec))

    def chain(k):
        def f(a):
            for _ in range(k):
                a = a + jax.lax.psum(a, ("x", "y", "z")) * 1e-3
            return a
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec,
                                     check_vma=False))

    ks = [2, 8, 16, 32]
    ts = [timed(chain(k), (x,), repeats) for k in ks]
    return float(np.polyfit(ks, ts, 1)[0])


def step_bytes(args) -> int:
    """Weights and the whole KV cache: what one decode step reads at least once."""
    params, _, cache, _ = args
    return sum(int(x.nbytes) for x in jax.tree.leaves(params)) + \
        sum(int(x.nbytes) for x in jax.tree.leaves(cache))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="palm-tiny,llama-tiny,gpt2-tiny,palm-small,"
                                        "palm-medium,llama-medium")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    mesh = mw.make_mesh({"x": 2, "y": 2, "z": 2})
    bw = measure_bandwidth()["bytes_per_s"]
    per_coll = per_collective_seconds(mesh, args.repeats)
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s; one collective on the simulated 2x2x2 mesh "
          f"{per_coll * 1e6:.0f} us")
    header = (f"{'model':13} {'params':>7} {'1-dev ms':>9} {'roofline ms':>11} {'of roof':>7} "
              f"{'layout':16} {'colls':>5} {'8-dev ms':>9} {'ratio':>6} {'colls x per':>11}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models.split(","):
        config = config_of(name).replace(scan_layers=True)
        model = build(config)
        xs = model.example_args("decode", batch=args.batch, length=8,
                                key=jax.random.PRNGKey(0))
        single = jax.jit(model.decode_step)
        one_s = timed(single, xs, args.repeats)
        roof_s = step_bytes(xs) / bw
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(xs[0]))
        for force in (None, {"ffn": "ws-2d", "attention": "heads", "mesh": (2, 2, 2)}):
            step = mw.shard(model.decode_step, mesh=mesh, force=force) if force else \
                mw.shard(model.decode_step, mesh=mesh, force={"mesh": (2, 2, 2)})
            c = step.compiled(*xs)
            placed = c.place(jax.tree.leaves(xs))
            eight_s = timed(c.compiled, placed, args.repeats)
            count = collective_bytes(c.compiled.as_text())["count"]
            count = sum(count.values()) if isinstance(count, dict) else int(count)
            layout = f"{c.ffn_layout}/{c.attention_layout}"
            row = {"model": name, "params": n_params, "batch": args.batch,
                   "single_device_step_s": one_s, "roofline_s": roof_s,
                   "step_bytes": step_bytes(xs), "bandwidth_bytes_per_s": bw,
                   "layout": layout, "planned": force is None, "collectives": count,
                   "mesh_step_s": eight_s, "ratio": eight_s / one_s,
                   "per_collective_s": per_coll}
            rows.append(row)
            print(f"{name:13} {n_params / 1e6:6.1f}M {one_s * 1e3:9.2f} {roof_s * 1e3:11.2f} "
                  f"{roof_s / one_s:6.0%} {layout + (' (plan)' if force is None else ''):16} "
                  f"{count:5d} {eight_s * 1e3:9.2f} {eight_s / one_s:6.2f} "
                  f"{count * per_coll * 1e3:9.2f}ms", flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "decode_overhead.json")
    with open(out, "w") as f:
        json.dump({"mesh": "2x2x2", "statistic": "median", "repeats": args.repeats,
                   "rows": rows}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
