"""quantize-int8: int8 weights with per-output-channel scales on the CPU fast path.

The stated bound (derived in docs/passes/quantize-int8.md): over random prompts, every logit
of the quantized program is within 0.15 x std(float32 logits) of float32, and the mean
absolute error is within 0.02 x std. Top-1 agreement is >= 99% on models whose logits mean
something (a briefly trained model); randomly initialised tiny models have nearly flat logits,
where a few percent of positions are near-ties that any int8 rounding may flip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from meshwright.ir.emit import emit_function
from meshwright.models import build, get_config
from meshwright.models.cache import KVCacheShape
from meshwright.passes import PassManager, get_pass
from meshwright.passes.base import PassContext
from meshwright.passes.quantize import (
    Int8Weight,
    contracted_last,
    int8_dot_general,
    quantize_params,
    quantize_weight,
)

import meshwright as mw

FAMILIES = ("palm-tiny", "gpt2-tiny", "llama-tiny")
MAX_REL, MEAN_REL = 0.15, 0.02  # |logit error| / std(float32 logits): everywhere, on average
POSITIONS = 256
PROJECTIONS = {"palm-tiny": 7, "gpt2-tiny": 4, "llama-tiny": 7}  # weight matrices per layer


@functools.cache
def stacked_params(name):
    return build(get_config(name).replace(scan_layers=True)).init_params(jax.random.PRNGKey(0))


def example(name, scan, phase, params=None):
    """Arguments with one call's worth of positions: decode 256 rows, prefill 16 x 16.
    Built with numpy (model.example_args would compile an initialiser per variant)."""
    model = build(get_config(name).replace(scan_layers=scan))
    cfg = model.config
    rng = np.random.default_rng(0)
    params = stacked_params(name) if params is None else params
    if not scan:  # the same numbers, one dict per layer (as models.common.layers_for)
        params = dict(params, layers=[jax.tree.map(lambda a, i=i: a[i], params["layers"])
                                      for i in range(cfg.n_layers)])
    batch = 256 if phase == "decode" else 16
    shapes = KVCacheShape.of(cfg).shapes(batch)
    if phase == "prefill":
        tokens = rng.integers(0, cfg.vocab_size, (batch, 16), dtype=np.int32)
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
        return model, (params, tokens, zeros)
    tokens = rng.integers(0, cfg.vocab_size, (batch,), dtype=np.int32)
    cache = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    positions = rng.integers(0, cfg.max_len, (batch,), dtype=np.int32)
    return model, (params, tokens, cache, positions)


def run_pass(model, phase, args, positions=POSITIONS, **options):
    g = mw.trace(model.fn(phase), *args)
    ctx = PassContext(example_args=(args, {}))
    pm = PassManager(["infer-axes", "find-blocks",
                      get_pass("quantize-int8", positions=positions, **options)], verify=True)
    return pm.run(g, ctx)


@functools.cache
def quantized(name, scan, phase):
    model, args = example(name, scan, phase)
    return model, args, run_pass(model, phase, args)


@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_within_the_stated_bound(name, scan, phase):
    model, _, g = quantized(name, scan, phase)
    report = g.meta["quantize-int8"]
    layers = 1 if scan else model.config.n_layers
    # every projection of every attention and FFN block, nothing left in float
    assert len(report.weights) == report.int8_dots == PROJECTIONS[name] * layers
    assert not report.skipped
    assert all(w.dots == 1 and w.dequantized_uses == 0 for w in report.weights)
    if scan:  # stacked weights: the layers axis is kept, scales per layer and output channel
        assert all(w.layers_axis == 0 and 0 not in w.reduce_axes for w in report.weights)
    n = report.numerics
    assert n.positions >= POSITIONS
    assert n.max_abs_error <= MAX_REL * n.logit_std, n
    assert n.mean_abs_error <= MEAN_REL * n.logit_std, n
    # random weights: flat logits; flips only where the float top-2 gap is within the error
    assert n.top1_agreement >= 0.97 and 1 - n.top1_agreement <= n.near_ties, n


def test_loop_and_scan_quantize_alike():
    """The same weights as a Python loop or a scan give the same int8 program numerics."""
    loop = quantized("llama-tiny", False, "decode")[2].meta["quantize-int8"].numerics
    scan = quantized("llama-tiny", True, "decode")[2].meta["quantize-int8"].numerics
    assert loop.max_abs_error == pytest.approx(scan.max_abs_error, rel=1e-3)
    assert loop.top1_agreement == scan.top1_agreement


def _markov(vocab, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 2))
    while True:
        t = np.empty((batch, length + 1), np.int32)
        t[:, 0] = rng.integers(0, vocab, batch)
        for i in range(length):
            t[:, i + 1] = successors[t[:, i], (rng.random(batch) < 0.2).astype(int)]
        yield t[:, :-1], t[:, 1:]


def _train(model, steps=60, lr=1e-2):
    """Adam on a Markov source with two likely successors per token (as benchmarks/int8.py)."""
    params = stacked_params(model.config.name)

    def loss(p, x, y):
        logp = jax.nn.log_softmax(model.logits(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    @jax.jit
    def step(p, m, v, i, x, y):
        g = jax.grad(loss)(p, x, y)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        c1, c2 = 1 - 0.9 ** i, 1 - 0.999 ** i
        return jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + 1e-8),
                            p, m, v), m, v

    m = v = jax.tree.map(jnp.zeros_like, params)
    data = _markov(model.config.vocab_size, 16, 32)
    for i in range(1, steps + 1):
        params, m, v = step(params, m, v, i, *next(data))
    return params


def test_top1_agreement_on_a_trained_model():
    name = "llama-tiny"  # the family whose random-init logits are flattest
    model = build(get_config(name).replace(scan_layers=True))
    trained = _train(model)
    for phase in ("decode", "prefill"):
        _, args = example(name, True, phase, params=trained)
        if phase == "decode":  # a cache the model wrote itself (from text of its source),
            #                    not random K/V: every row continues its own prompt
            prompts, _ = next(_markov(model.config.vocab_size, 256, 16))
            _, cache = jax.jit(model.prefill)(trained, prompts, model.init_cache(256))
            args = (args[0], args[1], cache, np.full(256, 16, np.int32))
        n = run_pass(model, phase, args, positions=512).meta["quantize-int8"].numerics
        assert n.top1_agreement >= 0.99, n
        assert n.max_abs_error <= MAX_REL * n.logit_std, n


@pytest.mark.parametrize("name", FAMILIES)
def test_unembedding_option(name):
    """Tied tables (palm, gpt2) keep a cheap embedding lookup: int8 rows times their scales."""
    model, args = example(name, True, "decode")
    g = run_pass(model, "decode", args, unembedding=True)
    report = g.meta["quantize-int8"]
    assert report.int8_dots == PROJECTIONS[name] + 1
    table = [w for w in report.weights if w.path in ("params.embedding", "params.wte",
                                                     "params.output")]
    assert len(table) == 1 and table[0].dequantized_uses == 0
    n = report.numerics
    assert n.max_abs_error <= MAX_REL * n.logit_std and n.mean_abs_error <= MEAN_REL * \
        n.logit_std, n


def test_interpreter_and_jit_run_the_quantized_graph():
    model, args = example("palm-tiny", True, "decode")
    g = run_pass(model, "decode", args, positions=0)
    params_q = quantize_params(g, args[0])
    logits, cache = g(params_q, *args[1:])  # the interpreter
    logits_jit, cache_jit = jax.jit(g.as_function())(params_q, *args[1:])
    np.testing.assert_allclose(logits, logits_jit, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), cache,
                 cache_jit)
    reference, _ = jax.jit(model.decode_step)(*args)
    assert float(jnp.abs(logits - reference).max()) <= MAX_REL * float(reference.std())


def _per_device_bytes(tree, mesh):
    """Bytes one device holds when every array is split over its last dimension."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        spec = PartitionSpec(*([None] * (x.ndim - 1) + ["d"]))
        placed = jax.device_put(x, NamedSharding(mesh, spec))
        total += placed.addressable_shards[0].data.nbytes
    return total


