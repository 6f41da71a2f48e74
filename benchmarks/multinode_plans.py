"""What crosses the network between nodes: the planner's choice for Llama 3.1 405B and PaLM 540B
on 2-4 H100 nodes (InfiniBand between them) and on 2 TPU v5e slices (DCN between them).

    python benchmarks/multinode_plans.py     # prints the table, writes results/multinode_plans.json

No devices: the analytical model only (`docs/cost_model.md`, section 2b). For each setting the
planner prices every way of crossing the nodes -- replicas, pipeline stages, layouts stretched
over the nodes -- and keeps the cheapest that fits; the table shows the choice, the best of
another kind, and the ways that cannot run with their reasons.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from meshwright.passes.planner import plan

MODELS = ("llama3-405b", "palm-540b")
# (hardware, chips, nodes): 2, 3 and 4 nodes of 8 H100; 2 TPU v5e slices of 64 and of 256
MACHINES = (("h100", 16, 2), ("h100", 24, 3), ("h100", 32, 4), ("tpu-v5e", 128, 2),
            ("tpu-v5e", 512, 2))
# (phase, batch): decode of 64 sequences, prefill of 8 prompts; context 2048, bf16 weights
WORK = (("decode", 64), ("prefill", 8))
CONTEXT = 2048


def row(model: str, hardware: str, chips: int, nodes: int, phase: str, batch: int) -> dict:
    t0 = time.perf_counter()
    p = plan(model, hardware=hardware, chips=chips, nodes=nodes, batch=batch,
             context=CONTEXT, phase=phase, weights="bf16")
    seconds = time.perf_counter() - t0
    x = p.cross_node
    other = next((c for c in p.cross_node_candidates if c.kind != x.kind), None)
    rejected = [{"way": name, "reason": why} for name, why in p.cross_node_rejected]
    return {
        "model": model, "hardware": hardware, "chips": chips, "nodes": nodes,
        "chips_per_node": p.split.chips_per_node, "phase": phase, "batch": batch,
        "context": CONTEXT, "chosen": x.kind, "label": x.label, "slow_axes": x.slow_axes,
        "layout": f"{p.ffn_layout}/{p.attention_layout}", "mesh": str(p.best.mesh),
        "step_seconds": x.step_s, "slow_network_seconds": x.slow_network_s,
        "bubble_seconds": x.bubble_s, "memory_gib_per_chip": x.memory_bytes_per_chip / 2**30,
        "mfu": x.mfu,
        "runner_up": None if other is None else {
            "label": other.label, "step_seconds": other.step_s,
            "slow_network_seconds": other.slow_network_s, "bubble_seconds": other.bubble_s},
        "rejected": rejected, "why": p.explain().split("why: ", 1)[1].split("\n")[0],
        "plan_seconds": seconds,
    }


def main() -> dict:
    rows = [row(m, hw, chips, nodes, phase, batch) for m in MODELS
            for hw, chips, nodes in MACHINES for phase, batch in WORK]
    head = (f"{'model':12} {'machine':16} {'phase':7} {'B':>3}  {'chosen':36} {'layout':12} "
            f"{'mesh':>13} {'step ms':>9} {'slow ms':>8} {'bubble':>8} {'GiB':>5}  "
            f"runner-up (+%)")
    print(head)
    print("-" * len(head))
    for r in rows:
        machine = f"{r['nodes']} x {r['chips_per_node']} {r['hardware']}"
        up = r["runner_up"]
        up_text = (f"{up['label']} (+{up['step_seconds'] / r['step_seconds'] - 1:.0%})"
                   if up else "-")
        print(f"{r['model']:12} {machine:16} {r['phase']:7} {r['batch']:3d}  {r['label']:36} "
              f"{r['layout']:12} {r['mesh']:>13} {r['step_seconds'] * 1e3:9.4g} "
              f"{r['slow_network_seconds'] * 1e3:8.3g} {r['bubble_seconds'] * 1e3:8.4g} "
              f"{r['memory_gib_per_chip']:5.1f}  {up_text}")
    print("\ncannot run (decode rows; prefill is refused for the same reasons):")
    for r in rows:
        if r["phase"] != "decode":
            continue
        for rej in r["rejected"]:
            print(f"  {r['model']} on {r['nodes']} x {r['chips_per_node']} {r['hardware']}, "
                  f"{rej['way']}: {rej['reason']}")
    result = {"python": platform.python_version(), "machine": platform.machine(),
              "context": CONTEXT, "weights": "bf16", "rows": rows}
    out = Path(__file__).parent / "results" / "multinode_plans.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out.relative_to(Path(__file__).parent.parent)}")
    return result


if __name__ == "__main__":
    main()
