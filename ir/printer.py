"""Text and DOT forms of a Graph.

One line per equation, deterministic names (inputs by argument path, results numbered in
print order), shapes inline, annotations in braces when analyses have written them:

    %7:f32[2,8,64]{batch,length,embed} = dot_general[dimension_numbers=...] %6 %params.w_in

The same function traced twice prints the same text, so golden-text tests can diff it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from meshwright.ir.graph import Graph, Literal, Node, Value, format_aval

# Params that never print: defaults that carry no information, or objects without a stable text.
_HIDDEN_PARAMS = {"out_sharding", "sharding", "accuracy", "jvp_jaxpr_fun", "jvp", "bwd", "fwd",
                  "symbolic_zeros", "in_layouts", "out_layouts", "ctx_mesh",
                  "compiler_options_kvs", "_split_transpose", "out_dtype"}

# Collective primitives, highlighted in DOT and counted in summaries.
COLLECTIVES = frozenset({"all_gather", "psum", "psum_scatter", "reduce_scatter", "all_to_all",
                         "ppermute", "pmax", "pmin", "all_gather_invariant", "psum_invariant"})


def _format_param(value: Any) -> str:
    if isinstance(value, np.generic) and not isinstance(value, np.dtype):
        value = value.item()
    if isinstance(value, np.dtype) or type(value).__name__ == "dtype":
        return str(value)
    if isinstance(value, type):
        return value.__name__
    if callable(value) and not isinstance(value, (tuple, list)):
        return getattr(value, "__name__", type(value).__name__)
    if isinstance(value, np.ndarray):
        return f"array{format_aval(value)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_format_param(v) for v in value)
        if isinstance(value, tuple) and len(value) == 1:
            inner += ","
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    text = repr(value)
    if " at 0x" in text:  # an object with no stable text: its type is the stable part
        return type(value).__name__
    return text


def format_params(node: Node) -> str:
    items = []
    for key in sorted(node.params):
        value = node.params[key]
        if key in _HIDDEN_PARAMS or value is None:
            continue
        if node.op == "input" or node.op == "constant":
            continue
        items.append(f"{key}={_format_param(value)}")
    return f"[{', '.join(items)}]" if items else ""


def _annotation(v: Value) -> str:
    """`{batch,length,embed}` from node.meta["axes"] (and shardings) when present."""
    meta = v.producer.meta if v.producer is not None else {}
    axes = meta.get("axes")
    sharding = meta.get("sharding")
    if axes is None and sharding is None:
        return ""
    labels = []
    axes_v = axes[v.index] if axes is not None and v.index < len(axes) else None
    shard_v = sharding[v.index] if sharding is not None and v.index < len(sharding) else None
    for d in range(len(v.shape)):
        label = axes_v[d] if axes_v is not None and axes_v[d] is not None else "?"
        if shard_v is not None and shard_v[d]:
            label += "_" + "".join(shard_v[d]) if isinstance(shard_v[d], (tuple, list)) \
                else f"_{shard_v[d]}"
        labels.append(label)
    return "{" + ",".join(labels) + "}"


class _Namer:
    def __init__(self):
        self.names: dict[int, str] = {}
        self.counter = 0
        self.constants = 0

    def define(self, v: Value) -> str:
        if v.producer is not None and v.producer.op == "input" and v.producer.params["path"]:
            name = "%" + v.producer.params["path"]
        elif v.producer is not None and v.producer.op == "constant":
            name = f"%c{self.constants}"
            self.constants += 1
        else:
            name = f"%{self.counter}"
            self.counter += 1
        self.names[v.id] = name
        return name

    def use(self, v: Any) -> str:
        if isinstance(v, Literal):
            return repr(v)
        return self.names.get(v.id, f"%<undefined #{v.id}>")


def format_graph(g: Graph, source: bool = False, meta: bool = True) -> str:
    namer = _Namer()
    lines: list[str] = []
    _format_into(g, namer, lines, indent="", header=g.name, source=source, meta=meta)
    return "\n".join(lines)


def value_names(g: Graph) -> dict[int, str]:
    """value id -> the name the text form gives it (`%params.w`, `%12`), for reports that
    point at lines of `format_graph(g)`."""
    namer = _Namer()
    _format_into(g, namer, [], indent="", header=g.name, source=False, meta=False)
    return namer.names


def _decl(namer: _Namer, v: Value, meta: bool) -> str:
    return f"{namer.define(v)}:{format_aval(v.aval)}{_annotation(v) if meta else ''}"


def _format_into(g: Graph, namer: _Namer, lines: list[str], indent: str, header: str,
                 source: bool, meta: bool) -> None:
    order = g.topo_order()
    ins = [_decl(namer, v, meta) for v in g.inputs]
    lines.append(f"{indent}{header}({', '.join(ins)}) {{")
    body_indent = indent + "  "
    for node in order:
        if node.op == "input":
            continue
        if node.op == "constant":
            lines.append(f"{body_indent}{_decl(namer, node.out, meta)} = constant")
            continue
        operands = " ".join(namer.use(v) for v in node.inputs)
        results = ", ".join(_decl(namer, o, meta) for o in node.outputs)
        line = f"{body_indent}{results} = {node.op}{format_params(node)}"
        if operands:
            line += " " + operands
        extra = _meta_suffix(node) if meta else ""
        if source and node.source:
            extra += f"  # {node.source}"
        if node.regions:
            lines.append(line + " {" + extra)
            for key, region in node.regions.items():
                bodies = region if isinstance(region, (list, tuple)) else [region]
                for i, body in enumerate(bodies):
                    label = key if len(bodies) == 1 else f"{key}[{i}]"
                    _format_into(body, namer, lines, body_indent + "  ", label, source, meta)
            lines.append(f"{body_indent}}}")
        else:
            lines.append(line + extra)
    outs = ", ".join(namer.use(v) for v in g.outputs)
    lines.append(f"{body_indent}return {outs}")
    lines.append(f"{indent}}}")


def _meta_suffix(node: Node) -> str:
    """Short, stable annotations other than axes: block membership, notes of passes."""
    parts = []
    block = node.meta.get("block")
    if block is not None:
        parts.append(f"block={block}")
    note = node.meta.get("note")
    if note:
        parts.append(str(note))
    looped = node.meta.get("collective_einsum")  # the collective-einsum pass's decision
    if looped is not None:
        parts.append(str(looped))
    collectives = node.meta.get("collectives")
    if collectives:
        parts.append("collectives: " + ", ".join(collectives))
    return f"  # {'; '.join(parts)}" if parts else ""


# ---- DOT ---------------------------------------------------------------------------------------


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: Graph) -> str:
    namer = _Namer()
    lines = [f'digraph "{_dot_escape(g.name)}" {{', "  rankdir=TB;",
             '  node [fontname="monospace", fontsize=10];']
    _dot_into(g, namer, lines, prefix="n", indent="  ")
    lines.append("}")
    return "\n".join(lines)


def _dot_into(g: Graph, namer: _Namer, lines: list[str], prefix: str, indent: str) -> None:
    ids = {}
    for node in g.topo_order():
        nid = f"{prefix}{node.id}"
        ids[node.id] = nid
        outs = [namer.define(o) for o in node.outputs]
        shapes = ", ".join(format_aval(o.aval) + _annotation(o) for o in node.outputs)
        if node.op == "input":
            label, style = f"{outs[0]}\\n{shapes}", 'shape=ellipse, style=filled, fillcolor="#e8f0ff"'
        elif node.op == "constant":
            label, style = f"constant {outs[0]}\\n{shapes}", "shape=note"
        elif node.op in COLLECTIVES or node.meta.get("collectives"):
            label = f"{node.op}{_dot_escape(format_params(node))}\\n{shapes}"
            if node.meta.get("collectives"):
                label += "\\n" + _dot_escape("; ".join(node.meta["collectives"]))
            style = 'shape=box, style="filled,bold", fillcolor="#ffd6d6", color="#c00000"'
        elif node.regions:
            label = f"{node.op} ({sum(len(b.equations()) for b in node.region_graphs())} " \
                    f"equations in body)\\n{shapes}"
            style = 'shape=box3d, style=filled, fillcolor="#fff3c4"'
        else:
            label, style = f"{node.op}\\n{shapes}", "shape=box"
            if node.op == "dot_general":
                style = 'shape=box, style=filled, fillcolor="#d9f2d9"'
        lines.append(f'{indent}{nid} [label="{label}", {style}];')
    for u, v, key in sorted(g._nx.edges(keys=True)):
        node = g.node(u)
        value = node.outputs[[o.id for o in node.outputs].index(key[0])]
        lines.append(f'{indent}{ids[u]} -> {ids[v]} [label="{format_aval(value.aval)}", '
                     f'fontsize=8];')
    out_id = f"{prefix}_out"
    lines.append(f'{indent}{out_id} [label="return", shape=oval];')
    for o in g.outputs:
        if isinstance(o, Value):
            lines.append(f"{indent}{ids[o.producer.id]} -> {out_id};")
