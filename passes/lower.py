"""Pass `lower`: the annotated graph as an explicit per-device program under `jax.shard_map`.

Every value is carried as (local array, Spec). Each equation runs on local arrays through a
rule keyed by primitive (`LOWER_RULES`, default: elementwise, else a replicated fallback); a
rule asks for its operands in the specs it can compute on and `reshard` writes the
collectives (all_gather, psum_scatter, psum, all_to_all) or local slices in between. After an
equation, an output with a target spec (from `annotate`) is resharded to it. Nothing is left
to XLA's partitioner: the program is written per device.

Where a rule cannot keep an operand sharded (a slice across a sharded dimension, an unknown
primitive), the operand is gathered and the equation runs replicated: correct first, and
listed in `replicated_fallbacks`.

A rule decides specs, then asks its context to reshard (`ctx.to`) and to run the equation
(`ctx.bind`): under `shard_map` that emits JAX; with `Abstract` arrays it only propagates specs
and records collectives (`passes/propagate.py`: the same walk, no tracing). A dot_general asks
the registered matmul lowerings (`MATMUL_LOWERINGS`, `@matmul_lowering`) before lowering plainly;
collective-einsum registers its ppermute loops there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from meshwright.ir import Graph, Literal, Node, Value
from meshwright.ir.interpreter import region_jaxpr
from meshwright.passes.axis_rules import reshape_groups
from meshwright.passes.base import rule_registry
from meshwright.passes.layouts import attention_layout
from meshwright.passes.propagate import Abstract, MatmulSite, Propagation
from meshwright.passes.sharding import Emitter, MeshInfo, Spec, reshard

_LINEAR_UNARY = frozenset({"neg", "convert_element_type", "reshape", "transpose",
                           "broadcast_in_dim", "squeeze", "expand_dims", "copy", "slice",
                           "reduce_sum", "rev"})


@dataclass
class Lowered:
    """What lowering one graph produced (besides the program itself)."""

    fallbacks: list[str] = field(default_factory=list)  # equations run replicated, and why


class LowerContext:
    """What the rules lower with: the mesh, where collectives go (`em`), what the lowering
    reports (`result`), the layout's attention, and the reshard cache. With `propagation`
    set (`passes.propagate`), the local arrays are `Abstract` and nothing is traced."""

    def __init__(self, mesh: MeshInfo, em: Emitter, result: Lowered, attention: str = "heads",
                 attention_batch: tuple = ()):
        self.mesh = mesh
        self.em = em
        self.result = result
        # (array, from, to) -> resharded array: q, k and v projections of one normed input
        # gather it once. The array is kept alive with its entry so its id stays unique.
        self._reshards: dict[tuple, tuple] = {}
        self.propagation: Propagation | None = None  # set: propagating specs, not emitting
        # id(local output of a broadcast_in_dim) -> (output, node, local input, its spec): a
        # broadcast operand that must move is re-broadcast from its (small) moved input.
        self.broadcasts: dict[int, tuple] = {}
        self.attention = attention  # the attention layout ("heads" or "batch")
        # attention runs split over sequences (its layout object's, `passes/layouts.py`)
        self.attention_splits_batch = attention_layout(attention).splits_batch
        self.attention_batch = attention_batch  # batch axes inside batch-sharded attention
        # id(node) -> the rule lowering that one equation instead of its primitive's (the
        # pipeline's layer scan, passes/stages.py)
        self.overrides: dict[int, Rule] = {}

    @classmethod
    def for_graph(cls, g: Graph, mesh: MeshInfo, em: Emitter, result: Lowered) -> LowerContext:
        """A context for lowering an annotated graph: its layout's attention (and the batch
        axes inside batch-sharded attention, as `annotate` ordered them)."""
        layout = g.meta.get("layout")
        if layout is None:
            return cls(mesh, em, result)
        return cls(mesh, em, result, layout.attention,
                   tuple(a for a in layout.attention_batch if mesh.sizes.get(a, 1) > 1))

    def fallback(self, node: Node, why: str) -> None:
        msg = f"{node.op} at {node.source or '?'}: {why}"
        if msg not in self.result.fallbacks:
            self.result.fallbacks.append(msg)

    @property
    def abstract(self) -> bool:
        """Whether the local arrays are `Abstract` (spec propagation)."""
        return self.propagation is not None

    def bind(self, node: Node, args: list, **param_updates) -> list:
        """Run `node`'s equation on local arrays `args` with its params updated (local
        shapes): the results (`Abstract` ones, shaped by the walk, when propagating)."""
        if self.abstract:
            return [Abstract(None, v.dtype) for v in node.outputs]
        return bind(node, args, **param_updates)

    def to(self, x, src: Spec, dst: Spec, note: str = ""):
        """x (spec `src`) resharded to `dst`: collectives and local slices, once per array,
        specs and loop trip (a second request returns the first result)."""
        if src == dst:
            return x
        hit = self.resharded(x, src, dst)
        if hit is not None:
            return hit
        out = reshard(self.em, x, src, dst, note)
        self.remember(x, src, dst, out)
        return out

    def resharded(self, x, src: Spec, dst: Spec):
        """What an earlier `to(x, src, dst)` (or `remember`) made of this array at this loop
        trip, else None."""
        hit = self._reshards.get((id(x), src, dst, self.em.trips))
        return hit[1] if hit is not None and hit[0] is x else None

    def remember(self, x, src: Spec, dst: Spec, out) -> None:
        """Record `out` as x resharded from `src` to `dst`: a matmul lowering that assembles
        the resharded array itself (a looped all-gather) lets later users reuse it."""
        self._reshards[(id(x), src, dst, self.em.trips)] = (x, out)

    def resolved(self, x, spec: Spec, note=""):
        """The array with its partial sums reduced."""
        if not spec.partial:
            return x, spec
        target = spec.without_partial()
        return self.to(x, spec, target, note), target


Local = tuple[Any, Spec]  # a local array and its spec (a Literal passes as (value, None))
Rule = Callable[[LowerContext, Node, list[Local]], list[Local]]
LOWER_RULES: dict[str, Rule] = {}


lower_rule = rule_registry(LOWER_RULES)  # @lower_rule("prim", ...) registers a rule

# Alternative lowerings of one dot_general, asked in registration order before the plain one
# (reshard both operands to `site.wants`, bind, result partial over the contracted axes).
# A lowering takes (ctx, site, ins) and returns the results [(local array, spec)], or None
# to leave the matmul to the next one. `site` is the `propagate.MatmulSite` of the matmul:
# the specs its operands arrive in and are wanted in (as `propagate` reports them, so a pass
# that plans from the propagation meets the same numbers here), whether another equation
# already resharded an operand to its wanted spec, the loop trips. Lowerings run at emission;
# propagation lowers every matmul plainly. Collective-einsum is one (`"collective-einsum"`).
MatmulLowering = Callable[[LowerContext, MatmulSite, list[Local]], "list[Local] | None"]
MATMUL_LOWERINGS: dict[str, MatmulLowering] = {}


def matmul_lowering(name: str):
    """Register an alternative matmul lowering under `name` (see MATMUL_LOWERINGS).

        >>> @matmul_lowering("my-matmul")
        ... def my_matmul(ctx, site, ins):
        ...     if "my-matmul" not in site.node.meta:
        ...         return None
        ...     ...  # ctx.to / ctx.resharded / ctx.remember / bind / ctx.em collectives
    """
    def register(fn: MatmulLowering) -> MatmulLowering:
        MATMUL_LOWERINGS[name] = fn
        return fn
    return register


def bind(node: Node, args: list, **param_updates) -> list:
    """Bind `node`'s primitive on `args` (local arrays) with its params updated (e.g. local
    shapes); its regions as jaxprs. The results, as a list."""
    params = dict(node.params)
    params.update(param_updates)
    if node.regions:
        for key, region in node.regions.items():
            params[key] = tuple(region_jaxpr(b) for b in region) \
                if isinstance(region, (list, tuple)) else region_jaxpr(region)
    out = node.primitive.bind(*args, **params)
    return list(out) if node.primitive.multiple_results else [out]


def _replicated(ctx: LowerContext, node: Node, ins: list[Local], why: str) -> list[Local]:
    args = []
    for (x, spec), v in zip(ins, node.inputs):
        if spec is not None and (spec.partial or any(spec.dims)):
            ctx.fallback(node, why)
            x = ctx.to(x, spec, Spec.replicated(len(v.shape)), f"replicate for {node.op}")
        args.append(x)
    return [(o, Spec.replicated(len(v.shape))) for o, v in zip(ctx.bind(node, args), node.outputs)]


# ---- elementwise (the default) ----------------------------------------------------------------


def _elementwise(ctx: LowerContext, node: Node, ins: list[Local]) -> list[Local]:
    out = node.outputs[0]
    rank = len(out.shape)
    ins = _nested_partials(ctx, node, ins)
    arrays = [(k, x, s) for k, ((x, s), v) in enumerate(zip(ins, node.inputs))
              if s is not None and len(v.shape) == rank and rank > 0]
    if not arrays or any(o.shape != out.shape for o in node.outputs) or any(
            len(v.shape) not in (0, rank) for v in node.inputs if not isinstance(v, Literal)):
        return _replicated(ctx, node, ins, f"no sharding rule for {node.op}")
    # The dominant spec: the one that moves the fewest elements (a broadcast operand moves its
    # input), then the operand with the most sharded axes.
    def moved(cand: Spec) -> int:
        return sum(_source_size(ctx, x, node.inputs[k]) for k, x, s in arrays
                   if _moves(s.without_partial(), cand.without_partial()))

    _, _, best = min(arrays, key=lambda t: (moved(t[2]), -sum(len(d) for d in t[2].dims),
                                            t[0]))
    dims = tuple(best.dims[i] if out.shape[i] > 1 else () for i in range(rank))
    partials = {s.partial for _, _, s in arrays}
    keep_partial = _partial_passes(node, ins, partials)
    # the partial operands all share one partial set; the others are () (not partial)
    target = Spec(dims, next((p for p in partials if p), ()) if keep_partial else ())
    def wanted(v):
        return tuple(target.dims[i] if v.shape[i] == out.shape[i] else () for i in range(rank))

    # Partial sums pass through only if every partial operand is already laid out as wanted.
    if keep_partial and any(s is not None and s.partial and s.dims != wanted(v)
                            for (_, s), v in zip(ins, node.inputs) if len(v.shape) == rank):
        keep_partial = False
    args = []
    for (x, s), v in zip(ins, node.inputs):
        if s is None or len(v.shape) != rank:
            args.append(x)
            continue
        want_dims = wanted(v)
        if keep_partial and s.partial:
            args.append(x)
            continue
        x, s = ctx.resolved(x, s, node.op)
        args.append(_to_operand(ctx, x, s, Spec(want_dims), node.op))
    if not keep_partial:
        target = Spec(target.dims)
    return [(o, target) for o in ctx.bind(node, args)]


def _nested_partials(ctx: LowerContext, node: Node, ins: list[Local]) -> list[Local]:
    """A sum of partial sums over nested sets of axes (a parallel block's attention output,
    partial over the (x, y) its 48 heads split, plus its FFN output, partial over x, y, z):
    the smaller ones become partial over the largest set too, without communication, so the
    block is reduced once (one reduce-scatter, as the cost model counts it) instead of each
    part apart. Anything else is returned as it came."""
    if node.op not in ("add", "add_any", "sub") or any(s is None for _, s in ins):
        return ins
    parts = [s.partial for _, s in ins]
    if not all(parts) or any(op != "sum" for p in parts for _, op in p) or len(set(parts)) < 2:
        return ins
    union = max(parts, key=len)
    if any(not {a for a, _ in p} <= {a for a, _ in union} for p in parts):
        return ins
    out = []
    for x, s in ins:
        widened = _widen_partial(ctx, x, s, [a for a, _ in union if a not in s.partial_axes()])
        if widened is None:
            return ins
        out.append((widened[0], Spec(widened[1].dims, union)))
    return out


def _widen_partial(ctx: LowerContext, x, spec: Spec, axes: list[str]):
    """(x, spec) made a partial sum over `axes` too, locally: an axis that is the minor-most
    split of a dimension is undone by putting the local block among zeros; an axis nothing
    uses keeps the value on its first device and zeros on the others. None if an axis splits
    a dimension under another one."""
    import jax.numpy as jnp

    dims = [tuple(d) for d in spec.dims]
    for a in sorted(axes, key=lambda a: -max((d.index(a) for d in dims if a in d),
                                             default=-1)):
        hit = next((i for i, d in enumerate(dims) if a in d), None)
        index = None if ctx.abstract else jax.lax.axis_index(a)
        if hit is None:
            if not ctx.abstract:
                x = jnp.where(index == 0, x, jnp.zeros((), x.dtype))
            continue
        if dims[hit][-1] != a:
            return None
        size = x.shape[hit]
        full = list(x.shape)
        full[hit] = size * ctx.mesh.sizes[a]
        x = Abstract(tuple(full), x.dtype) if ctx.abstract else \
            jax.lax.dynamic_update_slice_in_dim(jnp.zeros(full, x.dtype), x, index * size,
                                                axis=hit)
        dims[hit] = dims[hit][:-1]
    return x, Spec(tuple(dims), spec.partial)


def _partial_passes(node: Node, ins: list[Local], partials: set) -> bool:
    """Whether the op is linear in its partial operands, so partial sums may pass through."""
    parts = [s.partial for (_, s) in ins if s is not None]
    if not any(parts):
        return False
    if any(op != "sum" for p in parts for _, op in p):
        return False
    nonempty = [p for p in parts if p]
    if len(set(nonempty)) != 1:
        return False
    n_partial = len(nonempty)
    has_literal = any(isinstance(v, Literal) for v in node.inputs)
    if node.op in ("add", "sub", "add_any"):
        return n_partial == len(node.inputs) and not has_literal
    if node.op == "mul":
        return n_partial == 1
    if node.op == "div":
        return ins[0][1] is not None and bool(ins[0][1].partial) and not (
            ins[1][1] is not None and ins[1][1].partial)
    return node.op in _LINEAR_UNARY and len(node.inputs) == 1


# ---- layout operations --------------------------------------------------------------------------


def _free_batch_dim(node, sin, sout, need, ctx, moving: int):
    """(input dim, output dim) of an unsharded `batch` dim the reshape keeps whole and that
    attention's batch axes can split, or None."""
    axes = tuple(ctx.attention_batch)
    v = node.inputs[0]
    roles = (v.producer.meta.get("axes") or [None] * (v.index + 1))[v.index]
    if not axes or not roles or any(set(d) & set(axes) for k, d in enumerate(need)
                                     if k != moving):
        return None
    for gi, gj in reshape_groups(sin, sout):
        if len(gi) == 1 and len(gj) == 1 and roles[gi[0]] == "batch" and \
                not need[gi[0]] and sin[gi[0]] % ctx.mesh.count(axes) == 0:
            return gi[0], gj[0]
    return None


