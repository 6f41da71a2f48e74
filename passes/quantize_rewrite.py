"""The `quantize-int8` pass's graph rewrite: a float weight input replaced by int8 values and
float32 scales, and every use of it moved onto them by rule.

`rewrite_input` adds the two inputs (labelled with the weight's axis roles and sharding
targets) and pushes the int8 form `Q` through the weight's users: a convert or copy passes it
on, a transpose renames its layout (the values do not move), a reshape reshapes values and
scales, a scan takes both into its body, a selected dot_general becomes `int8_dot_general`
(the activation's rows quantized once per activation), a gather of a tied table gathers int8
rows and their scales; any other use (or one a rule refuses, `Skip`) gets the weight
dequantized in place and is counted.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax
from meshwright.ir import Graph, Node, Value
from meshwright.ir import jax_compat as jc
from meshwright.ir.emit import emit_function, nodes_between
from meshwright.passes.int8_weights import (
    contracted_last,
    int8_matmul,
    quantize_rows,
    scale_shape,
    stored_dimension_numbers,
)
from meshwright.passes.quantize_match import SAME, VIEWS, Origin, Skip, big_dims, map_reshape

# ---- rewriting ----------------------------------------------------------------------------------


@dataclass
class Rewrite:
    selected: set  # the dot nodes to put on the fast path
    dots: int = 0  # rewritten so far
    dequantized: int = 0  # uses given the dequantized weight so far
    values: set = field(default_factory=set)  # ids of the int8 inputs (top level and bodies)
    rows: dict = field(default_factory=dict)  # (activation id, dims) -> its (xq, scale) values


@dataclass(frozen=True)
class _Q:
    """A float weight value as int8 `values` (its dims in the order `layout`) and `scale`
    (in the weight's own dims, size 1 on the `reduced` ones); `dtype` is the weight's."""

    values: Value
    scale: Value
    reduced: frozenset
    layout: tuple[int, ...]
    dtype: Any

    def plain(self) -> bool:
        return self.layout == tuple(range(len(self.layout)))


def _emit_like(graph: Graph, node: Node, fn, inputs) -> list[Value]:
    return emit_function(graph, fn, inputs, source=node.source,
                         jit_group=node.meta.get("jit_group"))


def _dequantize(values, scale, layout, dtype):
    if layout != tuple(range(len(layout))):
        values = jnp.transpose(values, np.argsort(layout))
    return (values.astype(jnp.float32) * scale).astype(dtype)


def _push(graph: Graph, old: Value, w: _Q, rw: Rewrite) -> None:
    """Make every user of the float weight `old` use its int8 form `w` instead, by rule."""
    for user in graph.users(old):
        positions = [k for k, v in enumerate(user.inputs) if v is old]
        try:
            if user.op in SAME:
                _push(graph, user.out, dataclasses.replace(w, dtype=user.out.dtype), rw)
            elif user.op == "transpose":  # values stay put: only the layout is renamed
                perm = user.params["permutation"]
                inverse = np.argsort(perm)
                (s2,) = _emit_like(graph, user, functools.partial(lax.transpose,
                                                                  permutation=perm), [w.scale])
                _push(graph, user.out, _Q(
                    w.values, s2, frozenset(i for i, d in enumerate(perm) if d in w.reduced),
                    tuple(int(inverse[d]) for d in w.layout), w.dtype), rw)
            elif user.op == "reshape" and not user.params.get("dimensions") and w.plain():
                new = map_reshape(old.shape, user.out.shape, w.reduced)
                shape_s = scale_shape(user.out.shape, new)
                (q2,) = _emit_like(graph, user, functools.partial(
                    jnp.reshape, shape=user.out.shape), [w.values])
                (s2,) = _emit_like(graph, user, functools.partial(jnp.reshape, shape=shape_s),
                                   [w.scale])
                _push(graph, user.out, _Q(q2, s2, new, tuple(range(len(user.out.shape))),
                                          w.dtype), rw)
            elif user.op == "dot_general" and user in rw.selected and len(positions) == 1:
                _rewrite_dot(graph, user, positions[0], w, rw)
            elif user.op == "scan":
                _push_into_scan(graph, user, old, w, rw)
            elif user.op == "gather" and positions == [0] and w.plain():
                _rewrite_gather(graph, user, w)
            else:
                raise Skip(user.op)
            if user.op in VIEWS and not graph.users(user.out) and not graph.is_output(user.out):
                graph.remove_node(user)  # a view of the float weight, now unused
        except Skip:
            (deq,) = _emit_like(graph, user, functools.partial(
                _dequantize, layout=w.layout, dtype=w.dtype), [w.values, w.scale])
            for k in positions:
                graph.set_input(user, k, deq)
            rw.dequantized += 1
    if graph.is_output(old):  # a weight returned as it is: returned dequantized
        (deq,) = emit_function(graph, functools.partial(_dequantize, layout=w.layout,
                                                        dtype=w.dtype), [w.values, w.scale])
        graph.replace_all_uses_with(old, deq)
        rw.dequantized += 1


def _rewrite_dot(graph: Graph, dot: Node, k: int, w: _Q, rw: Rewrite) -> None:
    dn = dot.params["dimension_numbers"]
    contract = dn[0][k]
    shape = dot.inputs[k].shape
    if big_dims(w.reduced, shape) != big_dims(frozenset(contract), shape):
        raise Skip("contracted over other dims than the scales")
    try:
        dn_stored = stored_dimension_numbers(dn, k, w.layout)
    except ValueError as e:
        raise Skip(str(e)) from None
    x = dot.inputs[1 - k]
    x_contract = tuple(dn[0][1 - k])
    # q, k and v (gate and up) read the same activation: quantize its rows once
    key = (x.id, x_contract)
    if key not in rw.rows:
        rows = _emit_like(graph, dot, functools.partial(quantize_rows, axes=x_contract), [x])
        if "axes" in x.producer.meta:
            rows[0].producer.meta["axes"] = [x.producer.meta["axes"][x.index]]
        rw.rows[key] = rows
    xq, xs = rw.rows[key]
    out_dtype = dot.out.dtype

    def fn(xq, xs, values, scale):
        return int8_matmul(xq, xs, values, scale, dn_stored, k, out_dtype)

    (y,) = _emit_like(graph, dot, fn, [xq, xs, w.values, w.scale])
    new_dot = next(n for n in nodes_between([y], {xq.id, xs.id, w.values.id, w.scale.id})
                   if n.op == "dot_general")
    new_dot.meta["note"] = "int8"
    for key in ("block", "operand_target"):
        if key in dot.meta:
            new_dot.meta[key] = dot.meta[key]
    if "operand_target" in dot.meta and k in dot.meta["operand_target"]:
        target = dict(dot.meta["operand_target"])
        target[k] = _permuted_spec(target[k], w.layout)
        new_dot.meta["operand_target"] = target
    if new_dot.out.shape == dot.out.shape:
        for key in ("axes", "target"):  # the sharded sum is reduced in int32 (exact): the
            if key in dot.meta:         # scales are the same on every shard of the contraction
                new_dot.meta[key] = dot.meta[key]
    for key in ("axes", "target"):
        if key in dot.meta:
            y.producer.meta[key] = dot.meta[key]
    graph.replace_all_uses_with(dot.out, y)
    graph.remove_node(dot)
    rw.dots += 1


def _rewrite_gather(graph: Graph, node: Node, w: _Q) -> None:
    """Rows of a quantized table: gather the int8 rows and their scales, multiply."""
    idx = node.inputs[1]
    params_s = dict(node.params, slice_sizes=tuple(
        min(n, size) for n, size in zip(node.params["slice_sizes"], w.scale.shape)))
    # out-of-range rows: 0 x the scale's fill (NaN by default), as the float table would give
    params_q = dict(node.params, fill_value=0) if "fill_value" in node.params else node.params
    gq = graph.add_node(node.primitive, [w.values, idx], params_q, source=node.source).out
    gs = graph.add_node(node.primitive, [w.scale, idx], params_s, source=node.source).out
    for n in (gq.producer, gs.producer):
        if "jit_group" in node.meta:
            n.meta["jit_group"] = node.meta["jit_group"]
    dtype = w.dtype
    (rows,) = _emit_like(graph, node,
                         lambda a, b: (a.astype(jnp.float32) * b).astype(dtype), [gq, gs])
    if "target" in node.meta:
        rows.producer.meta["target"] = node.meta["target"]
    graph.replace_all_uses_with(node.out, rows)
    graph.remove_node(node)


def _push_into_scan(graph: Graph, scan: Node, old: Value, w: _Q, rw: Rewrite) -> None:
    """Pass the int8 weight into the scan body in place of `old` (a const or per-layer
    slices: then the stored layout must keep the layers axis first)."""
    n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
    positions = [k for k, v in enumerate(scan.inputs) if v is old]
    if any(n_consts <= k < n_consts + n_carry for k in positions):
        raise Skip("a scan carry")
    if any(k >= n_consts + n_carry for k in positions) and w.layout[0] != 0:
        raise Skip("the scanned axis is not the first one stored")
    body: Graph = scan.regions["jaxpr"]
    inputs, body_inputs = list(scan.inputs), list(body.inputs)
    linear = list(scan.params.get("linear", ()))  # older JAX: one flag per operand
    work = []
    for k in sorted(positions, reverse=True):  # insert from the back: indices stay valid
        xs = k >= n_consts + n_carry
        q, s = w.values, w.scale
        bq = body.add_input(_aval(q.shape[1:] if xs else q.shape, q.dtype))
        rw.values.add(bq.id)
        bs = body.add_input(_aval(s.shape[1:] if xs else s.shape, s.dtype))
        inner = _Q(bq, bs, frozenset(d - 1 for d in w.reduced if d > 0),
                   tuple(d - 1 for d in w.layout[1:]), w.dtype) if xs else \
            _Q(bq, bs, w.reduced, w.layout, w.dtype)
        work.append((body_inputs[k], inner))
        inputs[k:k + 1] = [q, s]
        if linear:
            linear[k:k + 1] = [linear[k], False]
        body_inputs[k:k + 1] = [bq, bs]
        if k < n_consts:
            n_consts += 1
    body.inputs = body_inputs
    params = dict(scan.params, num_consts=n_consts)
    if linear:
        params["linear"] = tuple(linear)
    new = graph.add_node(scan.primitive, inputs, params,
                         out_avals=[o.aval for o in scan.outputs], regions=scan.regions,
                         source=scan.source)
    new.meta.update(scan.meta)
    for a, b in zip(scan.outputs, new.outputs):
        graph.replace_all_uses_with(a, b)
    graph.remove_node(scan)
    for inner_old, inner in work:
        _label_like(inner_old, inner)
        _push(body, inner_old, inner, rw)
        body.remove_node(inner_old.producer)


def _aval(shape, dtype):
    return jc.shaped_array(tuple(shape), dtype)


def _label_like(old: Value, w: _Q) -> None:
    """Axis roles and sharding targets of a replaced weight input, for its values (in their
    layout) and its scales."""
    meta = old.producer.meta
    q, s = w.values.producer, w.scale.producer
    if "axes" in meta:
        roles = meta["axes"][0]
        q.meta["axes"] = [tuple(roles[d] for d in w.layout)]
        s.meta["axes"] = [tuple("1" if d in w.reduced else r for d, r in enumerate(roles))]
    if "target" in meta and meta["target"] and meta["target"][0] is not None:
        spec = meta["target"][0]
        q.meta["target"] = [_permuted_spec(spec, w.layout)]
        s.meta["target"] = [spec.with_dims(() if d in w.reduced else a
                                           for d, a in enumerate(spec.dims))]


def _permuted_spec(spec: Any, layout: tuple[int, ...]) -> Any:
    return spec.with_dims(spec.dims[d] for d in layout)


def rewrite_input(graph: Graph, o: Origin, rw: Rewrite, layout_rule: str) -> tuple[int, ...]:
    """Replace a float weight input by int8 values and scales; returns the values' layout."""
    old = o.input
    pos = graph.inputs.index(old)
    path = old.producer.params.get("path")
    ndim = len(old.shape)
    transpose = o.permutable and (layout_rule == "contracted-last" or (
        layout_rule == "auto" and not o.scanned))
    layout = contracted_last(ndim, o.reduced) if transpose else tuple(range(ndim))
    q = graph.add_input(_aval([old.shape[d] for d in layout], np.int8),
                        f"{path}.values" if path else None)
    s = graph.add_input(_aval(scale_shape(old.shape, o.reduced), np.float32),
                        f"{path}.scale" if path else None)
    rw.values.add(q.id)
    rest = [v for v in graph.inputs if v is not q and v is not s]
    graph.inputs = rest[:pos] + [q, s] + rest[pos + 1:]
    w = _Q(q, s, o.reduced, layout, old.dtype)
    _label_like(old, w)
    _push(graph, old, w, rw)
    graph.remove_node(old.producer)
    return layout


def dead_code(graph: Graph) -> None:
    graph.eliminate_dead_code()
    for node in graph.equations():
        for body in node.region_graphs():
            dead_code(body)