def test_weight_bytes_per_device():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    _, _, g = quantized("palm-tiny", True, "decode")
    report = g.meta["quantize-int8"]
    params = stacked_params("palm-tiny")
    params_q = quantize_params(g, params)
    quantized_leaves = [w.path.removeprefix("params.") for w in report.weights]

    def pick(tree, part=None):
        layer = tree["layers"]
        out = [layer[k.split(".")[1]] for k in quantized_leaves]
        return out if part is None else [getattr(w, part) for w in out]

    f32 = _per_device_bytes(pick(params), mesh)
    bf16 = _per_device_bytes([np.asarray(w).astype(jnp.bfloat16) for w in pick(params)], mesh)
    int8 = _per_device_bytes(pick(params_q, "values"), mesh)
    scales = _per_device_bytes(pick(params_q, "scale"), mesh)
    assert all(isinstance(w, Int8Weight) for w in pick(params_q))
    assert f32 == 4 * int8 and bf16 == 2 * int8
    assert scales * 16 <= int8  # one float32 per output channel: 4 / (>= 64 contracted) bytes
    # and what the report counts for the whole arrays
    b = report.weight_bytes()
    assert b["float"] == 4 * b["int8"] and b["int8"] == sum(
        x.nbytes for x in pick(params_q, "values"))
    assert b["scales"] == sum(x.nbytes for x in pick(params_q, "scale"))


