"""infer-axes' per-primitive rules (passes/axis_rules.py), one primitive at a time: which
dimensions of an equation's operands and results each rule makes one symbol. A new rule
comes with a case here."""

import jax
import jax.numpy as jnp
from meshwright.passes.axis_rules import unify_graph
from meshwright.passes.axis_symbols import AxisContext, Symbols

import meshwright as mw


def unified(fn, *shapes):
    """The traced equation of `fn` (the last one) and `same(v, i, w, j)`: whether dimension i
    of v and dimension j of w are one symbol after the rules ran; `ctx` for the rest."""
    g = mw.trace(fn, *(jnp.ones(s) for s in shapes))
    ctx = AxisContext(Symbols(), {}, [])
    unify_graph(ctx, g)
    node = g.equations()[-1]

    def same(v, i, w, j):
        return ctx.syms.find(ctx.of(v)[i]) == ctx.syms.find(ctx.of(w)[j])

    return node, same, ctx


def test_dot_general_contracting_batch_and_free_dimensions():
    node, same, _ = unified(lambda a, b: jnp.einsum("bik,bkj->bij", a, b), (2, 3, 4), (2, 4, 5))
    a, b = node.inputs
    out = node.out
    assert same(a, 2, b, 1)  # contracted
    assert same(a, 0, b, 0) and same(a, 0, out, 0)  # batch
    assert same(a, 1, out, 1) and same(b, 2, out, 2)  # free
    assert not same(a, 1, b, 2)


def test_transpose_follows_the_permutation():
    node, same, _ = unified(lambda x: jnp.transpose(x, (2, 0, 1)), (2, 3, 4))
    (x,) = node.inputs
    assert same(node.out, 0, x, 2) and same(node.out, 1, x, 0) and same(node.out, 2, x, 1)


def test_reshape_records_a_merge_as_a_product_of_its_factors():
    node, same, ctx = unified(lambda x: x.reshape(2, 12), (2, 3, 4))
    (x,) = node.inputs
    assert same(node.out, 0, x, 0)
    whole = ctx.of(node.out)[1]
    assert ctx.syms.factors(whole) == (ctx.syms.find(ctx.of(x)[1]), ctx.syms.find(ctx.of(x)[2]))


def test_slice_and_concatenate_record_pieces_of_a_whole():
    node, same, ctx = unified(lambda x: jnp.concatenate([x[:, :2], x[:, 2:]], axis=1), (3, 4))
    assert same(node.out, 0, node.inputs[0], 0)
    whole = ctx.syms.find(ctx.of(node.out)[1])
    pieces = {ctx.syms.find(p) for p, w in ctx.syms.pieces.items() if ctx.syms.find(w) == whole}
    assert {ctx.syms.find(ctx.of(v)[1]) for v in node.inputs} <= pieces


def test_reduce_keeps_the_dimensions_not_reduced():
    node, same, _ = unified(lambda x: jnp.sum(x, axis=1), (2, 3, 4))
    (x,) = node.inputs
    assert same(node.out, 0, x, 0) and same(node.out, 1, x, 2)


def test_scan_links_stacked_operands_to_the_body_and_the_layers():
    def fn(ws, h):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, ws)[0]

    node, same, ctx = unified(fn, (5, 3, 3), (1, 3))
    h, ws = node.inputs  # scan operands: consts, carries, then the scanned ones
    body = node.regions["jaxpr"]
    w_in = body.inputs[1]
    assert same(ws, 1, w_in, 0) and same(ws, 2, w_in, 1)  # the per-layer slice
    assert ctx.syms.find(ctx.of(ws)[0]) == ctx.syms.find(node.meta["scan_axis"])
    assert same(node.outputs[0], 1, h, 1)  # the carry
