"""The interpreter: run a Graph by binding each equation's primitive, in topological order.

It is the numerics oracle for every pass: on CPU, `g(*args)` equals the traced function bit
for bit. Called with tracers (under `jax.jit`), the same loop re-emits the program, which is
how `Graph.as_function()` is jittable.

Per-primitive behaviour is a registry (`INTERPRET_RULES`) with a default that binds the
primitive; control flow rebuilds its body jaxprs from the region Graphs (cached per version).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from meshwright.ir import jax_compat as jc
from meshwright.ir.graph import Graph, Literal, Node, Value, format_aval


class InterpretError(Exception):
    """An equation failed while the graph was being run; names the primitive and source."""


def _bind_default(node: Node, invals: list[Any]) -> list[Any]:
    out = node.primitive.bind(*invals, **node.params)
    return list(out) if node.primitive.multiple_results else [out]


def region_jaxpr(body: Graph) -> Any:
    """A ClosedJaxpr equal to a body Graph (cached until the body changes)."""
    cache = body.__dict__.get("_jaxpr_cache")
    if cache is not None and cache[0] == body.version:
        return cache[1]
    closed = jc.make_closed_jaxpr(lambda *xs: eval_graph(body, list(xs)),
                                  [v.aval for v in body.inputs])
    body.__dict__["_jaxpr_cache"] = (body.version, closed)
    return closed


def _bind_with_regions(node: Node, invals: list[Any]) -> list[Any]:
    params = dict(node.params)
    for key, region in node.regions.items():
        if isinstance(region, (list, tuple)):
            params[key] = tuple(region_jaxpr(b) for b in region)
        else:
            params[key] = region_jaxpr(region)
    out = node.primitive.bind(*invals, **params)
    return list(out) if node.primitive.multiple_results else [out]


# primitive name -> rule(node, input values) -> output values
INTERPRET_RULES: dict[str, Callable[[Node, list[Any]], list[Any]]] = {
    "scan": _bind_with_regions,
    "cond": _bind_with_regions,
    "while": _bind_with_regions,
}


def eval_graph(g: Graph, flat_inputs: list[Any]) -> list[Any]:
    """Run `g` on flat inputs (arrays or tracers); returns the flat outputs."""
    if len(flat_inputs) != len(g.inputs):
        raise InterpretError(f"graph {g.name!r} takes {len(g.inputs)} inputs, "
                             f"got {len(flat_inputs)}")
    env: dict[int, Any] = {v.id: x for v, x in zip(g.inputs, flat_inputs)}
    # Concrete inputs: run each jit group as one compiled call, as the user's function did.
    eager = not any(jc.is_tracer(x) for x in flat_inputs)
    groups = _jit_groups(g) if eager else {}
    done: set[int] = set()

    def read(v):
        return v.value if isinstance(v, Literal) else env[v.id]

    for node in g.topo_order():
        if node.op == "input" or node.id in done:
            continue
        if node.op == "constant":
            env[node.out.id] = node.params["value"]
            continue
        group = groups.get(node.meta.get("jit_group"))
        if group is not None and _run_group(g, group, env):
            done.update(n.id for n in group.nodes)
            continue
        _run_node(g, node, [read(v) for v in node.inputs], env)
    return [read(v) for v in g.outputs]


def bind_node(node: Node, invals: list[Any]) -> list[Any]:
    """One equation on its input values (arrays or tracers): its outputs. Regions (scan,
    cond, while bodies) are rebuilt from their Graphs."""
    rule = INTERPRET_RULES.get(node.op, _bind_with_regions if node.regions else _bind_default)
    return rule(node, invals)


def _run_node(g: Graph, node: Node, invals: list[Any], env: dict[int, Any]) -> None:
    try:
        outs = bind_node(node, invals)
    except InterpretError:
        raise
    except Exception as e:
        raise InterpretError(
            f"while running {node.op!r} (from {node.source or 'an unknown source line'}) "
            f"in graph {g.name!r}: {type(e).__name__}: {e}") from e
    for v, x in zip(node.outputs, outs):
        env[v.id] = x


class _JitGroup:
    """The nodes of one inlined `jit` call, with the values flowing in and out of it."""

    def __init__(self, g: Graph, nodes: list[Node]):
        self.nodes = nodes
        ids = {n.id for n in nodes}
        produced = {o.id for n in nodes for o in n.outputs}
        self.inputs: list[Value] = []
        for n in nodes:
            for v in n.inputs:
                if isinstance(v, Value) and v.id not in produced and v not in self.inputs:
                    self.inputs.append(v)
        self.outputs: list[Value] = [
            o for n in nodes for o in n.outputs
            if g.is_output(o) or any(u.id not in ids for u in g.users(o))]
        self.compiled = None

    def run(self, invals: list[Any]) -> list[Any]:
        if self.compiled is None:
            def fn(*xs):
                local = {v.id: x for v, x in zip(self.inputs, xs)}
                for n in self.nodes:
                    vals = [v.value if isinstance(v, Literal) else local[v.id] for v in n.inputs]
                    _run_node(n.graph, n, vals, local)
                return [local[o.id] for o in self.outputs]

            self.compiled = jax.jit(fn)
        return self.compiled(*invals)


def _jit_groups(g: Graph) -> dict[int, _JitGroup]:
    cache = g.__dict__.get("_group_cache")
    if cache is not None and cache[0] == g.version:
        return cache[1]
    members: dict[int, list[Node]] = {}
    for node in g.topo_order():
        gid = node.meta.get("jit_group")
        if gid is not None:
            members.setdefault(gid, []).append(node)
    groups = {gid: _JitGroup(g, nodes) for gid, nodes in members.items()}
    g.__dict__["_group_cache"] = (g.version, groups)
    return groups


def _run_group(g: Graph, group: _JitGroup, env: dict[int, Any]) -> bool:
    """Run a jit group if all its inputs are ready (a pass may have broken it up: then no)."""
    if not all(v.id in env for v in group.inputs):
        return False
    outs = group.run([env[v.id] for v in group.inputs])
    for v, x in zip(group.outputs, outs):
        env[v.id] = x
    return True


def call_graph(g: Graph, args: tuple, kwargs: dict, check: bool = True):
    """Call a traced graph with the same pytree arguments as the original function."""
    if g.in_tree is None:
        raise InterpretError(f"graph {g.name!r} is a region body; run it with eval_graph")
    flat, tree = jax.tree_util.tree_flatten((args, kwargs))
    if tree != g.in_tree:
        raise InterpretError(f"graph {g.name!r} was traced for arguments structured as "
                             f"{g.in_tree}, got {tree}")
    if check:
        for v, x in zip(g.inputs, flat):
            shape, dtype = np.shape(x), getattr(x, "dtype", None)
            if tuple(shape) != v.shape or (dtype is not None and np.dtype(dtype) != v.dtype):
                got = f"{np.dtype(dtype) if dtype is not None else type(x).__name__}{list(shape)}"
                raise InterpretError(
                    f"input {v.producer.params['path']!r} was traced as {format_aval(v.aval)}, "
                    f"got {got}; trace again for new shapes")
    flat_out = eval_graph(g, flat)
    return jax.tree_util.tree_unflatten(g.out_tree, flat_out)


__all__ = [
    "INTERPRET_RULES",
    "InterpretError",
    "Value",
    "bind_node",
    "call_graph",
    "eval_graph",
    "region_jaxpr",
]
