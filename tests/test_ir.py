"""The graph IR: tracing, the interpreter as numerics oracle, mutation, verify, text and DOT."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from meshwright.ir import Graph, GraphError, InterpretError, Literal, UnsupportedError
from zoo import ZOO

import meshwright as mw


@functools.cache
def zoo_case(name):
    fn, args = ZOO[name](jax.random.PRNGKey(0))
    return fn, args, mw.trace(fn, *args)


def assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_round_trip_bit_identical(name):
    fn, args, g = zoo_case(name)
    g.verify()
    assert_tree_equal(g(*args), fn(*args))
    jitted = jax.jit(g.as_function())(*args)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(fn(*args)), rtol=1e-5, atol=1e-6)


def test_fresh_inputs_not_only_the_traced_ones():
    fn, args, g = zoo_case("einsum")
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(7), a.shape),
                          args[0])
    tokens = jax.random.randint(jax.random.PRNGKey(8), args[1].shape, 0, 50, jnp.int32)
    assert_tree_equal(g(params, tokens), fn(params, tokens))


def test_a_jitted_function_stays_bit_identical():
    fn, args = ZOO["equinox"](jax.random.PRNGKey(1))
    jf = jax.jit(fn)
    assert_tree_equal(mw.trace(jf, *args)(*args), jf(*args))


def test_pytrees_in_and_out_and_keyword_arguments():
    def f(a, *, opts):
        return {"sum": a["x"] + opts[0], "pair": (a["y"] * 2, opts[1])}

    a = {"x": jnp.ones((2, 3)), "y": jnp.arange(4.0)}
    opts = (jnp.float32(3.0), jnp.zeros((1,), jnp.int32))
    g = mw.trace(f, a, opts=opts)
    assert_tree_equal(g(a, opts=opts), f(a, opts=opts))
    assert "%a.x:f32[2,3]" in str(g) and "%opts.1:i32[1]" in str(g)


def test_text_form_is_stable_across_traces():
    fn, args = ZOO["fused_qkv"](jax.random.PRNGKey(0))
    assert str(mw.trace(fn, *args)) == str(mw.trace(fn, *args))
    fn2, args2 = ZOO["fused_qkv"](jax.random.PRNGKey(3))  # other numbers, same program
    assert str(mw.trace(fn2, *args2)) == str(mw.trace(fn, *args))


def test_text_form_golden():
    def f(x, w):
        return jax.nn.relu(x @ w) * 0.5

    g = mw.trace(f, jnp.ones((2, 3)), jnp.ones((3, 4)))
    assert str(g) == "\n".join([  # noqa: FLY002 (one golden line per list item)
        "f(%x:f32[2,3], %w:f32[3,4]) {",
        ("  %0:f32[2,4] = dot_general[dimension_numbers=(((1,), (0,)), ((), ())), "
         "preferred_element_type=float32] %x %w"),
        "  %1:f32[2,4] = max %0 0.0:f32[]",
        "  %2:f32[2,4] = mul %1 0.5:f32[]",
        "  return %2",
        "}",
    ])
    assert "test_ir.py" in g.format(source=True)


def test_scan_stays_one_region_whatever_the_number_of_layers():
    def model(n_layers):
        def f(x, ws):
            return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]

        return mw.trace(f, jnp.ones((2, 8)), jnp.ones((n_layers, 8, 8)))

    small, big = model(2), model(64)
    assert len(small.equations()) == len(big.equations()) == 1
    (scan,) = big.equations()
    assert scan.op == "scan" and len(scan.regions["jaxpr"].equations()) == 2
    assert big.summary()["ops"]["dot_general"] == 64  # executed count: per layer
    x, ws = jnp.ones((2, 8)) * 0.1, jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8)) * 0.3
    assert_tree_equal(big(x, ws), lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0])


def test_cond_and_while_are_regions():
    def f(x):
        y = lax.cond(x.sum() > 0, lambda z: z * 2, lambda z: z - 1, x)
        return lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] * 1.5), (0, y))[1]

    g = mw.trace(f, jnp.ones(4))
    ops = [n.op for n in g.equations()]
    assert "cond" in ops and "while" in ops
    for x in (jnp.ones(4), -jnp.ones(4)):
        assert_tree_equal(g(x), f(x))


def test_nested_jit_and_custom_derivatives_are_inlined():
    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))

    def f(x):
        return clip_grad(jax.jit(jax.nn.relu)(x)) + jax.nn.softplus(x)

    g = mw.trace(f, jnp.ones(3))
    ops = {n.op for n in g.equations()}
    assert not ops & {"jit", "pjit", "custom_jvp_call", "custom_vjp_call"}
    x = jnp.array([-1.0, 0.5, 2.0])
    assert_tree_equal(g(x), f(x))


def test_users_replace_all_uses_and_dead_code():
    def f(x):
        return jnp.tanh(jnp.sin(x)) + 1.0

    g = mw.trace(f, jnp.ones(3))
    sin, tanh, add = g.equations()
    assert g.users(sin.out) == [tanh] and g.users(tanh) == [add]
    assert g.replace_all_uses_with(tanh.out, sin.out) == 1  # drop the tanh
    assert g.users(tanh.out) == []
    assert g.eliminate_dead_code() == 1
    g.verify()
    x = jnp.array([0.1, 0.2, 0.3])
    np.testing.assert_array_equal(g(x), jnp.sin(x) + 1.0)


def test_insertion_and_removal():
    g = mw.trace(lambda x: x * 2.0, jnp.ones(3))
    (mul,) = g.equations()
    neg = g.add_node(lax.neg_p, [mul.out])
    g.set_outputs([neg.out])
    g.verify()
    np.testing.assert_array_equal(g(jnp.arange(3.0)), -2.0 * jnp.arange(3.0))
    with pytest.raises(GraphError, match="still used"):
        g.remove_node(mul)
    g.set_outputs([mul.out])
    g.remove_node(neg)
    g.verify()
    assert [n.op for n in g.equations()] == ["mul"]


def test_topo_order_is_deterministic_and_respects_dependencies():
    _, _, g = zoo_case("gqa_dpa")
    order = g.topo_order()
    position = {n.id: i for i, n in enumerate(order)}
    for n in order:
        for v in n.inputs:
            if not isinstance(v, Literal):
                assert position[v.producer.id] < position[n.id]
    assert [n.id for n in g.topo_order()] == [n.id for n in order]


def _broken(kind):
    g = mw.trace(lambda x: jnp.cos(jnp.sin(x)) * 3.0, jnp.ones(3))
    sin, cos, mul = g.equations()
    if kind == "wrong aval":
        cos.outputs[0].aval = jax.ShapeDtypeStruct((4,), jnp.float32)
    elif kind == "foreign value":
        other = mw.trace(lambda x: x + 1.0, jnp.ones(3))
        cos.inputs[0] = other.equations()[0].out
    elif kind == "edges out of sync":
        cos.inputs[0] = g.inputs[0]  # operand changed without updating the graph's edges
    elif kind == "cycle":
        g.set_input(sin, 0, mul.out)
    elif kind == "operand type":
        g.set_input(mul, 0, sin.out)
        g.set_input(mul, 1, jnp.zeros((2, 2)))  # not a Value
    return g


@pytest.mark.parametrize("kind", ["wrong aval", "foreign value", "edges out of sync", "cycle",
                                  "operand type"])
def test_verify_catches_a_broken_graph(kind):
    with pytest.raises(GraphError, match="failed verification"):
        _broken(kind).verify()


def test_unsupported_side_effect_names_primitive_and_line():
    def f(x):
        jax.debug.print("x = {}", x)
        return x * 2

    with pytest.raises(UnsupportedError, match=r"'debug_print'.*test_ir\.py:\d+"):
        mw.trace(f, jnp.ones(3))


def test_primitive_without_evaluation_rule_names_primitive_and_line():
    from jax.extend.core import Primitive

    mystery_p = Primitive("mystery")
    mystery_p.def_abstract_eval(lambda x: x)

    def f(x):
        return mystery_p.bind(x) + 1

    with pytest.raises(UnsupportedError, match=r"'mystery'.*test_ir\.py:\d+ \(.*\bf\)"):
        mw.trace(f, jnp.ones(3))


def test_calling_with_other_shapes_is_a_clear_error():
    g = mw.trace(lambda x: x + 1, jnp.ones((2, 3)))
    with pytest.raises(InterpretError, match=r"'x' was traced as f32\[2,3\], got float32\[4\]"):
        g(jnp.ones(4))


def test_dot_and_summary():
    _, args, g = zoo_case("scan_parallel_mqa")
    dot = g.to_dot()
    assert dot.startswith('digraph "forward" {') and dot.rstrip().endswith("}")
    assert dot.count("->") >= len(g.equations())
    s = g.summary()
    # every weight matrix is a parameter; the token ids are not
    weights = jax.tree_util.tree_leaves(args[0])
    assert s["parameter_count"] == sum(w.size for w in weights)
    assert s["argument_bytes"]["tokens"] == args[1].size * 4
    # FLOPs of a plain matmul: 2*M*K*N
    g2 = mw.trace(lambda x, w: x @ w, jnp.ones((4, 5)), jnp.ones((5, 6)))
    assert g2.summary()["flops"] == 2 * 4 * 5 * 6
    assert "dot_generals:" in g.format_summary()


def test_as_jaxpr_round_trip():
    fn, args, g = zoo_case("einsum")
    closed = g.as_jaxpr()
    flat = jax.tree_util.tree_leaves(args)
    out = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *flat)[0]
    np.testing.assert_allclose(out, fn(*args), rtol=1e-6, atol=1e-6)
    assert isinstance(g, Graph)


REFERENCE = [(name, scan, phase) for name in ("gpt2-tiny", "palm-tiny", "llama-tiny")
             for scan in (False, True) for phase in ("prefill", "decode")]


@pytest.mark.parametrize("name,scan,phase", REFERENCE)
def test_reference_models_round_trip(name, scan, phase):
    from meshwright.models import build, get_config

    model = build(get_config(name).replace(scan_layers=scan))
    args = model.example_args(phase, batch=2, length=8, key=jax.random.PRNGKey(3))
    fn = model.fn(phase)
    g = mw.trace(fn, *args)
    g.verify()
    assert_tree_equal(g(*args), fn(*args))
    got, want = jax.jit(g.as_function())(*args), jax.jit(fn)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


# Each example runs every primitive eagerly at new shapes (one small XLA compile each): few
# examples, scan-heavy, to keep the suite fast.
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt2-tiny", "palm-tiny", "llama-tiny"]),
       layers=st.integers(1, 3), heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]),
       scan=st.just(True), batch=st.integers(1, 3))
def test_round_trip_over_model_sizes(family, layers, heads, d_head, scan, batch):
    from meshwright.models import build, get_config

    base = get_config(family)
    kv = heads if family == "gpt2-tiny" else (1 if family == "palm-tiny" else heads // 2)
    cfg = base.replace(n_layers=layers, n_heads=heads, n_kv_heads=kv, d_head=d_head,
                       d_model=heads * d_head, d_ff=3 * heads * d_head, scan_layers=scan,
                       max_len=16, vocab_size=64)
    model = build(cfg)
    args = model.example_args("decode", batch=batch, key=jax.random.PRNGKey(layers))
    g = mw.trace(model.decode_step, *args)
    g.verify()
    assert_tree_equal(g(*args), model.decode_step(*args))
