"""infer-axes' per-primitive rules: which dimensions of an equation's operands and results
are the same dimension. One place for every rule: adding a primitive is one function here,

    @axis_rule("my_prim")
    def _my_prim(ctx, node):
        ctx.link(node.out, 0, node.inputs[0], 1, "my_prim")   # out dim 0 is operand dim 1

plus its test in tests/test_axis_rules.py. A rule sees an `AxisContext` (`axis_symbols`):
`ctx.of(v)` the symbols of v's dimensions, `ctx.same(a, b)` all dimensions pairwise,
`ctx.link(v, i, w, j)` one pair (skipped when sizes differ or are 1), `ctx.syms.unify`,
`ctx.syms.set_product(whole, factors)` for a merge or split, `ctx.syms.pieces[piece] = whole`
for a slice, and `ctx.unknown` to report what it cannot follow. A primitive with no rule gets
the default: elementwise when every operand has the output's shape (or broadcasts size-1
dimensions), else reported as unknown, never guessed. Control flow (scan, cond, while) links
the operands to the bodies' inputs and recurses with `unify_graph`.
"""

from __future__ import annotations

from collections.abc import Callable

from meshwright.ir import Graph, Literal, Node
from meshwright.passes.axis_symbols import AxisContext
from meshwright.passes.base import rule_registry

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


def reshape_groups(sin, sout) -> list[tuple[list[int], list[int]]]:
    """How a reshape's dimensions correspond: [(input dims, output dims)], each a minimal run
    with equal products, size-1 dimensions (they carry no meaning) attached to no group."""
    groups, i, j = [], 0, 0
    while i < len(sin) or j < len(sout):
        if i < len(sin) and sin[i] == 1:
            i += 1
            continue
        if j < len(sout) and sout[j] == 1:
            j += 1
            continue
        if i >= len(sin) or j >= len(sout):
            break
        gi, gj, pi, pj = [i], [j], sin[i], sout[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= sin[i]
            else:
                j += 1
                gj.append(j)
                pj *= sout[j]
        groups.append(([k for k in gi if sin[k] != 1], [k for k in gj if sout[k] != 1]))
        i += 1
        j += 1
    return groups


@axis_rule("reshape")
def _reshape(ctx, node):
    x = node.inputs[0]
    din, dout = ctx.of(x), ctx.of(node.out)
    for gi, gj in reshape_groups(list(x.shape), list(node.out.shape)):
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
    for u_dim, op_dim in scatter_pairs(node):
        ctx.link(updates, u_dim, operand, op_dim, node.op)


def scatter_pairs(node: Node) -> list[tuple[int, int]]:
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
    unify_graph(ctx, body)
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
        unify_graph(ctx, branch)
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
    unify_graph(ctx, cond)
    unify_graph(ctx, body)
    for i, (outer, inner) in enumerate(zip(node.outputs, body.outputs)):
        if not isinstance(inner, Literal):
            ctx.same(outer, inner, "while carry")
            ctx.same(body.inputs[nb + i], inner, "while carry")


def unify_graph(ctx: AxisContext, g: Graph) -> None:
    """Stage 1 over g and, through the control-flow rules, its region bodies: every value's
    dimensions get symbols, and each equation's rule (the default if none) unifies them."""
    for node in g.topo_order():
        for v in node.outputs:
            ctx.of(v)
        if node.op in ("input", "constant"):
            continue
        AXIS_RULES.get(node.op, _elementwise_or_unknown)(ctx, node)


__all__ = ["AXIS_RULES", "Rule", "axis_rule", "scatter_pairs", "unify_graph"]