def _out_role(node: Node, dim: int) -> str | None:
    """The dimension role `infer-axes` gave output dim `dim` of a one-output node."""
    roles = (node.meta.get("axes") or [None])[0]
    return roles[dim] if roles and dim < len(roles) else None


@lower_rule("reshape")
def _reshape(ctx, node, ins):
    (x, spec), = ins[:1]
    if spec is None:
        return _replicated(ctx, node, ins, "reshape of a literal")
    x, spec = ctx.resolved(x, spec, "reshape")
    sin, sout = node.inputs[0].shape, node.out.shape
    need = [tuple(d) for d in spec.dims]
    out_dims = [()] * len(sout)
    for gi, gj in reshape_groups(sin, sout):
        sharded = [k for k in gi if need[k]]
        if not sharded:
            continue
        if len(gi) == 1 and len(gj) >= 1:
            axes = need[gi[0]]
            # a split: the major output dim keeps the sharding (its major axes, when the dim
            # is too small for all of them: the minor axes are gathered)
            keep = len(axes)
            while keep and sout[gj[0]] % ctx.mesh.count(axes[:keep]):
                keep -= 1
            rest = axes[keep:]
            if keep and rest and not ctx.attention_splits_batch and len(gj) > 1 and \
                    sout[gj[0]] == ctx.mesh.count(axes[:keep]) and \
                    sout[gj[1]] % ctx.mesh.count(rest) == 0 and \
                    _out_role(node, gj[1]) in ("groups", "heads"):
                # one element of the major output dim per device: the minor axes split the
                # next one, when attention keeps it split, instead of being gathered (2 KV
                # heads over x, their query groups over (y, z))
                out_dims[gj[0]], out_dims[gj[1]] = tuple(axes[:keep]), tuple(rest)
                continue
            if keep < len(axes) and ctx.attention_splits_batch:
                # attention over batch: the heads move onto the batch dim (all-to-all) in the
                # axes attention wants it in, if it can take them; else they are gathered
                b = _free_batch_dim(node, sin, sout, need, ctx, gi[0])
                if b is not None:
                    need[gi[0]] = ()
                    need[b[0]] = tuple(ctx.attention_batch)
                    out_dims[b[1]] = tuple(ctx.attention_batch)
                    continue
                keep = 0
            if keep:
                need[gi[0]] = tuple(axes[:keep])
                out_dims[gj[0]] = tuple(axes[:keep])
                continue
        elif len(gj) == 1 and sharded == [gi[0]]:
            out_dims[gj[0]] = need[gi[0]]  # a merge whose major input dim is sharded
            continue
        elif len(gj) == 1 and sharded == gi[:2] and \
                sin[gi[0]] == ctx.mesh.count(need[gi[0]]):
            # the merge of the split above: one element of the major dim per device, the
            # next dim split by the minor axes
            out_dims[gj[0]] = need[gi[0]] + need[gi[1]]
            continue
        for k in gi:
            need[k] = ()
    target_in = Spec(tuple(need))
    x = ctx.to(x, spec, target_in, "reshape")
    out_spec = Spec(tuple(out_dims))
    local = ctx.mesh.local_shape(sout, out_spec)
    return [(ctx.bind(node, [x], new_sizes=tuple(local), dimensions=None)[0], out_spec)]


