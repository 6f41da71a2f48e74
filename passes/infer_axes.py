"""Pass `infer-axes`: what every tensor dimension means.

Two stages.

1. **Unify.** Every dimension of every value gets a symbol; per-primitive rules (a registry,
   `AXIS_RULES`, with a default for elementwise operations) say which dimensions are the same
   symbol: dot_general batch and contracting dimensions, reshape splits and merges (recorded as
   products, so `(B,T,H*D) -> (B,T,H,D)` knows `H*D` is heads times head_dim), transposes,
   broadcasts, reductions, gathers, cache updates, scan carries and per-layer slices...
   A primitive the rules do not know is reported, never guessed.

2. **Name.** Symbols get roles from the program's structure, not from variable names: the
   integer ids feeding an embedding gather give `batch` and `length`; the table gives `vocab`
   and `embed`; a dot_general of two activations followed by a softmax and a second
   dot_general is attention (contracted: `head_dim`; query-only: `heads`; key-only:
   `kv_length`); the head dimension of the key projection is `kv_heads`; a weight projection
   out of `embed` that comes back to `embed` through a nonlinearity is `mlp`; a stacked
   weight's scanned dimension is `layers`.

Results: `node.meta["axes"]` (per output, per dimension: a role or None) and
`graph.meta["axes"]`, an `AxesReport` with the size of every role and what stayed unknown.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshwright.ir import Graph, Literal, Node, Value
from meshwright.passes.analysis import (
    Analysis,
    analyze,
    contracted_dims,
    free_dims,
    value_operand,
)
from meshwright.passes.base import Pass, PassContext, register, rule_registry

ROLES = ("batch", "length", "kv_length", "embed", "heads", "kv_heads", "head_dim", "mlp",
         "vocab", "layers", "groups", "fused")


# ---------------------------------------------------------------------------------------------
# Stage 1: unification


class Symbols:
    """Union-find over dimension symbols, with sizes, products and pieces."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.products: dict[int, tuple[int, ...]] = {}  # whole -> ordered factors
        self.pieces: dict[int, int] = {}  # piece -> whole it was sliced/split from
        self.conflicts: list[str] = []

    def fresh(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def unify(self, a: int, b: int, why: str = "") -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.conflicts.append(f"sizes {self.size[ra]} and {self.size[rb]} differ ({why})")
            return
        lo, hi = min(ra, rb), max(ra, rb)  # the older symbol stays the root: deterministic
        self.parent[hi] = lo

    def set_product(self, whole: int, factors: list[int]) -> None:
        factors = [f for f in factors if self.size[f] != 1]
        if len(factors) == 1:
            self.unify(whole, factors[0], "reshape of a single factor")
        elif factors:
            self.products[whole] = tuple(factors)

    def canonicalize(self) -> None:
        """Unify wholes with the same factors and factors of unified wholes, to a fixpoint."""
        changed = True
        while changed:
            changed = self.canonicalize_pieces()
            by_factors: dict[tuple[int, ...], int] = {}
            by_whole: dict[int, tuple[int, ...]] = {}
            for whole, factors in list(self.products.items()):
                w = self.find(whole)
                # A last factor of size 2 is compared by size: interleaved RoPE splits head_dim
                # into (head_dim/2, 2) and stacks two halves into a new size-2 axis; the two
                # "2" axes are one axis, but no dataflow links them.
                fs = tuple(-2 if k == len(factors) - 1 and k > 0 and self.size[f] == 2
                           else self.find(f) for k, f in enumerate(factors))
                if fs in by_factors and by_factors[fs] != w:
                    self.unify(by_factors[fs], w, "same factors")
                    changed = True
                by_factors.setdefault(fs, w)
                other = by_whole.get(w)
                if other is not None and other != fs and len(other) == len(fs) and all(
                        a == b or (a >= 0 and b >= 0 and self.size[a] == self.size[b])
                        for a, b in zip(other, fs)):
                    for a, b in zip(other, fs):
                        if a >= 0 and b >= 0 and self.find(a) != self.find(b):
                            self.unify(a, b, "factors of one product")
                            changed = True
                by_whole.setdefault(w, fs)

    def canonicalize_pieces(self) -> bool:
        """Wholes of equal size cut into a common piece are one symbol (RoPE cuts head_dim in
        halves and concatenates them back into head_dim)."""
        pieces_of: dict[int, set[int]] = defaultdict(set)
        for piece, whole in self.pieces.items():
            pieces_of[self.find(whole)].add(self.find(piece))
        owner: dict[tuple[int, int], int] = {}  # (whole size, piece) -> a whole
        changed = False
        for whole, ps in sorted(pieces_of.items()):
            for p in sorted(ps):
                key = (self.size[whole], p)
                other = owner.setdefault(key, whole)
                if self.find(other) != self.find(whole):
                    self.unify(other, whole, "same pieces")
                    changed = True
        return changed

    def factors(self, s: int) -> tuple[int, ...] | None:
        r = self.find(s)
        for whole, fs in self.products.items():
            if self.find(whole) == r:
                return tuple(self.find(f) for f in fs)
        return None

    def part_index(self) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
        """`factors` and `whole_of` of every class at once, as {class: factors} and
        {class: whole}: one pass over the products and pieces instead of one per class
        (which was quadratic in depth). Valid until the next `unify`."""
        factors: dict[int, tuple[int, ...]] = {}
        for whole, fs in self.products.items():
            factors.setdefault(self.find(whole), tuple(self.find(f) for f in fs))
        wholes: dict[int, int] = {}
        for piece, whole in self.pieces.items():
            p, w = self.find(piece), self.find(whole)
            if p != w:
                wholes.setdefault(p, w)
        return factors, wholes

    def whole_of(self, s: int) -> int | None:
        """The symbol s was sliced or split out of, if any."""
        r = self.find(s)
        for piece, whole in self.pieces.items():
            if self.find(piece) == r and self.find(whole) != r:
                return self.find(whole)
        return None


@dataclass
class AxisContext:
    syms: Symbols
    dims: dict[int, list[int]]  # value id -> symbol per dimension
    unknown: list[str]

    def of(self, v: Any) -> list[int]:
        if isinstance(v, Literal):
            return []
        if v.id not in self.dims:
            self.dims[v.id] = [self.syms.fresh(s) for s in v.shape]
        return self.dims[v.id]

    def same(self, a: Any, b: Any, why: str) -> None:
        da, db = self.of(a), self.of(b)
        for x, y in zip(da, db):
            self.syms.unify(x, y, why)

    def link(self, v: Any, i: int, w: Any, j: int, why: str) -> None:
        """Dimension i of v is dimension j of w (when both are real, non-size-1 dims)."""
        dv, dw = self.of(v), self.of(w)
        if self.syms.size[dv[i]] == self.syms.size[dw[j]] and self.syms.size[dv[i]] != 1:
            self.syms.unify(dv[i], dw[j], why)


Rule = Callable[[AxisContext, Node], None]
AXIS_RULES: dict[str, Rule] = {}


axis_rule = rule_registry(AXIS_RULES)  # @axis_rule("prim", ...) registers a rule


def _elementwise_or_unknown(ctx: AxisContext, node: Node) -> None:
    """Default: operands of the output's rank whose dimensions equal the output's or are 1
    (lax broadcasts size-1 dimensions) are elementwise; anything else is reported."""
    out = node.outputs[0] if node.outputs else None
    arrays = [v for v in node.inputs if not isinstance(v, Literal) and v.shape != ()]
    if out is not None and all(o.shape == out.shape for o in node.outputs) and all(
            len(v.shape) == len(out.shape)
            and all(a in (b, 1) for a, b in zip(v.shape, out.shape)) for v in arrays):
        for v in arrays + node.outputs[1:]:
            for d in range(len(out.shape)):
                ctx.link(v, d, out, d, node.op)
        return
    ctx.unknown.append(f"{node.op} at {node.source or '?'}: no axis rule for a shape-changing "
                       f"{node.op}; its dimensions stay unlabelled")


@axis_rule("dot_general")
def _dot_general(ctx, node):
    lhs, rhs = node.inputs
    out = node.out
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    dl, dr, do = ctx.of(lhs), ctx.of(rhs), ctx.of(out)
    for a, b in zip(lc, rc):
        ctx.syms.unify(dl[a], dr[b], "contracting")
    k = 0
    for a, b in zip(lb, rb):
        ctx.syms.unify(dl[a], dr[b], "batch")
        ctx.syms.unify(dl[a], do[k], "batch")
        k += 1
    for i in range(len(dl)):
        if i not in lc and i not in lb:
            ctx.syms.unify(dl[i], do[k], "lhs free")
            k += 1
    for i in range(len(dr)):
        if i not in rc and i not in rb:
            ctx.syms.unify(dr[i], do[k], "rhs free")
            k += 1


@axis_rule("transpose")
def _transpose(ctx, node):
    (x,) = node.inputs
    for out_dim, in_dim in enumerate(node.params["permutation"]):
        ctx.link(node.out, out_dim, x, in_dim, "transpose")


@axis_rule("broadcast_in_dim")
def _broadcast(ctx, node):
    x = node.inputs[0]
    if isinstance(x, Literal):
        return
    for in_dim, out_dim in enumerate(node.params["broadcast_dimensions"]):
        ctx.link(x, in_dim, node.out, int(out_dim), "broadcast")


@axis_rule("reshape")
def _reshape(ctx, node):
    x = node.inputs[0]
    din, dout = ctx.of(x), ctx.of(node.out)
    sin, sout = list(x.shape), list(node.out.shape)
    i = j = 0
    while i < len(sin) or j < len(sout):
        # skip size-1 dimensions: they carry no meaning
        if i < len(sin) and sin[i] == 1:
            i += 1
            continue
        if j < len(sout) and sout[j] == 1:
            j += 1
            continue
        if i >= len(sin) or j >= len(sout):
            break
        gi, gj = [i], [j]
        pi, pj = sin[i], sout[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= sin[i]
            else:
                j += 1
                gj.append(j)
                pj *= sout[j]
        i += 1
        j += 1
        gi = [k for k in gi if sin[k] != 1]
        gj = [k for k in gj if sout[k] != 1]
        if len(gi) == 1 and len(gj) == 1:
            ctx.syms.unify(din[gi[0]], dout[gj[0]], "reshape")
        elif len(gi) == 1:
            ctx.syms.set_product(din[gi[0]], [dout[k] for k in gj])
        elif len(gj) == 1:
            ctx.syms.set_product(dout[gj[0]], [din[k] for k in gi])
        # many-to-many regroupings carry no usable correspondence


@axis_rule("squeeze")
def _squeeze(ctx, node):
    (x,) = node.inputs
    dims = {d % len(x.shape) for d in node.params["dimensions"]}
    kept = [d for d in range(len(x.shape)) if d not in dims]
    for out_dim, in_dim in enumerate(kept):
        ctx.link(node.out, out_dim, x, in_dim, "squeeze")


@axis_rule("expand_dims")
def _expand_dims(ctx, node):
    (x,) = node.inputs
    new = set(node.params["dimensions"])
    kept = [d for d in range(len(node.out.shape)) if d not in new]
    for in_dim, out_dim in enumerate(kept):
        ctx.link(node.out, out_dim, x, in_dim, "expand_dims")


@axis_rule("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "argmax", "argmin", "reduce_precision_sum")
def _reduce(ctx, node):
    x = node.inputs[0]
    axes = set(node.params.get("axes", ()))
    kept = [d for d in range(len(x.shape)) if d not in axes]
    for out_dim, in_dim in enumerate(kept):
        ctx.link(node.outputs[0], out_dim, x, in_dim, node.op)


@axis_rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "rev", "sort",
           "reduce_precision", "copy", "copy_p", "optimization_barrier")
def _same_shape(ctx, node):
    for v, o in zip(node.inputs, node.outputs):
        if not isinstance(v, Literal) and v.shape == o.shape:
            ctx.same(v, o, node.op)
    if node.op == "sort":  # all operands are sorted together
        for v in node.inputs[1:]:
            ctx.same(v, node.inputs[0], "sort")


@axis_rule("select_n", "clamp")
def _select(ctx, node):
    out = node.out
    for v in node.inputs:
        if not isinstance(v, Literal) and v.shape == out.shape:
            ctx.same(v, out, node.op)


@axis_rule("concatenate")
def _concatenate(ctx, node):
    axis = node.params["dimension"]
    out = node.out
    for v in node.inputs:
        for d in range(len(out.shape)):
            if d != axis:
                ctx.link(v, d, out, d, "concatenate")
            elif v.shape[d] != out.shape[d]:
                ctx.syms.pieces[ctx.of(v)[d]] = ctx.of(out)[d]


@axis_rule("stack")
def _stack(ctx, node):
    axis = node.params["axis"]
    out = node.out
    kept = [d for d in range(len(out.shape)) if d != axis]
    for v in node.inputs:
        if isinstance(v, Literal):
            continue
        for in_dim, out_dim in enumerate(kept):
            ctx.link(v, in_dim, out, out_dim, "stack")


@axis_rule("split")
def _split(ctx, node):
    x = node.inputs[0]
    axis = node.params["axis"]
    for o in node.outputs:
        for d in range(len(x.shape)):
            if d != axis:
                ctx.link(o, d, x, d, "split")
            elif o.shape[d] != x.shape[d]:
                ctx.syms.pieces[ctx.of(o)[d]] = ctx.of(x)[d]


@axis_rule("slice", "dynamic_slice")
def _slice(ctx, node):
    x = node.inputs[0]
    out = node.out
    for d in range(len(x.shape)):
        if x.shape[d] == out.shape[d]:
            ctx.link(out, d, x, d, node.op)
        elif out.shape[d] != 1:
            ctx.syms.pieces[ctx.of(out)[d]] = ctx.of(x)[d]


@axis_rule("dynamic_update_slice")
def _dynamic_update_slice(ctx, node):
    operand, update = node.inputs[0], node.inputs[1]
    ctx.same(operand, node.out, "dynamic_update_slice")
    for d in range(len(operand.shape)):
        if update.shape[d] == operand.shape[d]:
            ctx.link(update, d, operand, d, "dynamic_update_slice")


@axis_rule("pad")
def _pad(ctx, node):
    x = node.inputs[0]
    for d in range(len(x.shape)):
        ctx.link(node.out, d, x, d, "pad")


@axis_rule("iota")
def _iota(ctx, node):
    ctx.of(node.out)  # fresh symbols; unified later through comparisons and selects


@axis_rule("gather")
def _gather(ctx, node):
    operand, indices = node.inputs
    dn = node.params["dimension_numbers"]
    out = node.out
    offset_dims = tuple(dn.offset_dims)
    collapsed = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    slice_sizes = node.params["slice_sizes"]
    # operand dims that are not collapsed appear, in order, as the output's offset dims
    kept = [d for d in range(len(operand.shape)) if d not in collapsed]
    for out_dim, op_dim in zip(offset_dims, kept):
        if slice_sizes[op_dim] == operand.shape[op_dim]:
            ctx.link(out, out_dim, operand, op_dim, "gather offset")
    # the remaining output dims are the indices' batch dims (all but the index vector dim)
    batch_out = [d for d in range(len(out.shape)) if d not in offset_dims]
    index_dims = list(range(len(indices.shape) - 1))  # index_vector_dim is last in lax.gather
    for out_dim, idx_dim in zip(batch_out, index_dims):
        ctx.link(out, out_dim, indices, idx_dim, "gather batch")


@axis_rule("scatter", "scatter-add", "scatter_add", "scatter_mul", "scatter_min", "scatter_max")
def _scatter(ctx, node):
    operand, _, updates = node.inputs[:3]
    ctx.same(operand, node.out, node.op)
    for u_dim, op_dim in _scatter_pairs(node):
        ctx.link(updates, u_dim, operand, op_dim, node.op)


def _scatter_pairs(node: Node) -> list[tuple[int, int]]:
    """(update dim, operand dim) pairs of a scatter: window dims and batching dims."""
    operand, _, updates = node.inputs[:3]
    dn = node.params["dimension_numbers"]
    inserted = set(dn.inserted_window_dims)
    op_batching = list(getattr(dn, "operand_batching_dims", ()))
    window_operand = [d for d in range(len(operand.shape))
                      if d not in inserted and d not in op_batching]
    pairs = list(zip(dn.update_window_dims, window_operand))
    scatter_dims = [d for d in range(len(updates.shape)) if d not in dn.update_window_dims]
    pairs += list(zip(scatter_dims, op_batching))
    return pairs


@axis_rule("top_k")
def _top_k(ctx, node):
    x = node.inputs[0]
    for o in node.outputs:
        for d in range(len(x.shape) - 1):
            ctx.link(o, d, x, d, "top_k")


@axis_rule("scan")
def _scan(ctx, node):
    body: Graph = node.regions["jaxpr"]
    n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
    length = node.params["length"]
    layer = ctx.syms.fresh(length)
    node.meta["scan_axis"] = layer
    for i, (outer, inner) in enumerate(zip(node.inputs, body.inputs)):
        if isinstance(outer, Literal):
            continue
        if i < n_consts + n_carry:
            ctx.same(outer, inner, "scan operand")
        else:
            ctx.syms.unify(ctx.of(outer)[0], layer, "scan length")
            for d in range(len(inner.shape)):
                ctx.link(inner, d, outer, d + 1, "scan slice")
    _unify_graph(ctx, body)
    for i, (outer, inner) in enumerate(zip(node.outputs, body.outputs)):
        if isinstance(inner, Literal):
            continue
        if i < n_carry:
            ctx.same(outer, inner, "scan carry out")
            ctx.same(body.inputs[n_consts + i], inner, "scan carry")
        else:
            ctx.syms.unify(ctx.of(outer)[0], layer, "scan length")
            for d in range(len(inner.shape)):
                ctx.link(inner, d, outer, d + 1, "scan stack")


@axis_rule("cond")
def _cond(ctx, node):
    for branch in node.regions["branches"]:
        for outer, inner in zip(node.inputs[1:], branch.inputs):
            if not isinstance(outer, Literal):
                ctx.same(outer, inner, "cond operand")
        _unify_graph(ctx, branch)
        for outer, inner in zip(node.outputs, branch.outputs):
            if not isinstance(inner, Literal):
                ctx.same(outer, inner, "cond result")


@axis_rule("while")
def _while(ctx, node):
    cond, body = node.regions["cond_jaxpr"], node.regions["body_jaxpr"]
    nc, nb = node.params["cond_nconsts"], node.params["body_nconsts"]
    ops = node.inputs
    carry = ops[nc + nb:]
    for outer, inner in zip(ops[:nc] + carry, cond.inputs):
        if not isinstance(outer, Literal):
            ctx.same(outer, inner, "while cond operand")
    for outer, inner in zip(ops[nc:nc + nb] + carry, body.inputs):
        if not isinstance(outer, Literal):
            ctx.same(outer, inner, "while body operand")
    _unify_graph(ctx, cond)
    _unify_graph(ctx, body)
    for i, (outer, inner) in enumerate(zip(node.outputs, body.outputs)):
        if not isinstance(inner, Literal):
            ctx.same(outer, inner, "while carry")
            ctx.same(body.inputs[nb + i], inner, "while carry")


def _unify_graph(ctx: AxisContext, g: Graph) -> None:
    for node in g.topo_order():
        for v in node.outputs:
            ctx.of(v)
        if node.op in ("input", "constant"):
            continue
        AXIS_RULES.get(node.op, _elementwise_or_unknown)(ctx, node)


# ---------------------------------------------------------------------------------------------
# Stage 2: naming


@dataclass
class AxesReport:
    """What infer-axes found: the size of each role and what it could not label."""

    sizes: dict[str, int]  # role -> size (products like "heads*head_dim" included)
    unknown_primitives: list[str]  # "op at file:line: why"
    unlabelled: list[str]  # values with dimensions no role explains
    conflicts: list[str]  # unifications refused because sizes differed

    def to_dict(self) -> dict:
        return {"sizes": dict(self.sizes), "unknown_primitives": list(self.unknown_primitives),
                "unlabelled": list(self.unlabelled), "conflicts": list(self.conflicts)}


class _Namer:
    def __init__(self, syms: Symbols, dims: dict[int, list[int]]):
        self.syms = syms
        self.dims = dims
        self.names: dict[int, str] = {}
        self.weight_classes: set[int] = set()

    def cls(self, v: Any, d: int) -> int:
        return self.syms.find(self.dims[v.id][d])

    def classes(self, v: Any) -> list[int]:
        if isinstance(v, Literal):
            return []
        return [self.syms.find(s) for s in self.dims[v.id]]

    def name(self, s: int, role: str) -> None:
        r = self.syms.find(s)
        if self.syms.size[r] == 1:
            return
        self.names.setdefault(r, role)

    def role(self, s: int) -> str | None:
        return self.names.get(self.syms.find(s))


def _key_operand(n: _Namer, score: Node, value: Node) -> int:
    """The key is the score operand with a free dimension that the value dot contracts (on
    ties, the one with fewer free dimensions: keys carry no query heads)."""
    probs = value.inputs[1 - value_operand(value, score)]
    contracted = {n.cls(probs, d) for d in contracted_dims(value, value.inputs.index(probs))}
    has = [any(n.cls(score.inputs[k], d) in contracted for d in free_dims(score, k))
           for k in (0, 1)]
    if has[0] != has[1]:
        return 0 if has[0] else 1
    f0, f1 = len(free_dims(score, 0)), len(free_dims(score, 1))
    return 0 if f0 < f1 else 1


def _key_operand_by_axes(score: Node, value: Node) -> int:
    """The key operand of a labelled score dot: the one with kv_length, else fewer heads."""
    def roles(v):
        return v.producer.meta["axes"][v.index]

    for k in (0, 1):
        if "kv_length" in roles(score.inputs[k]) and "kv_length" not in roles(score.inputs[1 - k]):
            return k
    heads = [sum(r in ("heads", "groups") for r in roles(score.inputs[k])) for k in (0, 1)]
    if heads[0] != heads[1]:
        return 0 if heads[0] < heads[1] else 1
    return 1


def _name_activation_dims(n: _Namer, score: Node, k: int) -> None:
    """Without token ids, batch and length are the query's classes that no weight carries:
    shared by query and key (a batch dim of the score dot) -> batch; the query's own -> length."""
    q = 1 - k
    (_lc, _rc), (lb, rb) = score.params["dimension_numbers"]
    for d in (lb if q == 0 else rb):
        c = n.cls(score.inputs[q], d)
        if c not in n.weight_classes and n.syms.size[c] > 1:
            n.name(c, "batch")
    for d in free_dims(score, q):
        c = n.cls(score.inputs[q], d)
        if c not in n.weight_classes and n.syms.size[c] > 1:
            n.name(c, "length")


def _name_attention(a: Analysis, n: _Namer, score: Node, value: Node, k: int) -> None:
    q = 1 - k
    qv, kv = score.inputs[q], score.inputs[k]
    for d in contracted_dims(score, q):
        n.name(n.cls(qv, d), "head_dim")
    q_cls = n.classes(qv)
    for d in free_dims(score, k):
        c = n.cls(kv, d)
        if c not in q_cls:
            n.name(c, "kv_length")
    # the value's own head dimension: what the value dot keeps from V but not from the probs
    vi = value_operand(value, score)
    probs_cls = set(n.classes(value.inputs[1 - vi]))
    for d in free_dims(value, vi):
        c = n.cls(value.inputs[vi], d)
        if c not in probs_cls:
            n.name(c, "head_dim")
    settled = ("batch", "length", "kv_length", "head_dim", "layers")

    def heads_like(v):
        out = []
        for c in n.classes(v):
            if n.syms.size[c] > 1 and n.role(c) not in settled and c not in out:
                out.append(c)
        return out

    qh, kh = heads_like(qv), heads_like(kv)
    if not kh:  # multiquery: keys have no head dimension
        for c in qh:
            n.name(c, "heads")
    elif set(kh) == set(qh):  # multihead, or grouped-query with keys repeated up to heads
        kv_classes = set()
        for operand in (kv, value.inputs[vi]):
            proj = a.projection_of(operand)
            if proj is not None:
                for c in n.classes(proj.out):
                    kv_classes.add(c)
                    kv_classes.update(n.syms.factors(c) or ())
        for c in qh:
            n.name(c, "heads")
            fs = n.syms.factors(c)
            if fs and len(fs) == 2 and any(f in kv_classes for f in fs):
                kvh = fs[0] if fs[0] in kv_classes else fs[1]
                n.name(kvh, "kv_heads")
                n.name(fs[1] if kvh == fs[0] else fs[0], "groups")
    elif set(kh) < set(qh):  # grouped-query einsum: q is (kv_heads, groups)
        for c in kh:
            n.name(c, "kv_heads")
        for c in qh:
            n.name(c, "groups")
    else:
        for c in kh:
            if c not in qh:
                n.name(c, "kv_heads")
        for c in qh:
            n.name(c, "heads")


def _name_roles(g: Graph, a: Analysis, n: _Namer) -> None:
    syms = n.syms
    for scan in a.layer_scans:
        n.name(scan.meta["scan_axis"], "layers")

    # Token ids -> batch, length; the table -> vocab, embed. With several tables (learned
    # positions), the one with the most rows is the vocabulary; the others are positions.
    gathers = [node for node in a.equations
               if node.op == "gather" and a.is_weight(node.inputs[0])]

    def row_dims(node):
        """Table dimensions indexed by the ids (collapsed, or sliced to size 1 under vmap)."""
        dn, sizes, table = node.params["dimension_numbers"], node.params["slice_sizes"], \
            node.inputs[0]
        return [d for d in range(len(table.shape)) if d in set(dn.collapsed_slice_dims)
                or (sizes[d] == 1 and table.shape[d] > 1)]

    def rows(node):
        return max((node.inputs[0].shape[d] for d in row_dims(node)), default=0)

    for i, node in enumerate(sorted(gathers, key=lambda nd: -rows(nd))):
        table = node.inputs[0]
        dn = node.params["dimension_numbers"]
        for d in range(len(table.shape)):
            if d in row_dims(node):
                n.name(n.cls(table, d), "vocab" if i == 0 else "positions")
            elif node.params["slice_sizes"][d] == table.shape[d]:
                n.name(n.cls(table, d), "embed")
        if i == 0:
            idx = node.inputs[1]
            batch_dims = [d for d in range(len(node.out.shape)) if d not in dn.offset_dims]
            if not batch_dims:  # vmapped lookups: the ids' own dimensions, but the last
                batch_dims = []
                for d in range(len(idx.shape) - 1):
                    c = n.cls(idx, d)
                    if n.syms.size[c] > 1:
                        batch_dims.append(d)
                for role, d in zip(("batch", "length"), batch_dims):
                    n.name(n.cls(idx, d), role)
            for role, d in zip(("batch", "length"), batch_dims):
                n.name(n.cls(node.out, d), role)

    attention = [(s, v, _key_operand(n, s, v)) for s, v in a.attention]
    # Classes a weight carries (or a factor of one): heads can be; batch and length cannot.
    n.weight_classes = set()
    for node in a.equations:
        for v in node.inputs:
            if a.is_weight(v):
                for c in n.classes(v):
                    n.weight_classes.add(c)
                    n.weight_classes.update(syms.factors(c) or ())
    for score, value, k in attention:
        _name_activation_dims(n, score, k)
    for score, value, k in attention:
        _name_attention(a, n, score, value, k)
    # The attention output projection returns to the model width.
    for score, value, k in attention:
        for u, _ in a.forward(value.out, max_depth=12):
            if a.is_weight_matmul(u):
                w = a.weight_operand(u)
                for d in free_dims(u, w):
                    n.name(n.cls(u.inputs[w], d), "embed")
                break

    # embed: what the projections contract, if no embedding gather said it already.
    for score, value, k in attention:
        proj = a.projection_of(score.inputs[1 - k])
        if proj is not None:
            w = a.weight_operand(proj)
            for d in contracted_dims(proj, 1 - w):
                n.name(n.cls(proj.inputs[1 - w], d), "embed")
    embed = {c for c, r in n.names.items() if r == "embed"}

    # No attention and no embedding table (a bare feed-forward block): a projection whose
    # output a second projection contracts is embed -> mlp -> embed.
    if not any(r == "embed" for r in n.names.values()):
        _name_bare_ffn(a, n)
        embed = {c for c, r in n.names.items() if r == "embed"}
    # Activations entering the model (no gather): batch and length from the first activation.
    if not any(r == "batch" for r in n.names.values()):
        for v in g.inputs:
            cs = n.classes(v)
            if not a.is_weight(v) and cs and cs[-1] in embed:
                for role, c in zip(("batch", "length"), cs[:-1]):
                    n.name(c, role)

    # Weight projections out of embed: mlp (comes back to embed) or vocab (the logits).
    for node in a.equations:
        if not a.is_weight_matmul(node):
            continue
        w = a.weight_operand(node)
        if not any(n.cls(node.inputs[1 - w], d) in embed for d in contracted_dims(node, 1 - w)):
            continue
        for d in free_dims(node, w):
            c = n.cls(node.inputs[w], d)
            if n.role(c) is not None or _explained_by_products(n, c):
                continue
            if _returns_to_embed(a, n, node, c, embed):
                n.name(c, "mlp")
            elif _reaches_output(a, node.out):
                n.name(c, "vocab")

    # A cache written at the current positions: its long dimension is kv_length.
    for node in a.equations:
        if node.op == "dynamic_update_slice":
            operand, update = node.inputs[0], node.inputs[1]
            pairs = [(d, d) for d in range(len(operand.shape))]
        elif node.op.startswith("scatter"):
            operand, update = node.inputs[0], node.inputs[2]
            pairs = _scatter_pairs(node)
        else:
            continue
        for du, do in pairs:
            if update.shape[du] != operand.shape[do] and (
                    update.shape[du] == 1 or n.role(n.cls(update, du)) == "length"):
                n.name(n.cls(operand, do), "kv_length")
    # A weight table cut to the prompt length (learned positions, `wpe[:T]`): positions.
    for piece, whole in syms.pieces.items():
        if n.role(piece) == "length" and n.role(whole) is None:
            n.name(whole, "positions")
    # A projection whose output dimension is cut apart (fused Q/K/V, stacked K/V): fused.
    cut = {syms.find(w) for w in syms.pieces.values()}
    for node in a.equations:
        if a.is_weight_matmul(node):
            w = a.weight_operand(node)
            for d in free_dims(node, w):
                c = n.cls(node.inputs[w], d)
                if n.role(c) is None and (c in cut or _is_indexed_apart(a, n, node.out, c)):
                    n.name(c, "fused")
    # Whatever is left: products of named classes, and parts of named classes (RoPE halves).
    factors_of, whole_of = syms.part_index()  # naming does not unify: valid throughout
    for _ in range(3):
        for c in list(_all_classes(n)):
            if n.role(c) is not None:
                continue
            fs = factors_of.get(c)
            if fs and all(n.role(f) for f in fs):
                n.name(c, "*".join(n.role(f) for f in fs))
                continue
            whole = whole_of.get(c)
            if whole is not None and n.role(whole) is not None:
                ratio = syms.size[whole] // syms.size[c]
                exact = ratio * syms.size[c] == syms.size[whole]
                n.name(c, f"{n.role(whole)}/{ratio}" if exact else f"part({n.role(whole)})")
    # Leading dimensions of caches in a Python-loop model: one entry per layer.
    n_layers = sum(1 for score, _, _ in attention if score.graph is g)
    if n_layers > 1:
        for v in list(g.inputs) + [o for o in g.outputs if isinstance(o, Value)]:
            cs = n.classes(v)
            if not a.is_weight(v) and cs and n.role(cs[0]) is None \
                    and syms.size[cs[0]] == n_layers:
                n.name(cs[0], "layers")


def _name_bare_ffn(a: Analysis, n: _Namer) -> None:
    for node in a.equations:
        if not a.is_weight_matmul(node):
            continue
        w = a.weight_operand(node)
        hidden = {n.cls(node.inputs[w], d) for d in free_dims(node, w)}
        for u, _ in a.forward(node.out, max_depth=8):
            if u is node or not a.is_weight_matmul(u):
                continue
            uw = a.weight_operand(u)
            if not any(n.cls(u.inputs[1 - uw], d) in hidden
                       for d in contracted_dims(u, 1 - uw)):
                break
            act = node.inputs[1 - w]
            for d in contracted_dims(node, 1 - w):
                n.name(n.cls(act, d), "embed")
            for c in hidden:
                n.name(c, "mlp")
            for d in free_dims(u, uw):
                n.name(n.cls(u.inputs[uw], d), "embed")
            rest = [n.cls(act, d) for d in free_dims(node, 1 - w)]
            for role, c in zip(("batch", "length"), rest):
                n.name(c, role)
            return


def _explained_by_products(n: _Namer, c: int) -> bool:
    fs = n.syms.factors(c)
    return bool(fs and all(n.role(f) for f in fs))


def _returns_to_embed(a: Analysis, n: _Namer, node: Node, c: int, embed: set[int]) -> bool:
    """Whether a later weight matmul contracts class c and produces embed."""
    for u, _ in a.forward(node.out, max_depth=12):
        if u is node or not a.is_weight_matmul(u):
            continue
        w = a.weight_operand(u)
        if any(n.cls(u.inputs[1 - w], d) == c for d in contracted_dims(u, 1 - w)):
            return any(n.cls(u.inputs[w], d) in embed for d in free_dims(u, w))
    return False


def _reaches_output(a: Analysis, v: Value) -> bool:
    """Whether v is returned, possibly through elementwise and layout operations (logits), but
    not by way of a cache write or another matmul."""
    frontier, seen = [v], {v.id}
    for _ in range(10):
        nxt = []
        for x in frontier:
            if x.id in a.outputs:
                return True
            for u in a.users(x):
                if u.op in _NOT_TO_LOGITS or u.regions:
                    continue
                for o in u.outputs:
                    if o.id not in seen:
                        seen.add(o.id)
                        nxt.append(o)
        frontier = nxt
    return False


_NOT_TO_LOGITS = frozenset({"dynamic_update_slice", "scatter", "dot_general", "concatenate",
                            "stack", "split", "slice", "dynamic_slice", "gather"})


def _is_indexed_apart(a: Analysis, n: _Namer, v: Value, c: int) -> bool:
    for u, _ in a.forward(v, max_depth=4):
        if u.op in ("slice", "split", "dynamic_slice", "gather"):
            x = u.inputs[0]
            if isinstance(x, Value) and c in n.classes(x) and all(
                    c not in n.classes(o) for o in u.outputs):
                return True
    return False


def _all_classes(n: _Namer):
    seen = set()
    for dims in n.dims.values():
        for s in dims:
            r = n.syms.find(s)
            if r not in seen:
                seen.add(r)
                yield r


# ---------------------------------------------------------------------------------------------


def infer_axes(g: Graph) -> AxesReport:
    """Label every dimension of every value in g (and its regions); returns the report."""
    syms = Symbols()
    ctx = AxisContext(syms, {}, [])
    _unify_graph(ctx, g)
    syms.canonicalize()
    namer = _Namer(syms, ctx.dims)
    _name_roles(g, analyze(g), namer)
    syms.canonicalize()

    sizes: dict[str, int] = {}
    for c, role in sorted(namer.names.items()):
        sizes.setdefault(role, syms.size[c])
    unlabelled: list[str] = []
    _write_meta(g, namer, unlabelled)
    return AxesReport(sizes=sizes, unknown_primitives=ctx.unknown, unlabelled=unlabelled,
                      conflicts=syms.conflicts)


def _write_meta(g: Graph, n: _Namer, unlabelled: list[str]) -> None:
    for node in g.topo_order():
        axes = []
        for o in node.outputs:
            labels = []
            for d, s in enumerate(n.dims.get(o.id, [])):
                role = n.role(s)
                if role is None and o.shape[d] == 1:
                    role = "1"
                labels.append(role)
            axes.append(tuple(labels))
            if any(lbl is None for lbl in labels) and node.op == "dot_general":
                unlabelled.append(f"{node.op} -> {list(o.shape)} at {node.source or '?'}")
        node.meta["axes"] = axes
        for body in node.region_graphs():
            _write_meta(body, n, unlabelled)


def axes_of(v: Value) -> tuple[str | None, ...]:
    """The role of each dimension of v (after infer-axes)."""
    return v.producer.meta["axes"][v.index]


@register
@dataclass(frozen=True)
class InferAxes(Pass):
    """Label every dimension with a role (batch, length, embed, heads, ...)."""

    name = "infer-axes"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        graph.meta["axes"] = infer_axes(graph)
        return graph


__all__ = ["AXIS_RULES", "ROLES", "AxesReport", "InferAxes", "axes_of", "infer_axes"]
