"""int8 weights: the stored form (`Int8Weight`), the conversion at load time
(`quantize_weight`, `Int8Quantizer`, `quantize_params`, `quantize_args`), the fast-path matmul
the `quantize-int8` pass emits (`int8_dot_general`), and the pass's report (`Int8Report`).

Symmetric, one scale per output channel: scale = max|w| / 127 over the contracted dims,
values = round(w / scale) in [-127, 127], stored in a `layout` (a permutation of the weight's
dims; contracted dims last is faster on XLA:CPU). `passes/quantize.py` is the pass that decides
which weights and rewrites the graph; everything here also works on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from meshwright.ir import Graph
from meshwright.ir import jax_compat as jc

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is never used, so negation is exact
# int32 accumulation is exact while contracted size x 127 x 127 < 2**31
MAX_CONTRACTION = (2 ** 31 - 1) // (INT8_MAX * INT8_MAX)
_TINY = np.float32(np.finfo(np.float32).tiny)  # scales are at least this (all-zero rows)


# ---- the quantized weight and load-time conversion ---------------------------------------------


@dataclass
class Int8Weight:
    """A weight stored as int8 `values` times a float32 `scale` (per output channel).

    `scale` has the weight's shape with size 1 on the dims it is contracted over. `values`
    holds the weight's dims in the order `layout` (values dim i is weight dim layout[i]); the
    pass keeps the weight's own order unless asked for `contracted_last`. A pytree node:
    leaves `values` then `scale` (graph inputs `<path>.values`, `<path>.scale`); `layout` is
    static.

        >>> q = quantize_weight(jnp.ones((4, 3)), axes=(0,))
        >>> q.values.shape, q.scale.shape, q.layout
        ((4, 3), (1, 3), (0, 1))
    """

    values: Any  # int8, the float weight's dims in the order `layout`
    scale: Any  # float32, the float weight's shape with the contracted dims of size 1
    layout: tuple[int, ...] = ()  # values = quantized weight transposed by this

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        values = jnp.transpose(self.values, np.argsort(self.layout)) if self.layout else \
            self.values
        return (values.astype(jnp.float32) * self.scale).astype(dtype)


jax.tree_util.register_dataclass(Int8Weight, data_fields=["values", "scale"],
                                 meta_fields=["layout"])


def scale_shape(shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if d in axes else s for d, s in enumerate(shape))


def contracted_last(ndim: int, axes: Sequence[int]) -> tuple[int, ...]:
    """The layout with the kept dims first (in order), then the contracted ones."""
    return tuple(d for d in range(ndim) if d not in axes) + tuple(sorted(axes))


def _quantize(w, axes: tuple[int, ...], layout: tuple[int, ...], xp) -> Int8Weight:
    w32 = w.astype(xp.float32)
    # times the reciprocal, not divided: XLA rewrites a division by a constant so, and the
    # host (numpy) and device conversions must agree bit for bit (an exported program
    # converts on the devices what mw.shard converted on the host)
    scale = xp.max(xp.abs(w32), axis=axes, keepdims=True) * xp.float32(1 / INT8_MAX)
    values = xp.clip(xp.round(w32 / xp.maximum(scale, _TINY)), -INT8_MAX, INT8_MAX)
    return Int8Weight(xp.transpose(values.astype(xp.int8), layout), scale.astype(xp.float32),
                      layout)


_quantize_on_devices = jax.jit(functools.partial(_quantize, xp=jnp),
                               static_argnames=("axes", "layout"))


def quantize_weight(w: Any, axes: Sequence[int],
                    layout: Sequence[int] | None = None) -> Int8Weight:
    """Symmetric int8 with one scale per position of the dims NOT in `axes` (the contracted
    dims): scale = max|w| / 127 over `axes`, values = round(w / scale), stored in `layout`
    (default: the weight's own order). Large or sharded jax arrays are converted where they are
    (one jit per shape); small ones on the host (numpy). A `jax.ShapeDtypeStruct` gives an
    Int8Weight of ShapeDtypeStructs (for tracing)."""
    axes = tuple(sorted(int(a) for a in axes))
    layout = tuple(range(len(w.shape))) if layout is None else tuple(layout)
    if isinstance(w, jax.ShapeDtypeStruct):
        return Int8Weight(jax.ShapeDtypeStruct([w.shape[d] for d in layout], jnp.int8),
                          jax.ShapeDtypeStruct(scale_shape(w.shape, axes), jnp.float32),
                          layout)
    if jc.is_tracer(w):  # inside a traced program (an exported load-time conversion)
        return _quantize(w, axes, layout, jnp)
    if isinstance(w, jax.Array) and (len(w.sharding.device_set) > 1 or w.size >= 1 << 20):
        return _quantize_on_devices(w, axes, layout)
    q = _quantize(np.asarray(w), axes, layout, np)
    return Int8Weight(jnp.asarray(np.ascontiguousarray(q.values)), jnp.asarray(q.scale), layout)


@dataclass(frozen=True)
class Int8Quantizer:
    """One weight's load-time conversion (`mw.shard(weights="int8")`): float array ->
    [int8 values, float32 scales], the graph inputs that replaced it."""

    reduce_axes: tuple[int, ...]
    layout: tuple[int, ...]

    def __call__(self, w) -> list:
        q = quantize_weight(w, self.reduce_axes, self.layout)
        return [q.values, q.scale]

    def input_spec(self, spec: tuple) -> tuple:
        """The weight's partition spec when its int8 values are placed with `spec`."""
        return tuple(spec[self.layout.index(d)] for d in range(len(self.layout)))

    def describe(self) -> str:
        return (f"int8 per output channel (scale over dims {list(self.reduce_axes)}), values "
                f"stored as dims {list(self.layout)}")


def quantize_args(graph: Graph, *args, **kwargs) -> tuple[tuple, dict]:
    """The float arguments of the traced function, with every weight the pass quantized
    replaced by its `Int8Weight`: `(args_q, kwargs_q)` for `graph(*args_q, **kwargs_q)`."""
    report = report_of(graph)
    flat, tree = jax.tree_util.tree_flatten((args, kwargs))
    if tree != report.float_in_tree:
        raise ValueError(f"quantize_args: the arguments are structured as {tree}; the graph "
                         f"was traced for {report.float_in_tree}")
    by_index = {w.index: w for w in report.weights}
    out = [quantize_weight(x, by_index[i].reduce_axes, by_index[i].layout) if i in by_index
           else x for i, x in enumerate(flat)]
    args_q, kwargs_q = jax.tree_util.tree_unflatten(tree, out)
    return tuple(args_q), dict(kwargs_q)


def quantize_params(graph: Graph, params: Any, argnum: int = 0) -> Any:
    """Positional argument `argnum` (the parameter pytree) with its quantized weights as
    `Int8Weight`s; call once at load time. The other arguments pass through unchanged.

        >>> params_q = quantize_params(g, params)
        >>> logits, cache = g(params_q, tokens, cache, positions)
    """
    report = report_of(graph)
    args_tree = report.float_in_tree.children()[0]
    arg_trees = args_tree.children()
    if not 0 <= argnum < len(arg_trees):
        raise ValueError(f"argnum {argnum}: the traced function took {len(arg_trees)} "
                         "positional arguments")
    leaves, tree = jax.tree_util.tree_flatten(params)
    if tree != arg_trees[argnum]:
        raise ValueError(f"quantize_params: params are structured as {tree}; argument "
                         f"{argnum} was traced as {arg_trees[argnum]}")
    offset = sum(t.num_leaves for t in arg_trees[:argnum])
    by_index = {w.index - offset: w for w in report.weights}
    out = [quantize_weight(x, by_index[i].reduce_axes, by_index[i].layout) if i in by_index
           else x for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(tree, out)


# ---- the fast-path matmul ----------------------------------------------------------------------


def quantize_rows(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric int8 per row (per token): `(xq int8, scale f32)`, the scale keeping
    x's rank with size 1 on `axes` (the contracted dims), `x ~= xq * scale`."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axes, keepdims=True) / np.float32(INT8_MAX)
    ratio = jnp.round(xf / jnp.maximum(scale, _TINY))  # an all-zero row stays zero
    return lax.clamp(np.float32(-INT8_MAX), ratio, np.float32(INT8_MAX)).astype(jnp.int8), scale


def int8_matmul(xq: jax.Array, x_scale: jax.Array, values: jax.Array, scale: jax.Array,
                dimension_numbers, weight_side: int, out_dtype: Any) -> jax.Array:
    """int8 x int8 -> int32 `dot_general` of quantized activations and weights (operand order
    as `weight_side` says), rescaled by both scales (keepdims shapes) to `out_dtype`.
    No batch dimensions (projections have none)."""
    (lc, rc), (lb, rb) = dimension_numbers
    assert not lb and not rb
    x_contract, w_contract = (rc, lc) if weight_side == 0 else (lc, rc)
    x_free = [d for d in range(xq.ndim) if d not in x_contract]
    w_free = [d for d in range(values.ndim) if d not in w_contract]
    # One activation row is a matrix-vector product, which XLA:CPU runs ~20x slower in int8
    # than an int8 GEMM with two rows: pad a zero row and drop its result.
    x_shape = [xq.shape[d] for d in x_free]
    w_shape = [values.shape[d] for d in w_free]
    pad = bool(x_free) and math.prod(x_shape) == 1
    if pad:
        config = [(0, 1 if d == x_free[0] else 0, 0) for d in range(xq.ndim)]
        xq = lax.pad(xq, np.int8(0), config)
    operands = (values, xq) if weight_side == 0 else (xq, values)
    acc = lax.dot_general(*operands, dimension_numbers, preferred_element_type=jnp.int32)
    x_first = weight_side == 1  # output dims: lhs free dims, then rhs free dims
    if pad:
        acc = lax.slice_in_dim(acc, 0, 1, axis=0 if x_first else len(w_free))
    if x_first:
        xs = x_scale.reshape(x_shape + [1] * len(w_free))
        ws = scale.reshape(w_shape)
    else:
        xs = x_scale.reshape(x_shape)
        ws = scale.reshape(w_shape + [1] * len(x_free))
    return (acc.astype(jnp.float32) * xs * ws).astype(out_dtype)


def stored_dimension_numbers(dimension_numbers, weight_side: int, layout: Sequence[int]):
    """`dimension_numbers` of a dot_general with the float weight, for its stored int8 values.
    The weight's kept dims must stay in order (the output's dims would move otherwise)."""
    (lc, rc), (lb, rb) = dimension_numbers
    contract = lc if weight_side == 0 else rc
    kept = [d for d in layout if d not in contract]
    if kept != sorted(kept):
        raise ValueError(f"layout {tuple(layout)} reorders the kept dims {sorted(kept)}")
    stored = tuple(list(layout).index(c) for c in contract)
    return ((stored, rc), (lb, rb)) if weight_side == 0 else ((lc, stored), (lb, rb))


def int8_dot_general(x: jax.Array, w: Int8Weight, dimension_numbers, weight_side: int,
                     out_dtype: Any) -> jax.Array:
    """`dot_general(x, w)` (operand order as `weight_side` says, dims as for the float
    weight) on the fast path: `quantize_rows` then `int8_matmul`. What the pass emits for each
    projection, as a plain jnp function.

        >>> w = quantize_weight(w_f32, axes=(0,))           # (E, F): one scale per column
        >>> y = int8_dot_general(x, w, (((1,), (0,)), ((), ())), 1, x.dtype)  # ~ x @ w_f32
    """
    (lc, rc), _ = dimension_numbers
    xq, xs = quantize_rows(x, tuple(rc if weight_side == 0 else lc))
    layout = w.layout or tuple(range(w.values.ndim))
    dn = stored_dimension_numbers(dimension_numbers, weight_side, layout)
    return int8_matmul(xq, xs, w.values, w.scale, dn, weight_side, out_dtype)


# ---- the report --------------------------------------------------------------------------------


@dataclass
class QuantizedInput:
    """One float weight input replaced by int8 values and float32 scales."""

    path: str  # argument path, e.g. "params.layers.wq"
    index: int  # position among the float program's flat inputs
    shape: tuple[int, ...]
    dtype: str  # the float dtype it had
    reduce_axes: tuple[int, ...]  # contracted dims: the scale has size 1 there
    layout: tuple[int, ...]  # the int8 values hold the weight's dims in this order
    layers_axis: int | None  # the stacked-layers axis of a scanned weight (kept, never reduced)
    dots: int  # dot_generals now on the int8 fast path (a scan body's counts once)
    dequantized_uses: int  # other uses, given the dequantized weight

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return scale_shape(self.shape, self.reduce_axes)


@dataclass
class Int8Numerics:
    """Quantized vs float logits on random prompts (the same weights, the same prompts)."""

    positions: int  # logit rows compared (tokens x prompts)
    prompts: int  # calls of the program, each with fresh random token ids
    max_abs_error: float
    mean_abs_error: float
    logit_std: float  # standard deviation of the float logits: the scale errors are read on
    max_abs_logit: float
    top1_agreement: float  # fraction of rows whose argmax is unchanged
    # fraction of rows whose float top-2 gap is below 2 x max_abs_error: the near-ties that
    # an error this size can flip (every flip is one of them)
    near_ties: float

    @property
    def max_relative_error(self) -> float:
        return self.max_abs_error / self.logit_std

    @property
    def mean_relative_error(self) -> float:
        return self.mean_abs_error / self.logit_std


@dataclass
class Int8Report:
    """`graph.meta["quantize-int8"]`: what was quantized, the bytes, the numerical effect."""

    weights: list[QuantizedInput]
    skipped: list[str]  # selected weight matmuls left in float, and why
    int8_dots: int  # dot_generals rewritten (scan bodies counted once)
    float_in_tree: Any = field(repr=False)  # pytree structure of the float program's args
    numerics: Int8Numerics | None = None  # None: no ctx.example_args

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the quantized weights as floats, as int8 values, and of their scales."""
        out = {"float": 0, "int8": 0, "scales": 0}
        for w in self.weights:
            n = math.prod(w.shape)
            out["float"] += n * np.dtype(w.dtype).itemsize
            out["int8"] += n
            out["scales"] += math.prod(w.scale_shape) * 4
        return out

    def to_dict(self) -> dict:
        return {"weights": [w.path for w in self.weights], "skipped": list(self.skipped),
                "int8_dots": self.int8_dots, "weight_bytes": self.weight_bytes(),
                "numerics": None if self.numerics is None else {
                    **self.numerics.__dict__,
                    "max_relative_error": self.numerics.max_relative_error,
                    "mean_relative_error": self.numerics.mean_relative_error}}


def report_of(graph: Graph) -> Int8Report:
    report = graph.meta.get("quantize-int8")
    if not isinstance(report, Int8Report):
        raise TypeError(f"graph {graph.name!r} has not been through the 'quantize-int8' pass")
    return report