@lower_rule("broadcast_in_dim")
def _broadcast(ctx, node, ins):
    x, spec = ins[0]
    out = node.out
    dims = [()] * len(out.shape)
    if spec is not None:
        if spec.partial and not _partial_passes(node, ins, {spec.partial}):
            x, spec = ctx.resolved(x, spec, "broadcast")
        keep = list(spec.dims)
        for i, od in enumerate(node.params["broadcast_dimensions"]):
            if node.inputs[0].shape[i] == out.shape[od]:
                dims[od] = keep[i]
            else:
                keep[i] = ()
        want = Spec(tuple(keep), spec.partial)
        x = ctx.to(x, spec, want, "broadcast") if not spec.partial else x
        out_spec = Spec(tuple(dims), spec.partial)
    else:
        out_spec = Spec(tuple(dims))
    local = ctx.mesh.local_shape(out.shape, out_spec)
    rest = [a for a, _ in ins[1:]]
    y = ctx.bind(node, [x, *rest], shape=tuple(local), sharding=None)[0]
    if spec is not None and not out_spec.partial and not rest:
        ctx.broadcasts[id(y)] = (y, node, x, want)
    return [(y, out_spec)]


def _moves(src: Spec, dst: Spec) -> bool:
    """Whether resharding src -> dst moves data (not only slicing local blocks)."""
    if src.partial:
        return True
    return any(tuple(t[:len(f)]) != tuple(f) for f, t in zip(src.dims, dst.dims))


