"""PaLM 8B and PaLM 540B exported for a 4x4x4 TPU v4 slice (64 chips, as in Pope et al.):
collective bytes per device counted in the exported StableHLO against the cost model's
prediction, for the planner's layouts (and, with --all-layouts, every layout it prices on
that mesh), decode and prefill.

    python benchmarks/export_bytes.py [--models palm-8b,palm-540b]
        [--cases decode:64,prefill:1,prefill:16] [--all-layouts] [--layers N] [--breakdown]
    python benchmarks/export_bytes.py --markdown benchmarks/results/export_bytes.json

Every program goes through `passes.export.export_model`, the code path of `meshwright export
MODEL --platform tpu --mesh 4x4x4` (weights as shapes only; 64 simulated CPU devices). Context
2048: decode attends over a KV cache of 2048 positions, prefill processes 2048-token prompts.
"measured" counts the StableHLO as the cost model does (all-gather: output; reduce-scatter:
input; all-reduce, all-to-all: operand; the ppermutes of a looped collective einsum over N
devices: N/(N-1) of their operands, i.e. the collective they replace). `--breakdown` prints
what the lowering emitted grouped by kind and by the equation that emitted it (layer numbers
folded), next to the cost model's own list. `--layers N` exports N layers instead of the
preset's (quick look; the table in the docs uses the full models).

Prints a table and writes benchmarks/results/export_bytes.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import re
import sys
import time
from collections import defaultdict

from meshwright.models import get_config
from meshwright.passes import cost_model as cm
from meshwright.passes.export import export_model
from meshwright.passes.hardware import get_hardware

MESH = (4, 4, 4)
CONTEXT = 2048
HARDWARE = "tpu-v4"
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "perm"}


def priced_layouts(config, phase: str, batch: int) -> list[tuple[str, str]]:
    """Every (FFN, attention) layout the cost model prices for this step on the 4x4x4 mesh."""
    work = cm.StepWorkload(batch, CONTEXT, phase, "bf16")
    out = []
    for ffn in cm.FFN_LAYOUTS:
        for attention in cm.ATTENTION_LAYOUTS:
            try:
                cm.evaluate(config, get_hardware(HARDWARE), cm.Mesh(*MESH), work, ffn,
                            attention)
            except cm.LayoutNotApplicable:
                continue
            out.append((ffn, attention))
    return out


def predicted_list(config, phase: str, batch: int, ffn: str, attention: str,
                   heads: int) -> list[dict]:
    """The cost model's collectives for the step: per layer (times the layers) and per step."""
    work = cm.StepWorkload(batch, CONTEXT, phase, "bf16")
    mesh = cm.Mesh(*MESH)
    rows = []
    for c, times in [(c, config.n_layers) for c in cm.layer_collectives(
            config, mesh, work, ffn, attention, heads)] + [
            (c, 1) for c in cm.step_collectives(config, mesh, work, ffn)]:
        if mesh.size(c.axes) > 1:
            rows.append({"kind": c.kind, "axes": c.axes, "what": c.what, "times": times,
                         "bytes": int(c.bytes_per_chip * times)})
    return rows


def emitted_list(records) -> list[dict]:
    """What the lowering emitted, grouped by kind, axes and site (layer numbers folded)."""
    groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        site = re.sub(r"\.\d+", ".*", r.site)
        g = groups[(r.kind, ",".join(r.axes), site, r.note)]
        g[0] += 1
        g[1] += r.bytes
    return [{"kind": k, "axes": a, "site": s, "note": n, "count": c, "bytes": b}
            for (k, a, s, n), (c, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])]


def run_case(model: str, phase: str, batch: int, layers: int | None,
             force: tuple[str, str] | None) -> dict:
    overrides = [f"n_layers={layers}"] if layers else []
    t0 = time.perf_counter()
    program = export_model(model, platforms=("tpu",), mesh=MESH, phase=phase, batch=batch,
                           length=CONTEXT, max_len=CONTEXT, hardware=HARDWARE,
                           overrides=overrides, force_ffn=force[0] if force else None,
                           force_attention=force[1] if force else None)
    seconds = time.perf_counter() - t0
    m = program.manifest
    counted = program.collectives()
    c = program.compiled
    config = get_config(model).with_overrides(overrides)
    predicted = (m["predicted"] or {}).get("comm_bytes_per_chip")
    heads = c.predicted.padded_heads if c.predicted is not None else config.n_heads
    return {"model": model, "phase": phase, "batch": batch, "layers": config.n_layers,
            "ffn": m["layouts"]["ffn"], "attention": m["layouts"]["attention"],
            "planner": force is None, "predicted_bytes": predicted,
            "measured_bytes": counted["model_bytes"], "stablehlo_bytes": counted["total_bytes"],
            "measured_by_kind": counted["bytes"], "count_by_kind": counted["count"],
            "loops": counted["loops"], "fallbacks": m["replicated_fallbacks"],
            "export_s": round(seconds, 2),
            "emitted": emitted_list(c.records),
            "predicted_collectives": predicted_list(config, phase, batch, c.ffn_layout,
                                                    c.attention_layout, heads)}


def short_reason(message: str) -> str:
    """The planner's refusal in a few words: its last sentence's first clause.

        >>> short_reason("no layout can run ...: ... At most 32 chips are usable here "
        ...              "(heads 16, or batch 1); use chips <= 32 or batch >= 64.")
        'refused by the planner: at most 32 chips are usable here (heads 16, or batch 1)'
    """
    last = message.rstrip(".").rsplit(". ", 1)[-1].split(";")[0]
    return f"refused by the planner: {last[:1].lower()}{last[1:]}"


