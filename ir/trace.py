"""Tracing: a JAX function -> jaxpr -> `Graph`.

Call-like equations (`jit`/`pjit`, `custom_jvp_call`, `custom_vjp_call`, `closed_call`,
`remat`) are inlined: their bodies become ordinary nodes, so passes see one flat program.
Control flow (`scan`, `cond`, `while`) stays one node with body Graphs in `node.regions`:
layers written as a scan are planned once, not once per layer.

What to do with each primitive is a registry keyed by name (`INLINE_RULES`, `REGION_PARAMS`),
with the default "keep the equation as a node".
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from meshwright.ir import jax_compat as jc
from meshwright.ir.graph import Graph, Literal


class UnsupportedError(Exception):
    """The function uses something meshwright cannot trace or run; the message says what."""


# Call-like primitive -> the param holding the body to inline.
INLINE_RULES: dict[str, Callable[[dict], Any]] = {
    "jit": lambda p: p["jaxpr"],
    "pjit": lambda p: p["jaxpr"],
    "closed_call": lambda p: p["call_jaxpr"],
    "core_call": lambda p: p["call_jaxpr"],
    "custom_jvp_call": lambda p: p["call_jaxpr"],
    "custom_vjp_call": lambda p: p["call_jaxpr"],
    "custom_vjp_call_jaxpr": lambda p: p["fun_jaxpr"],
    "remat": lambda p: p["jaxpr"],
    "checkpoint": lambda p: p["jaxpr"],
    "custom_lin": None,  # appears only under differentiation: unsupported below
}

# Control-flow primitive -> the params that hold body jaxprs (kept as regions).
REGION_PARAMS: dict[str, tuple[str, ...]] = {
    "scan": ("jaxpr",),
    "cond": ("branches",),
    "while": ("cond_jaxpr", "body_jaxpr"),
}

# Primitives with side effects the compiler cannot shard or replay.
UNSUPPORTED: dict[str, str] = {
    "debug_callback": "remove jax.debug.print/jax.debug.callback from the traced function",
    "io_callback": "move the host callback out of the traced function",
    "debug_print": "remove jax.debug.print from the traced function",
    "custom_lin": "trace the forward function, not its derivative",
}


def argument_names(fn: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Names for the positional and keyword arguments (from fn's signature when it has one)."""
    names = [f"arg{i}" for i in range(len(args))]
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
        positional = []
        for name, param in sig.parameters.items():
            if name not in bound.arguments:
                continue
            if param.kind == param.VAR_POSITIONAL:
                positional += [f"{name}{i}" for i in range(len(bound.arguments[name]))]
            elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                positional.append(name)
        if len(positional) >= len(args):
            names = positional[:len(args)]
    except (TypeError, ValueError):
        pass
    return names


def _path_name(prefix: str, keypath: tuple) -> str:
    parts = [prefix]
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        else:
            parts.append(str(k).strip(".[]'\""))
    return ".".join(parts)


