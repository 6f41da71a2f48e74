"""The weights-first pass: every weight matmul takes its weight stored transposed as the left
operand; the rewritten graph, run on the converted arguments, equals the original function."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes import PassManager
from meshwright.passes.weights_first import Permute, convert_arguments, weights_first
from meshwright.runtime.engine import Engine

import meshwright as mw


def ffn(x, w_in, w_out):
    return jax.nn.relu(x @ w_in) @ w_out


def test_text_before_and_after():
    args = (jnp.ones((2, 4)), jnp.full((4, 8), 0.1), jnp.full((8, 4), 0.1))
    g = mw.trace(ffn, *args)
    assert "dot_general" in str(g)
    g = PassManager(["weights-first"], verify=True).run(g)
    assert str(g) == """\
ffn(%x:f32[2,4], %w_in:f32[8,4], %w_out:f32[4,8]) {
  %0:f32[8,2] = dot_general[dimension_numbers=(((1,), (1,)), ((), ())), preferred_element_type=float32] %w_in %x
  %1:f32[8,2] = optimization_barrier %0
  %2:f32[2,8] = transpose[permutation=(1, 0)] %1
  %3:f32[2,8] = max %2 0.0:f32[]
  %4:f32[4,2] = dot_general[dimension_numbers=(((1,), (1,)), ((), ())), preferred_element_type=float32] %w_out %3
  %5:f32[4,2] = optimization_barrier %4
  %6:f32[2,4] = transpose[permutation=(1, 0)] %5
  return %6
}"""
    assert g.meta["load_transforms"] == {1: [Permute((1, 0))], 2: [Permute((1, 0))]}
    assert g.meta["weights-first"] == ["w_in", "w_out"]
    converted = convert_arguments(g, args)
    assert converted[1].shape == (8, 4) and converted[2].shape == (4, 8)
    np.testing.assert_allclose(g(*converted), ffn(*args), rtol=1e-6)


def test_what_it_leaves_alone():
    table = jnp.full((16, 4), 0.1)

    def tied(tokens, table):  # the table is looked up and multiplied: two uses
        return table[tokens] @ table.T

    g = weights_first(mw.trace(tied, jnp.zeros(3, jnp.int32), table))
    assert g.meta["weights-first"] == [] and "optimization_barrier" not in str(g)

    def batched(x, w):  # a batch dimension (a stacked weight in a scan body): left alone
        return jnp.einsum("lbe,lef->lbf", x, w)

    g = weights_first(mw.trace(batched, jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))))
    assert g.meta["weights-first"] == []


@functools.cache
def _case(name, phase):
    model = build(get_config(name))
    return model, model.example_args(phase, batch=4, length=8, key=jax.random.PRNGKey(3))


@pytest.mark.parametrize("name", ["gpt2-tiny", "palm-tiny", "llama-tiny"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_reference_models_equal_the_original(name, phase):
    model, args = _case(name, phase)
    g = weights_first(mw.trace(model.fn(phase), *args))
    per_layer = {"gpt2-tiny": 4, "palm-tiny": 6, "llama-tiny": 7}[name]  # palm's o: reshaped
    extra = 1 if name == "llama-tiny" else 0  # llama's untied output matrix
    assert len(g.meta["weights-first"]) == per_layer * model.config.n_layers + extra
    want = jax.jit(model.fn(phase))(*args)
    got = jax.jit(g.as_function())(*convert_arguments(g, args))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_the_engine_serves_with_weights_stored_first():
    model = build(get_config("llama-tiny", max_len=32))
    params = model.init_params(jax.random.PRNGKey(0))
    engine = Engine(model, params, max_slots=2, kv_lengths=(32,), prefill_rows=(1,),
                    prefill_lengths=(32,), progress=False, weights_first=True)
    assert any("weights-first" in note for note in engine.notes)
    wq = engine.params["layers"][0]["wq"]
    assert wq.shape == params["layers"][0]["wq"].shape[::-1]  # stored (out, in)
    jax.tree.map(np.testing.assert_array_equal, engine.model_params(), params)
    plain = Engine(model, params, max_slots=2, kv_lengths=(32,), prefill_rows=(1,),
                   prefill_lengths=(32,), progress=False, weights_first=False)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    assert [r.tokens for r in engine.generate(prompts, max_tokens=6)] == \
        [r.tokens for r in plain.generate(prompts, max_tokens=6)]