def table_row(r: dict) -> str:
    mb = 1e6
    if r.get("refused"):
        return f"{r['model']:10} {r['phase']:7} {r['batch']:>5}  {short_reason(r['refused'])}"
    layout = f"{r['ffn']}/{r['attention']}" + ("*" if r.get("planner") else "")
    kinds = " ".join(f"{r['measured_by_kind'].get(k, 0) / mb:9.1f}" for k in KINDS)
    pred = r["predicted_bytes"]
    ratio = f"{r['measured_bytes'] / pred:6.2f}" if pred else "     -"
    return (f"{r['model']:10} {r['phase']:7} {r['batch']:>5}  {layout:14} "
            f"{(pred or 0) / mb:10.1f} {r['measured_bytes'] / mb:10.1f} {ratio}  {kinds}")


def header() -> str:
    kinds = " ".join(f"{SHORT[k]:>9}" for k in KINDS)
    return (f"{'model':10} {'phase':7} {'batch':>5}  {'layout':14} {'pred MB':>10} "
            f"{'meas MB':>10} {'ratio':>6}  {kinds}")


def markdown(path: str) -> str:
    """The results file as the table in docs/export.md."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    out = [("| model | phase | batch | layout | predicted MB | measured MB | "
            "measured/predicted | all-gather | reduce-scatter | all-reduce | all-to-all | "
            "ppermute |"),
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("refused"):
            out.append(f"| {r['model']} | {r['phase']} | {r['batch']} | "
                       f"{short_reason(r['refused'])} | | | | | | | | |")
            continue
        layout = f"{r['ffn']}/{r['attention']}" + (" (planner)" if r["planner"] else "")
        pred = r["predicted_bytes"]
        kinds = " | ".join(f"{r['measured_by_kind'].get(k, 0) / 1e6:.1f}" for k in KINDS)
        out.append(f"| {r['model']} | {r['phase']} | {r['batch']} | {layout} | "
                   f"{pred / 1e6:.1f} | {r['measured_bytes'] / 1e6:.1f} | "
                   f"{r['measured_bytes'] / pred:.2f} | {kinds} |")
    return "\n".join(out)


def print_breakdown(r: dict) -> None:
    print("    emitted by the lowering (per device, all layers):")
    for e in r["emitted"]:
        print(f"      {e['kind']:18} {e['axes']:6} x{e['count']:<5} {e['bytes'] / 1e6:10.3f} MB"
              f"  {e['site']} ({e['note']})")
    print("    predicted by the cost model:")
    for p in r["predicted_collectives"]:
        print(f"      {p['kind']:18} {p['axes']:6} x{p['times']:<5} {p['bytes'] / 1e6:10.3f} MB"
              f"  {p['what']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", metavar="JSON",
                   help="print the table of an earlier run's results file and exit")
    p.add_argument("--models", default="palm-8b,palm-540b")
    p.add_argument("--cases", default="decode:64,prefill:1,prefill:16",
                   help="phase:batch, comma-separated (default: %(default)s)")
    p.add_argument("--all-layouts", action="store_true",
                   help="every layout the cost model prices on 4x4x4, not only the planner's")
    p.add_argument("--layers", type=int, default=None,
                   help="export this many layers instead of the preset's (quick look)")
    p.add_argument("--breakdown", action="store_true",
                   help="print the collectives by site next to the cost model's list")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "export_bytes.json"))
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    rows = []
    print(header())
    print("-" * len(header()))
    for model in args.models.split(","):
        for case in args.cases.split(","):
            phase, batch = case.split(":")
            batch = int(batch)
            config = get_config(model)
            if args.layers:
                config = config.replace(n_layers=args.layers)
            try:
                planned = run_case(model, phase, batch, args.layers, None)
            except ValueError as e:  # the planner finds no layout for this step
                row = {"model": model, "phase": phase, "batch": batch, "refused": str(e)}
                rows.append(row)
                print(table_row(row), flush=True)
                continue
            rows.append(planned)
            print(table_row(planned), flush=True)
            if args.breakdown:
                print_breakdown(planned)
            if not args.all_layouts:
                continue
            for ffn, attention in priced_layouts(config, phase, batch):
                if (ffn, attention) == (planned["ffn"], planned["attention"]):
                    continue
                row = run_case(model, phase, batch, args.layers, (ffn, attention))
                rows.append(row)
                print(table_row(row), flush=True)
                if args.breakdown:
                    print_breakdown(row)
    priced = [r for r in rows if not r.get("refused") and r["predicted_bytes"]]
    worst = max(priced, key=lambda r: abs(r["measured_bytes"] / r["predicted_bytes"] - 1))
    within = sum(abs(r["measured_bytes"] / r["predicted_bytes"] - 1) <= 0.10 for r in priced)
    print(f"{within}/{len(priced)} within 10% of the cost model; furthest: {worst['model']} "
          f"{worst['phase']} {worst['ffn']}/{worst['attention']} "
          f"{worst['measured_bytes'] / worst['predicted_bytes']:.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"mesh": "x".join(map(str, MESH)), "hardware": HARDWARE, "context": CONTEXT,
                   "layers": args.layers, "rows": rows}, f, indent=2)
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