def trace(fn: Callable, *args, **kwargs) -> Graph:
    """Trace `fn(*args, **kwargs)` into a Graph (arrays or ShapeDtypeStructs, any pytrees).

        >>> g = trace(lambda x: x * 2.0, jnp.ones(3))
        >>> g(jnp.arange(3.0))
        Array([0., 2., 4.], dtype=float32)
    """
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args, **kwargs)
    except Exception as e:
        raise UnsupportedError(
            f"could not trace {getattr(fn, '__name__', fn)!r} with JAX: {type(e).__name__}: {e}"
        ) from e
    names = argument_names(fn, args, kwargs)
    leaves_with_paths = []
    for i, a in enumerate(args):
        leaves_with_paths += [_path_name(names[i], p)
                              for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    for k in kwargs:
        leaves_with_paths += [_path_name(k, p)
                              for p, _ in jax.tree_util.tree_flatten_with_path(kwargs[k])[0]]
    name = getattr(fn, "__name__", "graph")
    if name == "<lambda>":
        name = "graph"
    g = graph_from_jaxpr(closed, name=name, input_paths=leaves_with_paths)
    g.in_tree = jax.tree_util.tree_structure((args, kwargs))
    g.out_tree = jax.tree_util.tree_structure(out_shape)
    return g


def graph_from_jaxpr(closed: Any, name: str = "graph",
                     input_paths: list[str] | None = None) -> Graph:
    """A Graph for a ClosedJaxpr (or Jaxpr); regions are converted recursively."""
    closed = jc.closed(closed)
    jaxpr = closed.jaxpr
    g = Graph(name)
    env: dict[Any, Any] = {}
    # Region bodies have no argument names: their inputs print as numbered values.
    paths = input_paths if input_paths and len(input_paths) == len(jaxpr.invars) else \
        [None] * len(jaxpr.invars)
    # Unique, deterministic input names even when paths repeat.
    seen: dict[str, int] = {}
    for var, path in zip(jaxpr.invars, paths):
        n = seen.get(path, 0)
        seen[path] = n + 1
        env[var] = g.add_input(var.aval, path if n == 0 or path is None else f"{path}#{n}")
    for var, const in zip(jaxpr.constvars, closed.consts):
        env[var] = constant_operand(g, const, var.aval)
    emit_jaxpr(g, jaxpr, env)
    g.set_outputs([read_atom(env, v) for v in jaxpr.outvars])
    return g


def constant_operand(g: Graph, value: Any, aval: Any):
    """A jaxpr constant as an operand of g: a scalar as a Literal, else a constant node."""
    if np.ndim(value) == 0:
        return Literal(np.asarray(value, dtype=aval.dtype), aval)
    return g.add_constant(value)


def read_atom(env: dict, atom: Any):
    """The operand a jaxpr atom stands for: a Literal for a jaxpr literal, else env[atom]."""
    if jc.is_literal(atom):
        return Literal(atom.val, atom.aval)
    return env[atom]


# Inlined calls whose body the user's function runs as one compiled unit: the interpreter runs
# the nodes of one such call (a "jit group", node.meta["jit_group"]) as one jitted function
# again, so that XLA's fusion inside it gives the same bits as in the original function.
_COMPILED_CALLS = frozenset({"jit", "pjit"})


def emit_jaxpr(g: Graph, jaxpr: Any, env: dict, outer_source: str | None = None) -> None:
    """Add the equations of `jaxpr` (an open Jaxpr) to g as nodes, as tracing does: calls
    inlined, control flow kept as region nodes, unsupported primitives refused. `env` maps
    the jaxpr's input and const vars to g's operands on entry and gains its equations'
    outputs (read them with `read_atom`); an equation without a source line of its own
    takes `outer_source`. `meshwright.ir.emit.emit_function` does this for a jnp function."""
    _emit(g, jaxpr, env, group=None, groups=itertools.count(), outer_source=outer_source)


def _emit(g: Graph, jaxpr: Any, env: dict, group: int | None, groups,
          outer_source: str | None = None) -> None:
    for eqn in jaxpr.eqns:
        prim = eqn.primitive
        name = prim.name
        # inside an inlined call without a user frame of its own: the call's line
        source = jc.source_line(eqn) or outer_source
        if name in UNSUPPORTED or (eqn.effects and name not in REGION_PARAMS):
            hint = UNSUPPORTED.get(name, "remove the side effect from the traced function")
            raise UnsupportedError(
                f"unsupported primitive {name!r} at {source or 'an unknown source line'}: it has "
                f"side effects ({', '.join(sorted(map(str, eqn.effects))) or name}) that "
                f"meshwright cannot shard or replay; {hint}")
        invals = [read_atom(env, v) for v in eqn.invars]
        inline = INLINE_RULES.get(name)
        if inline is not None:
            body = jc.closed(inline(eqn.params))
            sub_env: dict[Any, Any] = {}
            for var, val in zip(body.jaxpr.invars, invals):
                sub_env[var] = val
            for var, const in zip(body.jaxpr.constvars, body.consts):
                sub_env[var] = constant_operand(g, const, var.aval)
            inner_group = group
            if inner_group is None and name in _COMPILED_CALLS:
                inner_group = next(groups)
            _emit(g, body.jaxpr, sub_env, inner_group, groups, source)
            for out, inner in zip(eqn.outvars, body.jaxpr.outvars):
                if not jc.is_dropvar(out):
                    env[out] = read_atom(sub_env, inner)
            continue
        if not jc.has_impl(prim):
            raise UnsupportedError(
                f"unsupported primitive {name!r} at {source or 'an unknown source line'}: it has "
                f"no evaluation rule, so meshwright cannot run it; define one with "
                f"`{name}_p.def_impl(...)` or express it with jax.numpy/lax operations")
        params = dict(eqn.params)
        regions = None
        if name in REGION_PARAMS:
            regions = {}
            for key in REGION_PARAMS[name]:
                sub = params.pop(key)
                if isinstance(sub, (tuple, list)):
                    regions[key] = [graph_from_jaxpr(s, name=f"{name}_{key}{i}")
                                    for i, s in enumerate(sub)]
                else:
                    regions[key] = graph_from_jaxpr(sub, name=f"{name}_{key}")
        # Literal operands are allowed anywhere; Values must already exist in g.
        node = g.add_node(prim, invals, params, out_avals=[v.aval for v in eqn.outvars],
                          regions=regions, source=source)
        if group is not None:
            node.meta["jit_group"] = group
        for var, val in zip(eqn.outvars, node.outputs):
            if not jc.is_dropvar(var):
                env[var] = val