def _source_size(ctx, x, v: Value) -> int:
    """Elements that must move to reshard operand v: a broadcast's input, else v itself."""
    hit = ctx.broadcasts.get(id(x))
    if hit is not None and hit[0] is x:
        return math.prod(hit[1].inputs[0].shape)
    return math.prod(v.shape)


def _to_operand(ctx, x, s: Spec, want: Spec, note: str):
    """ctx.to, but a broadcast operand that must move re-broadcasts its moved input."""
    hit = ctx.broadcasts.get(id(x))
    if hit is None or hit[0] is not x or not _moves(s, want):
        return ctx.to(x, s, want, note)
    _, node, src, src_spec = hit
    bdims = node.params["broadcast_dimensions"]
    in_shape, out_shape = node.inputs[0].shape, node.out.shape
    src_want = Spec(tuple(want.dims[od] if in_shape[i] == out_shape[od] else ()
                          for i, od in enumerate(bdims)))
    src = ctx.to(src, src_spec, src_want, note)
    local = ctx.mesh.local_shape(out_shape, want)
    return ctx.bind(node, [src], shape=tuple(local), sharding=None)[0]


@lower_rule("transpose")
def _transpose(ctx, node, ins):
    x, spec = ins[0]
    perm = node.params["permutation"]
    return [(ctx.bind(node, [x])[0], Spec(tuple(spec.dims[p] for p in perm), spec.partial))]


@lower_rule("squeeze")
def _squeeze(ctx, node, ins):
    x, spec = ins[0]
    rank = len(node.inputs[0].shape)
    gone = {d % rank for d in node.params["dimensions"]}
    return [(ctx.bind(node, [x])[0], Spec(tuple(d for i, d in enumerate(spec.dims)
                                             if i not in gone), spec.partial))]


@lower_rule("expand_dims")
def _expand_dims(ctx, node, ins):
    x, spec = ins[0]
    dims = list(spec.dims)
    for d in sorted(node.params["dimensions"]):
        dims.insert(d, ())
    return [(ctx.bind(node, [x])[0], Spec(tuple(dims), spec.partial))]


@lower_rule("reduce_sum", "reduce_max", "reduce_min")
def _reduce(ctx, node, ins):
    x, spec = ins[0]
    op = {"reduce_sum": "sum", "reduce_max": "max", "reduce_min": "min"}[node.op]
    if spec.partial and not (op == "sum" and all(o == "sum" for _, o in spec.partial)):
        x, spec = ctx.resolved(x, spec, node.op)
    axes = set(node.params["axes"])
    partial = list(spec.partial)
    for d in sorted(axes):
        partial += [(a, op) for a in spec.dims[d]]
    kept = tuple(d for i, d in enumerate(spec.dims) if i not in axes)
    return [(ctx.bind(node, [x])[0], Spec(kept, tuple(partial)))]


def _unshard_dims(ctx, node, x, spec: Spec, dims_to_free) -> tuple[Any, Spec]:
    x, spec = ctx.resolved(x, spec, node.op)
    want = tuple(() if i in dims_to_free else d for i, d in enumerate(spec.dims))
    if want != spec.dims:
        x = ctx.to(x, spec, Spec(want), node.op)
    return x, Spec(want)


@lower_rule("argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
            "sort", "top_k", "rev")
def _along_one_axis(ctx, node, ins):
    x, spec = ins[0]
    axis = node.params.get("axes", node.params.get("axis", node.params.get("dimension")))
    axes = set(axis) if isinstance(axis, (tuple, list)) else {axis if axis is not None else
                                                              len(spec.dims) - 1}
    if node.op in ("sort", "top_k") or len(ins) > 1:
        return _replicated(ctx, node, ins, f"{node.op} runs replicated")
    x, spec = _unshard_dims(ctx, node, x, spec, {a % len(spec.dims) for a in axes})
    out = ctx.bind(node, [x])
    if node.op in ("argmax", "argmin"):
        kept = tuple(d for i, d in enumerate(spec.dims) if i not in axes)
        return [(out[0], Spec(kept))]
    return [(o, spec) for o in out]


