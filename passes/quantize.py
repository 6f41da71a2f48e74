"""Pass `quantize-int8`: weight-only int8 with per-output-channel scales, on the CPU fast path.

What it matches: the weight operand of every weight dot_general inside the `attention` and
`ffn` blocks that `find-blocks` found (and, with `unembedding=True`, the projection to the
vocabulary), traced back through layout operations (convert, transpose, reshape) and scan
boundaries to the graph input that holds it. Layers in a Python loop give one input per layer;
layers in a `scan` give one stacked input whose leading `layers` axis is kept.

What it rewrites (one weight input of shape W, contracted over dims C at its use):

    before:  %w:f32[W]                          %y = dot_general %x %w
    after:   %w.values:i8[W]  %w.scale:f32[W with C -> 1]
             %xs = max(|x|) over x's contracted dims / 127          (per token, per row)
             %xq:i8 = clamp(-127, round(x / %xs), 127)
             %acc:i32 = dot_general[preferred_element_type=int32] %xq %w.values
             %y = convert(%acc) * %xs * %w.scale                   (in the original dtype)

This is the fast path measured on XLA:CPU: int8 weights multiplied with float
activations convert the whole weight on every call (~7x slower than float32), while int8 x
int8 -> int32 runs on the integer GEMM kernels. A matrix-vector product (one activation row,
i.e. decode at batch 1) would fall onto XLA's slow integer GEMV, so a single row is padded with
a zero row (measured: 2048x8192 GEMV 43 ms unpadded, 2.2 ms padded, 4.1 ms in float32).

The weights are converted once, at load time (`quantize_params` / `quantize_args`): symmetric,
scale = max|w| / 127 over the contracted dims, one scale per output channel (every
non-contracted weight element position). The rewritten graph takes `Int8Weight(values, scale)`
where the float weight was, so `g(params_q, tokens, ...)` and `jax.jit(g.as_function())` work
with the same pytree shape as before, one level deeper at the quantized leaves. The int8
values of a weight a matmul reads directly are stored transposed, contracted dims last (faster
on XLA:CPU; `layout` option); a transpose between the weight and its matmul then only renames
dims, it moves no data.

    >>> pm = PassManager(["infer-axes", "find-blocks", "quantize-int8"])
    >>> g = pm.run(mw.trace(model.decode_step, params, tokens, cache, pos),
    ...            PassContext(options={"example_args": ((params, tokens, cache, pos), {})}))
    >>> params_q = quantize_params(g, params)        # once, at load time
    >>> logits, cache = g(params_q, tokens, cache, pos)
    >>> g.meta["quantize-int8"].numerics             # max/mean |logit error|, top-1 agreement

Weight uses the fast path cannot take (another primitive reads the weight) get the weight
dequantized in place (correct, slower) and are counted in the report; the tied embedding's
gather, when the unembedding is quantized, gathers int8 rows and their scales.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from meshwright.ir import Graph, Node, Value
from meshwright.ir import jax_compat as jc
from meshwright.ir.emit import emit_function, nodes_between
from meshwright.ir.interpreter import eval_graph
from meshwright.passes.base import Pass, PassContext, register
from meshwright.passes.int8_weights import (
    INT8_MAX,
    MAX_CONTRACTION,
    Int8Numerics,
    Int8Quantizer,
    Int8Report,
    Int8Weight,
    QuantizedInput,
    contracted_last,
    int8_dot_general,
    int8_matmul,
    quantize_args,
    quantize_params,
    quantize_rows,
    quantize_weight,
    scale_shape,
    stored_dimension_numbers,
)
from meshwright.passes.quantize_match import (
    SAME,
    VIEWS,
    Origin,
    Skip,
    big_dims,
    input_path,
    map_reshape,
    select_weights,
)

# The pass, and what a caller of it uses: the int8 weight format, its conversion at load
# time and the fast-path matmul (defined in passes/int8_weights.py).
__all__ = [
    "INT8_MAX",
    "LAYOUTS",
    "MAX_CONTRACTION",
    "Int8Numerics",
    "Int8Quantizer",
    "Int8Report",
    "Int8Weight",
    "QuantizeInt8",
    "QuantizedInput",
    "contracted_last",
    "int8_dot_general",
    "int8_matmul",
    "quantize_args",
    "quantize_int8",
    "quantize_params",
    "quantize_rows",
    "quantize_weight",
    "scale_shape",
    "stored_dimension_numbers",
]


# ---- rewriting ----------------------------------------------------------------------------------


@dataclass
class _Rewrite:
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


def _push(graph: Graph, old: Value, w: _Q, rw: _Rewrite) -> None:
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


def _rewrite_dot(graph: Graph, dot: Node, k: int, w: _Q, rw: _Rewrite) -> None:
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


def _push_into_scan(graph: Graph, scan: Node, old: Value, w: _Q, rw: _Rewrite) -> None:
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


def _rewrite_input(graph: Graph, o: Origin, rw: _Rewrite, layout_rule: str) -> tuple[int, ...]:
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


def _dead_code(graph: Graph) -> None:
    graph.eliminate_dead_code()
    for node in graph.equations():
        for body in node.region_graphs():
            _dead_code(body)


# ---- numerics -----------------------------------------------------------------------------------


def _token_inputs(graph: Graph) -> list[Value]:
    """Top-level integer inputs that index the vocabulary table (the prompt's token ids)."""
    found: list[Value] = []
    for b in graph.meta["blocks"].of_kind("embedding"):
        for node in b.nodes:
            if node.graph is not graph:
                continue
            frontier, seen = [node.inputs[1]], set()
            while frontier:
                v = frontier.pop()
                if not isinstance(v, Value) or v.id in seen:
                    continue
                seen.add(v.id)
                if v.producer.op == "input":
                    if np.issubdtype(v.dtype, np.integer) and v not in found:
                        found.append(v)
                    continue
                frontier.extend(v.producer.inputs)
    return found


def _logits_output(graph: Graph) -> int:
    for i, o in enumerate(graph.outputs):
        axes = o.producer.meta.get("axes") if isinstance(o, Value) else None
        if axes and axes[o.index] and axes[o.index][-1] == "vocab":
            return i
    return 0


def _prompts(graph: Graph, flat: list, tokens: list[int], vocab: int, calls: int, seed: int):
    key = jax.random.PRNGKey(seed)
    for c in range(calls):
        args = list(flat)
        for j, i in enumerate(tokens):
            k = jax.random.fold_in(jax.random.fold_in(key, c), j)
            args[i] = jax.random.randint(k, np.shape(flat[i]), 0, vocab, flat[i].dtype)
        yield args


def _top2_gap(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _run_all(graph: Graph, batches) -> list[np.ndarray]:
    fn = jax.jit(lambda *xs: eval_graph(graph, list(xs)))
    return [[np.asarray(o) for o in fn(*args)] for args in batches]


# ---- the pass -----------------------------------------------------------------------------------


# How the int8 values are stored. On XLA:CPU (benchmarks/int8.py, decode at batch 1), contracted
# dims last is faster for weights a matmul reads directly (Python-loop layers: 1.60x over
# float32 against 1.35x) and slower for weights a scan slices (1.20x against 2.37x); "auto"
# takes the faster one for each weight.
LAYOUTS = ("auto", "as-is", "contracted-last")


def quantize_int8(graph: Graph, *, blocks: Sequence[str] = ("attention", "ffn"),
                  unembedding: bool = False, layout: str = "auto",
                  example_args: tuple | None = None, positions: int = 256,
                  seed: int = 0) -> Graph:
    """Rewrite `graph` in place (see the module docstring); returns it. `layout`: how the
    int8 values are stored, "as-is" (the weight's dims in order), "contracted-last" (where no
    reshape lies between weight and matmul) or "auto" (contracted-last unless a scan slices
    the weight; see LAYOUTS). With `example_args` (`(args, kwargs)` as
    traced, float weights), measures the logit error on random prompts of at least
    `positions` rows into `graph.meta["quantize-int8"].numerics`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if "axes" not in graph.meta or "blocks" not in graph.meta:
        raise ValueError("quantize-int8 needs the blocks: run 'infer-axes' and 'find-blocks' "
                         "first")
    if "quantize-int8" in graph.meta:
        raise ValueError(f"graph {graph.name!r} has already been through 'quantize-int8'")
    float_in_tree = graph.in_tree
    origins, skipped = select_weights(graph, tuple(blocks), unembedding)
    n_flat = len(graph.inputs)
    index = {v.id: i for i, v in enumerate(graph.inputs)}

    measure = example_args is not None and positions > 0
    if measure:
        flat, tree = jax.tree_util.tree_flatten(example_args)
        if tree != float_in_tree or len(flat) != n_flat:
            raise ValueError(f"example_args are structured as {tree}; the graph was traced "
                             f"for {float_in_tree}")
        out_i = _logits_output(graph)
        per_call = math.prod(graph.outputs[out_i].shape[:-1]) or 1
        token_values = _token_inputs(graph)
        tokens = [index[v.id] for v in token_values]
        # fresh token ids per call; without an embedding lookup, the example inputs once
        calls = -(-positions // per_call) if tokens else 1
        vocab = graph.meta["axes"].sizes.get("vocab", 2)
        reference = _run_all(graph, _prompts(graph, flat, tokens, vocab, calls, seed))

    rw = _Rewrite(selected={d for o in origins for d in o.dots})
    weights = []
    for o in sorted(origins, key=lambda o: index[o.input.id]):
        before = (rw.dots, rw.dequantized)
        weights_layout = _rewrite_input(graph, o, rw, layout)
        weights.append(QuantizedInput(
            path=input_path(o.input), index=index[o.input.id], shape=o.input.shape,
            dtype=str(o.input.dtype), reduce_axes=tuple(sorted(o.reduced)),
            layout=weights_layout,
            layers_axis=o.layers, dots=rw.dots - before[0],
            dequantized_uses=rw.dequantized - before[1]))
    _dead_code(graph)
    if "weight_values" in graph.meta:  # what `lower` treats as weights
        graph.meta["weight_values"] = set(graph.meta["weight_values"]) | rw.values
    if "in_specs" in graph.meta and all("target" in v.producer.meta for v in graph.inputs):
        graph.meta["in_specs"] = [v.producer.meta["target"][0] for v in graph.inputs]
    layouts = {w.index: w.layout for w in weights}
    graph.in_tree = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(
        float_in_tree, [Int8Weight(0, 0, layouts[i]) if i in layouts else 0
                        for i in range(n_flat)]))
    report = Int8Report(weights=weights, skipped=skipped, int8_dots=rw.dots,
                        float_in_tree=float_in_tree)
    graph.meta["quantize-int8"] = report

    if measure:
        args_q, kwargs_q = quantize_args(graph, *example_args[0], **example_args[1])
        flat_q = jax.tree_util.tree_leaves((args_q, kwargs_q))
        tokens_q = [graph.inputs.index(v) for v in token_values]
        got = _run_all(graph, _prompts(graph, flat_q, tokens_q, vocab, calls, seed))
        ref = np.concatenate([r[out_i].reshape(-1, r[out_i].shape[-1]) for r in reference])
        new = np.concatenate([r[out_i].reshape(-1, r[out_i].shape[-1]) for r in got])
        ref, new = ref.astype(np.float32), new.astype(np.float32)
        err = np.abs(ref - new)
        report.numerics = Int8Numerics(
            positions=int(ref.shape[0]), prompts=calls, max_abs_error=float(err.max()),
            mean_abs_error=float(err.mean()), logit_std=float(ref.std()),
            max_abs_logit=float(np.abs(ref).max()),
            top1_agreement=float(np.mean(ref.argmax(-1) == new.argmax(-1))),
            near_ties=float(np.mean(_top2_gap(ref) < 2 * err.max())))
    return graph


@register
@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """Weight-only int8 (per-output-channel scales) on the projections of attention and
    feed-forward blocks, computed as int8 x int8 -> int32 with per-token activation scales.
    Reads `ctx.options["example_args"]` (`(args, kwargs)`) to report the logit error."""

    name = "quantize-int8"
    unembedding: bool = False  # also the projection to the vocabulary (tied: the embedding too)
    layout: str = "auto"  # int8 values stored "auto", "as-is" or "contracted-last" (LAYOUTS)
    positions: int = 256  # logit rows compared on random prompts (0: do not measure)
    seed: int = 0  # of the random prompts

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        return quantize_int8(graph, unembedding=self.unembedding, layout=self.layout,
                             example_args=ctx.options.get("example_args"),
                             positions=self.positions, seed=self.seed)