GOLDEN_FFN = """\
ffn(%x:f32[1,8]{1,embed}, %w_in.values:i8[32,8]{mlp,embed}, %w_in.scale:f32[1,32]{1,mlp}, \
%w_out.values:i8[8,32]{embed,mlp}, %w_out.scale:f32[1,8]{1,embed}) {
  %0:f32[1,8] = abs %x
  %1:f32[1] = reduce_max[axes=(1,)] %0
  %2:f32[1,1] = broadcast_in_dim[broadcast_dimensions=(0,), shape=(1, 1)] %1
  %3:f32[1,1] = div %2 127.0:f32[]
  %4:f32[1,1] = max %3 1.1754943508222875e-38:f32[]
  %5:f32[1,8] = div %x %4
  %6:f32[1,8] = round[rounding_method=<RoundingMethod.TO_NEAREST_EVEN: 1>] %5
  %7:f32[1,8] = clamp -127.0:f32[] %6 127.0:f32[]
  %8:i8[1,8]{1,embed} = convert_element_type[new_dtype=int8, weak_type=False] %7
  %9:i8[2,8] = pad[padding_config=((0, 1, 0), (0, 0, 0))] %8 0:i8[]
  %10:i32[2,32] = dot_general[dimension_numbers=(((1,), (1,)), ((), ())), \
preferred_element_type=int32] %9 %w_in.values  # block=ffn.0; int8
  %11:i32[1,32] = slice[limit_indices=(1, 32), start_indices=(0, 0), strides=(1, 1)] %10
  %12:f32[32] = reshape[new_sizes=(32,)] %w_in.scale
  %13:f32[1,32] = convert_element_type[new_dtype=float32, weak_type=False] %11
  %14:f32[1,32] = mul %13 %3
  %15:f32[1,32] = broadcast_in_dim[broadcast_dimensions=(1,), shape=(1, 32)] %12
  %16:f32[1,32]{1,mlp} = mul %14 %15
  %17:f32[1,32]{1,mlp} = max %16 0.0:f32[]
"""


def test_graph_text_shows_int8_weights_and_int32_matmuls():
    def ffn(x, w_in, w_out):
        return x + jax.nn.relu(x @ w_in) @ w_out

    args = (jnp.ones((1, 8)), jnp.full((8, 32), 0.1), jnp.full((32, 8), 0.1))
    g = PassManager(["infer-axes", "find-blocks", "quantize-int8"], verify=True).run(
        mw.trace(ffn, *args))
    text = str(g)
    assert text.startswith(GOLDEN_FFN), text
    assert text.count("preferred_element_type=int32") == 2
    assert "preferred_element_type=float32" not in text
    q = quantize_params(g, args[1], argnum=1), quantize_params(g, args[2], argnum=2)
    np.testing.assert_allclose(g(args[0], *q), ffn(*args), rtol=0.02)


def test_reference_model_text_after_the_pass():
    _, _, g = quantized("gpt2-tiny", True, "prefill")
    text = str(g)
    assert "%params.layers.attn.c_attn.w.values:i8[2,64,192]{layers,embed,fused}" in text
    assert "%params.layers.attn.c_attn.w.scale:f32[2,1,192]{layers,1,fused}" in text
    assert text.count("preferred_element_type=int32") == 4
    assert "i32[16,16,192]" in text  # the fused QKV projection accumulates in int32


@pytest.mark.parametrize("layout", [None, contracted_last(3, (0, 1))])
@pytest.mark.parametrize("weight_side", [0, 1])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_dot_general_matches_float(weight_side, rows, layout):
    """Per-token activations x per-channel weights; two contracted dims; one row is padded;
    int8 values stored as they are or with the contracted dims last."""
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (rows, 4, 16))  # contract (1, 2) of x with (0, 1) of w
    w = jax.random.normal(kw, (4, 16, 24)) * 0.05
    q = quantize_weight(w, axes=(0, 1), layout=layout)
    if weight_side == 1:
        dn = (((1, 2), (0, 1)), ((), ()))
        got = int8_dot_general(x, q, dn, 1, jnp.float32)
        want = jax.lax.dot_general(x, w, dn)
    else:
        dn = (((0, 1), (1, 2)), ((), ()))
        got = int8_dot_general(x, q, dn, 0, jnp.float32)
        want = jax.lax.dot_general(w, x, dn)
    assert got.shape == want.shape
    assert float(jnp.abs(got - want).max()) <= 0.03 * float(jnp.abs(want).max())


