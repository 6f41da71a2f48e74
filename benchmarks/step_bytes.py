"""The bytes a compiled decode step moves in memory, against the bytes the cost model prices.

    python benchmarks/step_bytes.py [--families gpt2,palm,llama] [--batches 1,8,32]
                                    [--length 256] [--devices 8] [--no-sharded]

For each reference family (at about GPT-2 124M size) and batch, the decode step with a KV
window of `--length` positions, compiled three ways:

- `loop`: one device, `jax.jit` with the cache donated, layers as a Python loop (how the
  engine serves every model);
- `scan`: the same with the layers as a `jax.lax.scan` over stacked weights (batch 8 only);
- `sharded`: `mw.shard` on `--devices` simulated devices in the layout the planner picks
  (cpu profile), cache donated; per device.

Columns:
- `model MB`: the cost model's bytes per step per chip: the weights a step streams
  (`CandidateCost.weight_bytes_read_per_chip`: the layers and the unembedding, split as the
  layout splits them) plus this chip's KV cache at the window's length, each read once;
- `HLO MB`: our count from the compiled HLO text (`passes.hlo.memory_traffic`): every
  top-level instruction reads its operands and writes its result, loop bodies times their trip
  count; fusions count what they touch (a slice reads only the slice, an in-place update
  writes only the update); bitcasts and parameters move nothing. It counts every value once
  per use, so activations and a value still in cache count too: an upper bound on DRAM
  traffic;
- `XLA MB`: XLA's own `cost_analysis()["bytes accessed"]` for comparison; it counts an
  in-place update as reading and writing its whole buffer, and a loop body once;
- `ratio`: HLO / model.

Writes benchmarks/results/step_bytes.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from meshwright.models import build, get_config
from meshwright.passes.cost_model import Mesh, StepWorkload, evaluate
from meshwright.passes.hardware import get_hardware
from meshwright.passes.hlo import memory_traffic
from meshwright.runtime.layouts import example_args

import meshwright as mw

# About GPT-2 124M each, in the three styles (vocabulary 32000 for the two RoPE families).
FAMILIES = {
    "gpt2": ("gpt2-small", {}),
    "palm": ("palm-tiny", {"n_layers": 12, "d_model": 768, "d_ff": 3072, "n_heads": 12,
                           "n_kv_heads": 1, "d_head": 64, "vocab_size": 32000,
                           "max_len": 1024}),
    "llama": ("llama-tiny", {"n_layers": 12, "d_model": 768, "d_ff": 2048, "n_heads": 12,
                             "n_kv_heads": 4, "d_head": 64, "vocab_size": 32000,
                             "max_len": 1024}),
}


def config_of(family: str, scan: bool = False):
    name, fields = FAMILIES[family]
    return get_config(name).replace(scan_layers=scan, **fields)


def xla_bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", 0.0))


def one_device(family: str, batch: int, length: int, scan: bool) -> dict:
    cfg = config_of(family, scan)
    model = build(cfg)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    cache = jax.eval_shape(lambda: model.init_cache(batch, length))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jax.jit(model.decode_step, donate_argnums=2).lower(
        params, rows, cache, rows).compile()
    predicted = evaluate(cfg, get_hardware("cpu"), Mesh(1, 1, 1),
                         StepWorkload(batch, length, "decode", "fp32"), "ws-1d", "heads")
    return row(family, batch, length, "scan" if scan else "loop", "1 device", predicted,
               memory_traffic(compiled.as_text()), xla_bytes(compiled))


def sharded(family: str, batch: int, length: int, devices: int) -> dict:
    cfg = config_of(family)
    model = build(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    args = example_args(cfg, params, "decode", batch, length)
    step = mw.shard(model.decode_step, mesh=None if devices == len(jax.devices()) else
                    {"z": devices}, hardware="cpu",
                    donate_argnums=2)
    c = step.compiled(*args)
    layout = f"{c.ffn_layout}/{c.attention_layout} " + "x".join(
        str(c.mesh_shape[a]) for a in "xyz")
    return row(family, batch, length, "sharded", layout, c.predicted,
               memory_traffic(c.compiled.as_text()), xla_bytes(c.compiled))


def row(family, batch, length, how, layout, predicted, traffic, xla) -> dict:
    model_bytes = predicted.weight_bytes_read_per_chip + predicted.kv_cache_bytes_per_chip
    return {"family": family, "batch": batch, "length": length, "how": how, "layout": layout,
            "model_bytes": model_bytes,
            "model_weight_bytes": predicted.weight_bytes_read_per_chip,
            "model_kv_bytes": predicted.kv_cache_bytes_per_chip,
            "hlo_bytes": traffic["total"], "hlo_read": traffic["read"],
            "hlo_written": traffic["written"], "xla_bytes": xla,
            "ratio": traffic["total"] / model_bytes,
            "largest": [[int(b), name] for b, name in traffic["largest"][:5]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="gpt2,palm,llama")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--length", type=int, default=256, help="KV window positions")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--no-sharded", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_bytes.json"))
    args = p.parse_args(argv)
    families = args.families.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for family in families:
        for batch in batches:
            rows.append(one_device(family, batch, args.length, scan=False))
            print_row(rows[-1])
            if batch == 8:
                rows.append(one_device(family, batch, args.length, scan=True))
                print_row(rows[-1])
            if not args.no_sharded:
                rows.append(sharded(family, batch, args.length, args.devices))
                print_row(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                         indent=2))
    return 0


HEADER = (f"{'family':<7}{'batch':>6}{'how':>9}  {'layout':<20}{'model MB':>10}{'HLO MB':>9}"
          f"{'XLA MB':>9}{'ratio':>7}  largest")


def print_row(r: dict) -> None:
    if not getattr(print_row, "started", False):
        print(HEADER)
        print("-" * len(HEADER))
        print_row.started = True
    top = ", ".join(f"{name} {b / 1e6:.1f}" for b, name in r["largest"][:2])
    print(f"{r['family']:<7}{r['batch']:>6}{r['how']:>9}  {r['layout']:<20}"
          f"{r['model_bytes'] / 1e6:>10.1f}{r['hlo_bytes'] / 1e6:>9.1f}"
          f"{r['xla_bytes'] / 1e6:>9.1f}{r['ratio']:>7.2f}  {top}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
