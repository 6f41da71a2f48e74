"""How fast is the planner? Times `plan` for every preset and a full PaLM 540B frontier sweep.

    python benchmarks/plan_speed.py            # prints a table, writes results/plan_speed.json

Targets (see the task): `meshwright plan` under a second for any preset, the full frontier
sweep (6 chip counts x 11 batches x 2 phases x 2 weight formats x every mesh and layout)
under a minute.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from meshwright.models.config import PRESETS
from meshwright.passes.frontier import sweep
from meshwright.passes.planner import plan

# (chips, batch) tried in order: the first that the planner accepts is timed.
SETTINGS = [(64, 64), (8, 8), (4, 4), (1, 1)]


def time_plan(name: str, phase: str, repeats: int = 5) -> dict:
    for chips, batch in SETTINGS:
        try:
            plan(name, chips=chips, batch=batch, context=2048, phase=phase)
        except ValueError:
            continue
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            p = plan(name, chips=chips, batch=batch, context=2048, phase=phase)
            best = min(best, time.perf_counter() - t0)
        return {"model": name, "phase": phase, "chips": chips, "batch": batch,
                "seconds": best, "candidates": len(p.candidates),
                "layout": f"{p.ffn_layout}/{p.attention_layout} {p.best.mesh}"}
    return {"model": name, "phase": phase, "error": "no setting fits"}


def main() -> dict:
    rows = [time_plan(name, phase) for name in PRESETS for phase in ("prefill", "decode")]
    t0 = time.perf_counter()
    front = sweep("palm-540b", hardware="tpu-v4", progress=False)
    sweep_s = time.perf_counter() - t0

    print(f"{'model':15} {'phase':8} {'chips':>6} {'batch':>6} {'cands':>6} {'ms':>8}  layout")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:15} {r['phase']:8} {r['error']}")
            continue
        print(f"{r['model']:15} {r['phase']:8} {r['chips']:6d} {r['batch']:6d} "
              f"{r['candidates']:6d} {r['seconds'] * 1e3:8.2f}  {r['layout']}")
    slowest = max(r.get("seconds", 0.0) for r in rows)
    print(f"\nslowest plan: {slowest * 1e3:.1f} ms (target < 1000 ms)")
    print(f"PaLM 540B frontier sweep: {front.evaluated} candidates, {len(front.points)} "
          f"feasible points, {sweep_s:.2f} s (target < 60 s)")

    result = {"python": platform.python_version(), "machine": platform.machine(),
              "plans": rows, "slowest_plan_seconds": slowest,
              "frontier": {"model": "palm-540b", "hardware": "tpu-v4",
                           "evaluated": front.evaluated, "points": len(front.points),
                           "seconds": sweep_s}}
    out = Path(__file__).parent / "results" / "plan_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
