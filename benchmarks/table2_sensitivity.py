"""How much do the Table 2 layout choices depend on the fitted tpu-v4 overhead fields?

    python benchmarks/table2_sensitivity.py     # ~1.5 min; writes results/table2_sensitivity.json

Re-plans the four columns of Pope et al. Table 2 (PaLM 540B, 64 TPU v4, context 2048) for
every point of a grid over the six overhead fields and reports how many grid points pick the
published layouts, and the latency / MFU error of the shipped profile.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from meshwright.passes.hardware import get_hardware
from meshwright.passes.planner import plan

TABLE_2 = [  # phase, batch, weights, published (ffn, attention), latency s, MFU
    ("prefill", 1, "int8", ("ws-2d", "heads"), 0.29, 0.43),
    ("decode", 64, "int8", ("ws-2d", "batch"), 1.82, 0.14),
    ("prefill", 512, "bf16", ("wg-xyz", "batch"), 85.2, 0.76),
    ("decode", 512, "bf16", ("ws-2d", "batch"), 6.0, 0.33),
]

GRID = {
    "matmul_efficiency": [0.75, 0.8, 0.85],
    "ici_efficiency": [0.4, 0.5, 0.6, 0.75],
    "compute_memory_overlap": [0.0, 0.25, 0.5, 0.75],
    "collective_step_latency_s": [1e-6, 2e-6, 3e-6, 4e-6],
    "collective_latency_s": [1e-6, 2e-6, 5e-6],
    "step_overhead_s": [0.5e-3, 1e-3, 2e-3],
}


def columns(hw) -> list[dict]:
    out = []
    for phase, batch, weights, layout, latency, mfu in TABLE_2:
        p = plan("palm-540b", hardware=hw, chips=64, batch=batch, context=2048, phase=phase,
                 weights=weights)
        out.append({"column": f"{phase} B{batch} {weights}",
                    "layout": [p.ffn_layout, p.attention_layout], "published": list(layout),
                    "latency_error": p.latency_seconds / latency - 1,
                    "mfu_error": p.mfu / mfu - 1})
    return out


def main() -> dict:
    t0 = time.perf_counter()
    base = get_hardware("tpu-v4")
    shipped = columns(base)
    total = agree = 0
    worst = 0.0
    for values in itertools.product(*GRID.values()):
        cols = columns(base.replace(**dict(zip(GRID, values, strict=True))))
        total += 1
        if all(c["layout"] == c["published"] for c in cols):
            agree += 1
        worst = max(worst, *(abs(c["latency_error"]) for c in cols))
    for c in shipped:
        print(f"{c['column']:20} {'/'.join(c['layout']):14} latency {c['latency_error']:+.1%} "
              f"MFU {c['mfu_error']:+.1%}")
    print(f"\n{agree} of {total} overhead settings choose all four published layouts; "
          f"worst latency error over the grid {worst:.0%} ({time.perf_counter() - t0:.0f} s)")
    result = {"shipped_profile": shipped, "grid": GRID, "settings": total,
              "settings_with_published_layouts": agree, "worst_latency_error_on_grid": worst}
    out = Path(__file__).parent / "results" / "table2_sensitivity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