@lower_rule("fft")
def _fft(ctx, node, ins):
    # jnp.fft.*: transforms the last len(fft_lengths) axes whole (they are gathered; an
    # elementwise split of them would transform each shard alone), the leading axes stay split
    x, spec = ins[0]
    rank = len(spec.dims)
    x, spec = _unshard_dims(ctx, node, x, spec,
                            set(range(rank - len(node.params["fft_lengths"]), rank)))
    return [(ctx.bind(node, [x])[0], spec)]


@lower_rule("slice")
def _slice(ctx, node, ins):
    x, spec = ins[0]
    shape = node.inputs[0].shape
    cut = {i for i in range(len(shape))
           if node.params["start_indices"][i] != 0 or node.params["limit_indices"][i] != shape[i]
           or (node.params.get("strides") or [1] * len(shape))[i] != 1}
    if spec.partial and not _partial_passes(node, ins, {spec.partial}):
        x, spec = ctx.resolved(x, spec, "slice")
    x, dims_spec = (x, spec) if not any(spec.dims[i] for i in cut) else \
        _unshard_dims(ctx, node, x, spec, cut)
    local_shape = ctx.mesh.local_shape(shape, dims_spec)
    limit = tuple(node.params["limit_indices"][i] if i in cut else local_shape[i]
                  for i in range(len(shape)))
    return [(ctx.bind(node, [x], limit_indices=limit)[0], dims_spec)]


@lower_rule("dynamic_slice")
def _dynamic_slice(ctx, node, ins):
    x, spec = ins[0]
    sizes = node.params["slice_sizes"]
    shape = node.inputs[0].shape
    cut = {i for i in range(len(shape)) if sizes[i] != shape[i]}
    x, spec = _unshard_dims(ctx, node, x, spec, cut)
    local = ctx.mesh.local_shape(shape, spec)
    local_sizes = tuple(sizes[i] if i in cut else local[i] for i in range(len(shape)))
    idx = [ctx.resolved(a, s)[0] if s is not None else a for a, s in ins[1:]]
    return [(ctx.bind(node, [x, *idx], slice_sizes=local_sizes)[0], spec)]


@lower_rule("dynamic_update_slice")
def _dynamic_update_slice(ctx, node, ins):
    (x, spec), (u, uspec) = ins[0], ins[1]
    shape, ushape = node.inputs[0].shape, node.inputs[1].shape
    cut = {i for i in range(len(shape)) if ushape[i] != shape[i]}
    x, spec = _unshard_dims(ctx, node, x, spec, cut)
    u, uspec = ctx.resolved(u, uspec, node.op)
    u = ctx.to(u, uspec, spec, node.op)
    idx = [ctx.resolved(a, s)[0] if s is not None else a for a, s in ins[2:]]
    return [(ctx.bind(node, [x, u, *idx])[0], spec)]


@lower_rule("concatenate")
def _concatenate(ctx, node, ins):
    axis = node.params["dimension"]
    # the most split operand sets the layout: the others reach it by a local slice (from
    # whole) rather than it reaching theirs by an all-gather (e.g. a scatter's indices:
    # a batch-split column of positions beside columns of constant zeros)
    first = max((s for _, s in ins if s is not None),
                key=lambda s: sum(len(d) for i, d in enumerate(s.dims) if i != axis))
    dims = tuple(() if i == axis else d for i, d in enumerate(first.dims))
    args = []
    for x, s in ins:
        x, s = ctx.resolved(x, s, "concatenate")
        args.append(ctx.to(x, s, Spec(dims), "concatenate"))
    return [(ctx.bind(node, args)[0], Spec(dims))]


@lower_rule("stack")
def _stack(ctx, node, ins):
    axis = node.params["axis"]
    first = next(s for _, s in ins if s is not None).without_partial()
    args = []
    for x, s in ins:
        x, s = ctx.resolved(x, s, "stack")
        args.append(ctx.to(x, s, Spec(first.dims), "stack"))
    dims = list(first.dims)
    dims.insert(axis, ())
    return [(ctx.bind(node, args)[0], Spec(tuple(dims)))]


@lower_rule("split")
def _split(ctx, node, ins):
    x, spec = ins[0]
    axis = node.params["axis"]
    inter = node.meta.get("interleave")
    if inter is not None:  # a fused weight stored interleaved: every shard holds each part
        x, spec = ctx.resolved(x, spec, "split")
        axes = tuple(inter["axes"])
        want = spec.with_dims(axes if i == axis else d for i, d in enumerate(spec.dims))
        x = ctx.to(x, spec, want, "split")
        n = ctx.mesh.count(axes)
        return [(o, want) for o in ctx.bind(node, [x], sizes=tuple(s // n for s in
                                                               inter["sizes"]))]
    x, spec = _unshard_dims(ctx, node, x, spec, {axis})
    return [(o, spec) for o in ctx.bind(node, [x])]


@lower_rule("iota")
def _iota(ctx, node, ins):
    return [(ctx.bind(node, [])[0], Spec.replicated(len(node.out.shape)))]


