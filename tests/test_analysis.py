"""passes.analysis: weights, users, matmul operands and walks, cached per graph version."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import get_config
from meshwright.passes.analysis import (
    analyze,
    contracted_dims,
    free_dims,
    value_operand,
    view_source,
)

import meshwright as mw


@functools.cache
def palm(scan):
    cfg = get_config("palm-tiny").replace(scan_layers=scan)
    return cfg, mw.trace_model(cfg, phase="decode")


def paths(g, ids):
    return sorted(v.producer.params["path"] for v in g.inputs if v.id in ids)


def dot_of(g):
    return next(n for n in g.equations() if n.op == "dot_general")


def test_x_at_w_the_right_operand_is_the_weight():
    g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((2, 3)), jnp.ones((3, 4)))
    a = analyze(g)
    x, w = g.inputs
    dot = dot_of(g)
    assert a.weight_inputs == {w.id} and not a.is_weight(x)
    assert a.is_weight_matmul(dot) and a.weight_operand(dot) == 1
    assert (free_dims(dot, 0), contracted_dims(dot, 0)) == ([0], [1])
    assert (free_dims(dot, 1), contracted_dims(dot, 1)) == ([1], [0])
    assert [u.op for u in a.users(dot.out)] == ["tanh"]
    assert a.outputs == {g.outputs[0].id}


def test_w_at_x_through_views_the_left_operand_is_the_weight():
    # the weight stored transposed and converted, times an activation: its views are weights
    g = mw.trace(lambda w, x: w.T.astype(jnp.float32) @ jnp.tanh(x),
                 jnp.ones((4, 3), jnp.bfloat16), jnp.ones((4, 2)))
    a = analyze(g)
    w, _ = g.inputs
    dot = dot_of(g)
    assert a.weight_inputs == {w.id}
    assert a.is_weight(dot.inputs[0]) and a.weight_operand(dot) == 0
    assert view_source(dot.inputs[0]) is w


def test_not_weights_integers_outer_products_and_two_activations():
    def fn(pos, freq, ids, x):
        angles = jnp.einsum("i,j->ij", pos, freq)  # RoPE's angles: contracts nothing
        counts = ids @ ids.T  # integers
        return angles, counts, x @ x.T  # one input on both sides: the right one, by rule

    g = mw.trace(fn, jnp.ones((4,)), jnp.ones((3,)), jnp.ones((2, 5), jnp.int32),
                 jnp.ones((2, 5)))
    assert analyze(g).weight_inputs == set()


def test_gather_table_and_both_operands_weights():
    def fn(table, w1, w2, ids):
        return table[ids] @ (w1 @ w2)

    g = mw.trace(fn, jnp.ones((10, 4)), jnp.ones((4, 6)), jnp.ones((6, 3)),
                 jnp.ones((2,), jnp.int32))
    a = analyze(g)
    table, w1, w2, ids = g.inputs
    assert a.weight_inputs == {table.id, w2.id}  # of two weights, the right one is counted
    inner = next(n for n in g.equations() if n.op == "dot_general" and n.inputs[0] is w1)
    assert a.weight_operand(inner) == 1  # both weights: the right one, by convention
    assert not a.is_weight(ids)


@pytest.mark.parametrize("scan", [False, True])
def test_palm_weights_are_the_matmul_and_table_parameters(scan):
    cfg, g = palm(scan)
    a = analyze(g)
    layers = ["layers.down", "layers.gate", "layers.k", "layers.o", "layers.q", "layers.up",
              "layers.v"]
    if not scan:
        layers = [p.replace("layers.", f"layers.{i}.") for i in range(cfg.n_layers)
                  for p in layers]
    assert paths(g, a.weight_inputs) == sorted(f"params.{p}" for p in ["embedding", *layers])
    # norms' scales, token ids, caches and positions are not weights
    assert not any(a.is_weight(v) for v in g.inputs if "norm" in v.producer.params["path"])
    assert len(a.attention) == (1 if scan else cfg.n_layers)
    for score, value in a.attention:
        assert not a.is_weight_matmul(score) and not a.is_weight_matmul(value)
        v = value.inputs[value_operand(value, score)]
        assert a.projection_of(v) is not None  # V comes from the value projection
        assert a.projection_of(v).op == "dot_general"


def test_scan_bodies_stacked_weights_users_and_trips():
    cfg, g = palm(True)
    a = analyze(g)
    scan = next(n for n in g.equations() if n.op == "scan")
    body = scan.regions["jaxpr"]
    n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
    xs = list(zip(scan.inputs, body.inputs))[n_consts + n_carry:]
    stacked = [(o, i) for o, i in xs if a.is_weight(o)]
    assert len(stacked) == 7 and all(a.is_weight(i) for _, i in stacked)
    assert a.layer_scans == (scan,) * 7
    carries = body.inputs[n_consts:n_consts + n_carry]
    assert not any(a.is_weight(v) for v in carries)
    # the body's equations follow the scan, and run once per layer
    k = a.equations.index(scan)
    assert a.equations[k + 1].graph is body
    assert a.trips(a.equations[k + 1]) == cfg.n_layers and a.trips(scan) == 1
    # walks from an outer operand continue into the body
    outer, inner = stacked[0]
    assert a.users(outer)[0] is scan and set(a.users(inner)) <= set(a.users(outer))
    assert any(u.graph is body for u, _ in a.forward(outer, max_depth=1))


def _orphan_the_matmul(g):
    g.set_outputs([g.inputs[0]])


def _replace(g):
    dot = dot_of(g)
    g.replace_all_uses_with(dot.out, g.add_node(jax.lax.neg_p, [g.inputs[0]]).out)


# (what, set-up before the analysis, the mutation): each way the Graph API changes a graph
MUTATIONS = [
    ("add_input", None, lambda g: g.add_input(jax.ShapeDtypeStruct((3,), jnp.float32))),
    ("add_constant", None, lambda g: g.add_constant(np.ones(3, np.float32))),
    ("add_node", None, lambda g: g.add_node(jax.lax.neg_p, [g.inputs[0]])),
    ("set_outputs", None, lambda g: g.set_outputs([g.inputs[0]])),
    ("replace_all_uses_with", None, _replace),
    ("set_input", None, lambda g: g.set_input(dot_of(g), 0, g.inputs[1])),
    ("remove_node", _orphan_the_matmul, lambda g: g.remove_node(g.users(dot_of(g).out)[0])),
    ("eliminate_dead_code", _orphan_the_matmul, lambda g: g.eliminate_dead_code()),
    ("assign inputs", None, lambda g: setattr(g, "inputs", g.inputs[::-1])),
    ("assign outputs", None, lambda g: setattr(g, "outputs", list(g.outputs))),
]


@pytest.mark.parametrize("name,setup,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_every_mutation_bumps_the_version_and_a_new_analysis_is_made(name, setup, mutate):
    g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((3, 3)), jnp.ones((3, 3)))
    if setup:
        setup(g)
    a = analyze(g)
    assert analyze(g) is a  # cached while nothing changes
    version = g.version
    mutate(g)
    assert g.version > version
    assert not a.is_current() and analyze(g) is not a and analyze(g).is_current()


def test_eliminate_dead_code_that_removes_nothing_keeps_the_analysis():
    g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((3, 3)), jnp.ones((3, 3)))
    a = analyze(g)
    assert g.eliminate_dead_code() == 0 and analyze(g) is a


def test_a_rewrite_changes_what_the_analysis_answers():
    g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((2, 3)), jnp.ones((3, 4)))
    _, w = g.inputs
    assert analyze(g).weight_inputs == {w.id}
    # the matmul now reads another weight: the analysis follows
    w2 = g.add_input(jax.ShapeDtypeStruct((3, 4), jnp.float32), "w2")
    g.set_input(dot_of(g), 1, w2)
    a = analyze(g)
    assert a.weight_inputs == {w2.id} and a.users(w) == () and not a.is_weight(w)


def test_a_change_inside_a_scan_body_is_seen():
    def fn(ws, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    g = mw.trace(fn, jnp.ones((2, 3, 3)), jnp.ones((1, 3)))
    a = analyze(g)
    body = next(n for n in g.equations() if n.op == "scan").regions["jaxpr"]
    tanh = next(n for n in body.equations() if n.op == "tanh")
    assert len(a.users(tanh.inputs[0])) == 1
    body.add_node(jax.lax.neg_p, [tanh.inputs[0]])
    b = analyze(g)
    assert b is not a and len(b.users(tanh.inputs[0])) == 2
