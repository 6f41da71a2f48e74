"""`Graph.summary()`: op counts, FLOPs of every dot_general, parameter and argument bytes.

Counts and FLOPs inside a scan body are multiplied by the scan's length (what runs, not what
is written). A *parameter* is an input that reaches the weight side of a dot_general or the
table side of a gather only through layout operations (reshape, transpose, convert, slicing,
a scan's per-layer slice) - weights, not activations or caches.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from meshwright.ir.graph import Graph, Node, Value, flops_of_dot_general, format_aval

# Operations through which a weight is still "the same weight".
_VIEW_OPS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze",
                       "broadcast_in_dim", "slice", "dynamic_slice", "copy", "copy_p",
                       "expand_dims", "rev"})


def _nbytes(v: Value) -> int:
    return int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize


def _is_float(g: Graph, value_id: int) -> bool:
    for v in g.inputs:
        if v.id == value_id:
            return np.issubdtype(v.dtype, np.floating) or str(v.dtype) == "bfloat16"
    return True  # an input of an enclosing graph: checked where it entered


def _param_inputs(g: Graph, origin: dict[int, int | None]) -> set[int]:
    """Ids of top-level input values used as weights; `origin` maps value id -> input id."""
    found: set[int] = set()
    for node in g.topo_order():
        if node.op == "input":
            continue
        ins = [origin.get(v.id) if isinstance(v, Value) else None for v in node.inputs]
        if node.op in _VIEW_OPS and ins and ins[0] is not None:
            origin[node.outputs[0].id] = ins[0]
        elif node.op == "dot_general":
            # A weight is contracted (an outer product, like RoPE's positions x frequencies,
            # contracts nothing) and is floating point (positions and ids are integers).
            (contracting, _), _ = node.params["dimension_numbers"]
            if not contracting:
                continue
            lhs, rhs = (i if i is not None and _is_float(g, i) else None for i in ins)
            if rhs is not None and (lhs is None or lhs != rhs):
                found.add(rhs)  # x @ w, or both inputs: by convention the right one is the weight
            elif lhs is not None and rhs is None:
                found.add(lhs)  # w @ x
        elif node.op == "gather" and ins and ins[0] is not None:
            found.add(ins[0])
        elif node.op == "scan":
            body: Graph = node.regions["jaxpr"]
            n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
            inner: dict[int, int | None] = {}
            for i, (outer, bv) in enumerate(zip(ins, body.inputs)):
                if n_consts <= i < n_consts + n_carry:
                    continue  # a carry changes every iteration: not a weight
                inner[bv.id] = outer
            for bv in body.inputs:
                inner.setdefault(bv.id, None)
            found |= _param_inputs(body, inner)
    return found


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
    origin = {v.id: v.id for v in g.inputs}
    params = _param_inputs(g, origin)
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
