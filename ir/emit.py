"""Emitting code into a graph: the equations of a jnp/lax function inserted as nodes.

A pass that replaces an equation by other computation writes that computation as a plain
JAX function and emits it here, so the new nodes are exactly what tracing the function would
give (calls inlined, control flow as regions). `meshwright.ir.trace` (the module; the
package's `trace` attribute is the function) holds the jaxpr walk both use, `emit_jaxpr`.

    >>> (y,) = emit_function(g, lambda a, b: jnp.tanh(a @ b), [x, w], source=node.source)
    >>> g.replace_all_uses_with(node.out, y)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from meshwright.ir.graph import Graph, Literal, Node, Value
from meshwright.ir.trace import constant_operand, emit_jaxpr, read_atom


def emit_function(graph: Graph, fn: Callable, inputs: Sequence[Value | Literal],
                  source: str | None = None, jit_group: int | None = None) -> list[Value]:
    """Insert the equations of `fn(*inputs)` (any jnp/lax code) into `graph`; returns the
    values standing for fn's outputs. Inlined like tracing does; the new nodes carry `source`
    (e.g. the line of the equation they replace) and `jit_group`.

        >>> (y,) = emit_function(g, lambda a, b: jnp.tanh(a @ b), [x, w], source=node.source)
        >>> g.replace_all_uses_with(node.out, y)
    """
    structs = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in inputs]
    closed = jax.make_jaxpr(fn)(*structs)
    jaxpr = closed.jaxpr
    env: dict[Any, Any] = dict(zip(jaxpr.invars, inputs))
    for var, const in zip(jaxpr.constvars, closed.consts):
        env[var] = constant_operand(graph, const, var.aval)
    emit_jaxpr(graph, jaxpr, env, outer_source=source)
    outs = [read_atom(env, v) for v in jaxpr.outvars]
    stop = {v.id for v in inputs if isinstance(v, Value)}
    for node in nodes_between(outs, stop):
        node.source = source
        node.meta.pop("jit_group", None)
        if jit_group is not None:
            node.meta["jit_group"] = jit_group
    return outs


def nodes_between(outs: Sequence[Any], stop: set[int]) -> list[Node]:
    """The equations that compute `outs` from values in `stop` (the ones just emitted)."""
    seen: dict[int, Node] = {}
    frontier = [v for v in outs if isinstance(v, Value)]
    while frontier:
        v = frontier.pop()
        if v.id in stop or v.producer.op in ("input", "constant") or id(v.producer) in seen:
            continue
        seen[id(v.producer)] = v.producer
        frontier.extend(w for w in v.producer.inputs if isinstance(w, Value))
    return list(seen.values())