@lower_rule("gather")
def _gather(ctx, node, ins):
    (table, tspec), (idx, ispec) = ins
    dn = node.params["dimension_numbers"]
    sizes = node.params["slice_sizes"]
    tshape = node.inputs[0].shape
    index_dims = {d for d in range(len(tshape)) if sizes[d] != tshape[d]} | set(
        dn.collapsed_slice_dims)
    if getattr(dn, "operand_batching_dims", ()):
        return _replicated(ctx, node, ins, "batched gather runs replicated")
    idx, ispec = ctx.resolved(idx, ispec, "gather")
    idx, ispec = _unshard_dims(ctx, node, idx, ispec, {len(ispec.dims) - 1})
    row = _vocab_sharded_row(node, tspec, index_dims)
    if row is not None:
        return _masked_lookup(ctx, node, table, tspec, idx, ispec, row)
    table, tspec = _unshard_dims(ctx, node, table, tspec, index_dims)
    out_rank = len(node.out.shape)
    offset = list(dn.offset_dims)
    kept = [d for d in range(len(tshape)) if d not in set(dn.collapsed_slice_dims)]
    dims: list = [()] * out_rank
    for od, td in zip(offset, kept):
        dims[od] = tspec.dims[td]
    batch_out = [d for d in range(out_rank) if d not in offset]
    for od, idim in zip(batch_out, range(len(ispec.dims) - 1)):
        dims[od] = ispec.dims[idim]
    clash = {a for od in offset for a in dims[od]} & {a for od in batch_out for a in dims[od]}
    if clash:  # ids and table split over one axis: gather the (small) ids, not the table
        idims = tuple(tuple(a for a in d if a not in clash) for d in ispec.dims)
        idx = ctx.to(idx, ispec, Spec(idims), "gather ids")
        ispec = Spec(idims)
        for od, idim in zip(batch_out, range(len(ispec.dims) - 1)):
            dims[od] = ispec.dims[idim]
    local_sizes = tuple(sizes[d] if d in index_dims else ctx.mesh.local_shape(
        tshape, tspec)[d] for d in range(len(tshape)))
    out_spec = Spec(tuple(dims))
    return [(ctx.bind(node, [table, idx], slice_sizes=local_sizes)[0], out_spec)]


def _vocab_sharded_row(node: Node, tspec: Spec, index_dims: set) -> int | None:
    """The table's one indexed dimension when it is sharded (a vocabulary-sharded embedding
    lookup, one id per row), else None."""
    dn = node.params["dimension_numbers"]
    sharded = [d for d in index_dims if tspec.dims[d]]
    if len(sharded) != 1 or tuple(dn.start_index_map) != (sharded[0],) or \
            node.inputs[1].shape[-1] != 1 or tspec.partial:
        return None
    return sharded[0]


def _masked_lookup(ctx, node, table, tspec: Spec, idx, ispec: Spec, row: int):
    """Each device looks up the ids that fall in its rows and zeros the others; the result is
    a partial sum over the row axes (the reduce-scatter into the residual layout follows)."""
    import jax.numpy as jnp

    axes = tspec.dims[row]
    dn = node.params["dimension_numbers"]
    offset_dims = list(dn.offset_dims)
    rank = len(node.out.shape)
    batch_out = [d for d in range(rank) if d not in offset_dims]
    dims: list = [()] * rank
    kept = [d for d in range(len(tspec.dims)) if d not in set(dn.collapsed_slice_dims)]
    for od, td in zip(offset_dims, kept):
        dims[od] = () if td == row else tspec.dims[td]
    for od, idim in zip(batch_out, range(len(ispec.dims) - 1)):
        dims[od] = ispec.dims[idim]
    spec = Spec(tuple(dims), tuple((a, "sum") for a in axes))
    if ctx.abstract:
        return [(ctx.bind(node, [table, idx])[0], spec)]
    rows = table.shape[row]  # local rows
    offset = jax.lax.axis_index(axes[0] if len(axes) == 1 else tuple(axes)) * rows
    local = idx - offset.astype(idx.dtype)
    inside = (local >= 0) & (local < rows)
    local = jnp.clip(local, 0, rows - 1)
    sizes = tuple(1 if d == row else table.shape[d] for d in range(table.ndim))
    out = ctx.bind(node, [table, local], slice_sizes=sizes)[0]
    mask = inside[..., 0]  # (index batch dims)
    mask = jax.lax.broadcast_in_dim(mask, out.shape, tuple(batch_out))
    out = jnp.where(mask, out, jnp.zeros((), out.dtype))
    return [(out, spec)]


@lower_rule("scatter", "scatter-add", "scatter_add")
def _scatter(ctx, node, ins):
    from meshwright.passes.axis_rules import scatter_pairs

    (x, spec), (idx, ispec), (u, uspec) = ins[:3]
    dn = node.params["dimension_numbers"]
    pairs = scatter_pairs(node)
    shape, ushape = node.inputs[0].shape, node.inputs[2].shape
    paired = {od for ud, od in pairs if ushape[ud] == shape[od]}
    x, spec = _unshard_dims(ctx, node, x, spec, set(range(len(shape))) - paired)
    # An index into a dimension the update covers whole is 0: that dimension may stay split.
    whole = {od for ud, od in pairs if ushape[ud] == shape[od]}
    indexed = set(dn.scatter_dims_to_operand_dims) - whole
    if indexed & {d for d in range(len(shape)) if spec.dims[d]}:
        x, spec = _unshard_dims(ctx, node, x, spec, indexed)
    udims = [()] * len(ushape)
    for ud, od in pairs:
        if ushape[ud] == shape[od]:
            udims[ud] = spec.dims[od]
    batching = list(getattr(dn, "scatter_indices_batching_dims", ()))
    idims = [()] * len(node.inputs[1].shape)
    for k, od in enumerate(getattr(dn, "operand_batching_dims", ())):
        if k < len(batching):
            idims[batching[k]] = spec.dims[od]
    u, uspec = ctx.resolved(u, uspec, node.op)
    u = ctx.to(u, uspec, Spec(tuple(udims)), node.op)
    idx, ispec = ctx.resolved(idx, ispec, node.op)
    idx = ctx.to(idx, ispec, Spec(tuple(idims)), node.op)
    one_row = None if ctx.abstract else _one_row_scatter(node, x, idx, u)
    if one_row is not None:
        return [(one_row, spec)]
    return [(ctx.bind(node, [x, idx, u])[0], spec)]


