"""`Graph.summary()`: op counts, FLOPs of every dot_general, parameter and argument bytes.

Counts and FLOPs inside a scan body are multiplied by the scan's length (what runs, not what
is written). A *parameter* is an input that reaches the weight side of a dot_general or the
table side of a gather only through layout operations (reshape, transpose, convert, slicing,
a scan's per-layer slice) - weights, not activations or caches: `passes.analysis`'s
`weight_inputs`, the definition every pass uses.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from meshwright.ir.graph import Graph, Node, Value, flops_of_dot_general, format_aval


def _nbytes(v: Value) -> int:
    return int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize


def summarize(g: Graph) -> dict[str, Any]:
    ops: Counter[str] = Counter()
    dots = []
    total_flops = 0
    for node, trips in g.walk():
        ops[node.op] += trips
        if node.op == "dot_general":
            lhs, rhs = node.inputs
            f = flops_of_dot_general(lhs.shape, rhs.shape, node.params["dimension_numbers"])
            dots.append({"lhs": format_aval(lhs.aval), "rhs": format_aval(rhs.aval),
                         "out": format_aval(node.out.aval), "flops": f, "times": trips,
                         "source": node.source})
            total_flops += f * trips
    from meshwright.passes.analysis import analyze  # the passes' analysis: one definition

    params = analyze(g).weight_inputs
    by_argument: dict[str, int] = {}
    for v in g.inputs:
        arg = (v.producer.params["path"] or "input").split(".")[0]
        by_argument[arg] = by_argument.get(arg, 0) + _nbytes(v)
    constants = sum(_nbytes(n.out) for n in g.topo_order() if n.op == "constant")
    return {
        "name": g.name,
        "equations": len(g.equations()),
        "nodes_including_regions": sum(1 for _ in _all_nodes(g)),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dot_generals": dots,
        "flops": total_flops,
        "parameter_bytes": sum(_nbytes(v) for v in g.inputs if v.id in params),
        "parameter_count": sum(int(np.prod(v.shape)) for v in g.inputs if v.id in params),
        "argument_bytes": by_argument,
        "constant_bytes": constants,
    }


def _all_nodes(g: Graph):
    for node in g.equations():
        yield node
        for body in node.region_graphs():
            yield from _all_nodes(body)


def _human(n: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}"
        n /= 1000
    return f"{n:.3g} E{unit}"


def format_summary(s: dict[str, Any]) -> str:
    lines = [(f"summary of {s['name']}: {s['equations']} equations at top level, "
             f"{s['nodes_including_regions']} including region bodies"),
             f"  FLOPs (dot_general, per call): {_human(s['flops'], 'FLOP')}",
             f"  parameters: {s['parameter_count']:,} ({_human(s['parameter_bytes'], 'B')})",
             "  argument bytes: " + ", ".join(f"{k}={_human(v, 'B')}"
                                               for k, v in s["argument_bytes"].items())]
    lines.append("  ops (executed counts): " + ", ".join(f"{k} {v}" for k, v in s["ops"].items()))
    lines.append("  dot_generals:")
    for d in s["dot_generals"]:
        times = f" x{d['times']}" if d["times"] > 1 else ""
        lines.append(f"    {d['lhs']} . {d['rhs']} -> {d['out']}: "
                     f"{_human(d['flops'], 'FLOP')}{times}")
    return "\n".join(lines)


__all__ = ["Node", "format_summary", "summarize"]