def test_quantize_weight_is_per_output_channel():
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 64, 48))  # (layers, in, out)
    q = quantize_weight(w, axes=(1,))
    assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 1, 48)
    assert int(jnp.abs(q.values).max()) == 127
    assert bool(jnp.all(jnp.abs(q.dequantize() - w) <= q.scale / 2 + 1e-7))
    t = quantize_weight(w, axes=(1,), layout=contracted_last(3, (1,)))
    assert t.values.shape == (3, 48, 64) and t.layout == (0, 2, 1)  # layers axis stays first
    np.testing.assert_array_equal(t.dequantize(), q.dequantize())
    spec = quantize_weight(jax.ShapeDtypeStruct((3, 64, 48), jnp.bfloat16), axes=(1,))
    assert spec.values.dtype == jnp.int8 and spec.scale.shape == (3, 1, 48)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_contracted_last_layout_computes_the_same(name):
    """Storing the int8 values with the contracted dims last only renames dimensions."""
    model, args = example(name, True, "decode")
    outs = []
    for layout in ("as-is", "contracted-last"):
        g = run_pass(model, "decode", args, positions=0, unembedding=True, layout=layout)
        outs.append(jax.jit(g.as_function())(quantize_params(g, args[0]), *args[1:])[0])
        layouts = [w.layout for w in g.meta["quantize-int8"].weights]
    assert (0, 2, 1) in layouts  # a stacked (layers, in, out) weight stored (layers, out, in)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_emit_function_inserts_a_jnp_function():
    g = mw.trace(lambda x, w: x @ w, jnp.ones((2, 3)), jnp.ones((3, 4)))
    (dot,) = g.equations()
    (y,) = emit_function(g, lambda a, b: jnp.tanh(a @ b) * 2.0, dot.inputs, source="here")
    g.replace_all_uses_with(dot.out, y)
    g.remove_node(dot)
    g.verify()
    x, w = jnp.arange(6.0).reshape(2, 3), jnp.ones((3, 4))
    np.testing.assert_allclose(g(x, w), jnp.tanh(x @ w) * 2.0, rtol=1e-6)
    assert {n.source for n in g.equations()} == {"here"}


def test_errors_are_clear():
    g = mw.trace(lambda x, w: x @ w, jnp.ones((2, 3)), jnp.ones((3, 4)))
    with pytest.raises(Exception, match="run 'infer-axes' and 'find-blocks' first"):
        PassManager(["quantize-int8"]).run(g)
    g = quantized("palm-tiny", True, "decode")[2]
    with pytest.raises(ValueError, match="params are structured as"):
        quantize_params(g, {"not": "the params"})
    with pytest.raises(Exception, match="has already been through 'quantize-int8'"):
        PassManager(["quantize-int8"]).run(g)
    with pytest.raises(TypeError, match="has not been through the 'quantize-int8' pass"):
        quantize_params(mw.trace(lambda x: x, jnp.ones(2)), jnp.ones(2))


def test_sharding_annotations_follow_the_weights():
    """After `annotate`, the int8 values keep the weight's spec (in their layout), the scales
    drop the contracted dims from it, and `lower` sees the new inputs in `in_specs` and
    `weight_values`."""
    from meshwright.passes.sharding import Spec

    def ffn(x, w_in, w_out):
        return jax.nn.relu(x @ w_in) @ w_out

    args = (jnp.ones((4, 8)), jnp.full((8, 32), 0.1), jnp.full((32, 8), 0.1))
    g = PassManager(["infer-axes", "find-blocks"]).run(mw.trace(ffn, *args))
    specs = [Spec(((), ("z",))), Spec((("x",), ("y", "z"))), Spec((("y", "z"), ("x",)))]
    for v, spec in zip(g.inputs, specs):
        v.producer.meta["target"] = [spec]
    g.meta["in_specs"] = list(specs)
    g.meta["weight_values"] = {v.id for v in g.inputs[1:]}
    g = PassManager(["quantize-int8"], verify=True).run(g)
    # the int8 values are stored contracted dims last: their spec is permuted alike
    assert g.meta["in_specs"] == [specs[0], Spec((("y", "z"), ("x",))), Spec(((), ("y", "z"))),
                                  Spec((("x",), ("y", "z"))), Spec(((), ("x",)))]
    assert {v.id for v in g.inputs if v.dtype == np.int8} <= g.meta["weight_values"]