def _one_row_scatter(node: Node, x, idx, u):
    """A scatter whose batching dimension (one row per sequence: a KV cache write) is a
    single row on this device, bound as a scatter of that row and a dropped second one:
    XLA:CPU rewrites a one-update scatter into a bounds-checked dynamic_update_slice that it
    fuses twice and copies the whole cache around (see `models.cache.write_one_row`), and a
    batch split over every device leaves one row each. None when the pattern differs."""
    import jax.numpy as jnp

    dn = node.params["dimension_numbers"]
    obatch = tuple(getattr(dn, "operand_batching_dims", ()))
    ibatch = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    if node.op != "scatter" or len(obatch) != 1 or ibatch != (0,) or idx.ndim != 2 \
            or x.shape[obatch[0]] != 1 or u.shape[0] != 1 or 0 in dn.update_window_dims:
        return None
    ob = obatch[0]
    row = jnp.array([[0], [1]], idx.dtype)  # row 1 does not exist here: dropped
    index = jnp.concatenate([row, jnp.concatenate([idx, idx])], axis=1)  # (2, 1 + n)
    update = jnp.concatenate([u, u])  # (2, window...)
    dims = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(dn.update_window_dims),
        inserted_window_dims=tuple(sorted((ob, *dn.inserted_window_dims))),
        scatter_dims_to_operand_dims=(ob, *dn.scatter_dims_to_operand_dims))
    return jax.lax.scatter(x, index, update.astype(x.dtype), dims,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


# ---- matmul -----------------------------------------------------------------------------------


@lower_rule("dot_general")
def _dot_general(ctx, node, ins):
    (lx, ls), (rx, rs) = ins
    want_l, want_r = dot_operand_specs(node, ls, rs)
    site = MatmulSite(node, (ls, rs), (want_l, want_r),
                      tuple(s != w and ctx.resharded(x, s, w) is not None
                            for (x, s), w in zip(ins, (want_l, want_r))), ctx.em.trips)
    if ctx.abstract:
        ctx.propagation.matmuls.append(site)
    else:
        for lowering in MATMUL_LOWERINGS.values():
            out = lowering(ctx, site, ins)
            if out is not None:
                return out
    lx, ls = _operand_to(ctx, lx, ls, want_l)
    rx, rs = _operand_to(ctx, rx, rs, want_r)
    return [(ctx.bind(node, [lx, rx])[0], dot_output_spec(node, ls, rs))]


def _operand_to(ctx, x, spec: Spec, want: Spec):
    if spec == want:
        return x, spec
    x, spec = ctx.resolved(x, spec, "matmul operand")
    return ctx.to(x, spec, want, "matmul operand"), want


def dot_operand_specs(node: Node, ls: Spec, rs: Spec) -> tuple[Spec, Spec]:
    """The specs a dot_general computes on, given its operands' specs: annotate's operand
    targets, and the other operand aligned with the reference one (the weight, else the more
    sharded) on its contracting and batch dims. One partial operand may stay partial (the
    product is linear in it); not two."""
    targets = node.meta.get("operand_target", {})
    if 0 in targets:
        ls = targets[0]
    if 1 in targets:
        rs = targets[1]
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    if ls.partial and rs.partial:
        rs = rs.without_partial()
    weight = weight_operand(node)
    ref = weight if weight is not None else (
        0 if sum(map(len, ls.dims)) >= sum(map(len, rs.dims)) else 1)
    specs = [list(ls.dims), list(rs.dims)]
    pairs = list(zip(lc, rc)) + list(zip(lb, rb))
    other = 1 - ref
    for i, j in pairs:
        a, b = (i, j) if ref == 0 else (j, i)
        specs[other][b] = specs[ref][a]
    used_ref = {ax for d in specs[ref] for ax in d}
    paired_other = {j for i, j in pairs} if other == 1 else {i for i, j in pairs}
    for d in range(len(specs[other])):
        if d not in paired_other:
            specs[other][d] = tuple(a for a in specs[other][d] if a not in used_ref)
    seen: set[str] = set()
    for d in range(len(specs[other])):  # an axis once per operand
        specs[other][d] = tuple(a for a in specs[other][d] if a not in seen)
        seen.update(specs[other][d])
    out = [ls, rs]
    if tuple(specs[other]) != out[other].dims:
        out[other] = Spec(tuple(specs[other]))
    return out[0], out[1]


def dot_output_spec(node: Node, ls: Spec, rs: Spec) -> Spec:
    """The result's spec: batch, then lhs free, then rhs free dims; partial over the axes of
    the contracted dims (and over the operands' partial axes)."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    out_dims = [ls.dims[i] for i in lb]
    out_dims += [ls.dims[i] for i in range(len(ls.dims)) if i not in lc and i not in lb]
    out_dims += [rs.dims[j] for j in range(len(rs.dims)) if j not in rc and j not in rb]
    partial = list(ls.partial) + list(rs.partial) + [(a, "sum") for i in lc for a in ls.dims[i]]
    return Spec(tuple(out_dims), tuple(partial))


def weight_operand(node: Node) -> int | None:
    """Which operand of a dot_general is a weight (graph.meta["weight_values"]), else None."""
    weights = node.graph.meta.get("weight_values", set())
    hits = [k for k, v in enumerate(node.inputs) if isinstance(v, Value) and v.id in weights]
    return hits[0] if len(hits) == 1 else None


# ---- control flow ---------------------------------------------------------------------------


@lower_rule("scan")
def _scan(ctx, node, ins):
    body: Graph = node.regions["jaxpr"]
    n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
    args, specs = [], []
    for k, ((x, s), v) in enumerate(zip(ins, node.inputs)):
        if s is None:  # a literal operand
            x, s = np.asarray(x), Spec.replicated(len(v.shape))
        x, s = ctx.resolved(x, s, "scan operand")
        if k >= n_consts + n_carry and s.dims and s.dims[0]:
            x, s = _unshard_dims(ctx, node, x, s, {0})
        args.append(x)
        specs.append(s)
    length = node.params["length"]
    if len(args) > n_consts + n_carry and not ctx.abstract:  # the local slices' (a pipeline
        length = int(args[n_consts + n_carry].shape[0])      # stage holds some layers)
    body_specs = specs[:n_consts + n_carry] + [Spec(s.dims[1:]) for s in specs[n_consts +
                                                                                n_carry:]]
    out_specs: list[Spec] = []
    body.meta["weight_values"] = node.graph.meta.get("weight_values", set())

    def step(carry, xs):
        consts = args[:n_consts]
        flat = list(consts) + list(carry) + list(xs)
        trips, ctx.em.trips = ctx.em.trips, ctx.em.trips * length
        try:
            outs, ospecs = lower_graph(ctx, body, flat, body_specs)
        finally:
            ctx.em.trips = trips
        carry_out = []
        for o, s, want in zip(outs[:n_carry], ospecs[:n_carry],
                              body_specs[n_consts:n_consts + n_carry]):
            carry_out.append(ctx.to(o, s, want, "scan carry"))
        ys = []
        ys_specs = []
        for o, s in zip(outs[n_carry:], ospecs[n_carry:]):
            o, s = ctx.resolved(o, s, "scan output")
            ys.append(o)
            ys_specs.append(s)
        out_specs[:] = list(body_specs[n_consts:n_consts + n_carry]) + ys_specs
        return carry_out, ys

    if ctx.abstract:  # the body once, on one step's slices
        carry, ys = step(args[n_consts:n_consts + n_carry],
                         [Abstract(tuple(a.shape[1:]), a.dtype)
                          for a in args[n_consts + n_carry:]])
        ys = [Abstract((length, *y.shape), y.dtype) for y in ys]
    else:
        carry, ys = jax.lax.scan(step, args[n_consts:n_consts + n_carry],
                                 args[n_consts + n_carry:], length=length,
                                 reverse=node.params["reverse"], unroll=node.params["unroll"])
    result = []
    for k, o in enumerate(list(carry) + list(ys)):
        s = out_specs[k]
        result.append((o, s if k < n_carry else Spec(((),) + s.dims)))
    return result


def _cond_or_while(ctx, node, ins):
    ctx.fallback(node, f"{node.op} runs replicated (no sharding rule for its regions yet)")
    return _replicated(ctx, node, ins, f"{node.op} runs replicated")


LOWER_RULES["cond"] = _cond_or_while
LOWER_RULES["while"] = _cond_or_while


# ---- the walk --------------------------------------------------------------------------------


def lower_graph(ctx: LowerContext, g: Graph, flat: list, specs: list[Spec]):
    """Run g on local arrays with the given specs; returns (local outputs, their specs)."""
    env: dict[int, Local] = {}
    prop = ctx.propagation  # propagating specs: record them there, not on the graph
    for v, x, s in zip(g.inputs, flat, specs):
        env[v.id] = (x, s)
        if prop is not None:
            prop.specs[v.producer] = [s]
        else:
            v.producer.meta["sharding"] = [s.text()]

    def read(v):
        if isinstance(v, Literal):
            return (v.value, None)
        return env[v.id]

    for node in g.topo_order():
        if node.op == "input":
            continue
        if node.op == "constant":
            env[node.out.id] = (node.params["value"], Spec.replicated(len(node.out.shape)))
            continue
        ins = [read(v) for v in node.inputs]
        first_record = len(ctx.em.records)
        rule = ctx.overrides.get(id(node)) or LOWER_RULES.get(node.op, _elementwise)
        try:
            outs = rule(ctx, node, ins)
        except Exception as e:
            raise type(e)(f"lowering {node.op} at {node.source or '?'}: {e}") from e
        targets = node.meta.get("target")
        final = []
        for k, (o, s) in enumerate(outs):
            if isinstance(o, Abstract) and o.shape is None:  # bound while propagating
                o.shape = ctx.mesh.local_shape(node.outputs[k].shape, s)
            if targets and k < len(targets) and targets[k] is not None and s != targets[k]:
                o = ctx.to(o, s, targets[k], f"{node.op} output")
                s = targets[k]
            final.append((o, s))
            env[node.outputs[k].id] = (o, s)
        if prop is not None:
            prop.specs[node] = [s for _, s in final]
            prop.operand_specs[node] = [s for _, s in ins]
        else:
            node.meta["sharding"] = [s.text() for _, s in final]
            node.meta["spec"] = [s for _, s in final]
        emitted = ctx.em.records[first_record:]
        if emitted:
            site = _site(node)
            for r in emitted:
                r.site = r.site or site
        seen, notes = set(), []
        for r in emitted:  # a loop body records once per trip: list each collective once
            key = (r.kind, r.axes, r.bytes)
            if key not in seen:
                seen.add(key)
                notes.append(f"{r.kind}({','.join(r.axes)}) {r.bytes}B")
        if notes and prop is None:
            node.meta["collectives"] = notes
    outs, ospecs = [], []
    for v in g.outputs:
        x, s = read(v)
        if s is None:
            x, s = np.asarray(x), Spec.replicated(len(v.shape))
        outs.append(x)
        ospecs.append(s)
    return outs, ospecs


def _site(node: Node) -> str:
    """Where a collective comes from, for counting them by what they move: the block, the
    op, and the weight it multiplies by (else the roles of what it makes).

        attention.3 dot_general params.layers.3.q        ffn.0 add [batch,1,embed]
    """
    weights = node.graph.meta.get("weight_values", set())
    names = []
    for v in node.inputs:
        if not isinstance(v, Value) or v.id not in weights:
            continue
        while v.producer.op != "input" and len(v.producer.inputs) == 1 and isinstance(
                v.producer.inputs[0], Value):  # through a reshape, transpose, convert
            v = v.producer.inputs[0]
        names.append(v.producer.params.get("path") if v.producer.op == "input" else None)
    what = ",".join(n for n in names if n)
    if not what:
        roles = (node.meta.get("axes") or [None])[0] or ()
        what = f"[{','.join(str(r) for r in roles)}]"
    return f"{node.meta.get('block', '-')} {node.op} {what}"


def shard_counts(mesh: MeshInfo, spec: Spec) -> int:
    return math.prod(mesh.count(d) for d in spec.dims)
