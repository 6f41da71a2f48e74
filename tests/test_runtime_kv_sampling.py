"""The KV cache (store and window: writes, moves, loads, write-backs, donation, sharding) and
the batched sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.runtime.kv_cache import KVCache, batch_sharding
from meshwright.runtime.request import SamplingParams
from meshwright.runtime.sampling import sample, sample_at, sample_tokens, sampling_arrays

S = 16  # max_len
LOOP = build(get_config("llama-tiny", n_layers=2, max_len=S))  # K/V per layer (B, 2, S, 8)
SCAN = build(get_config("llama-tiny", n_layers=2, max_len=S, scan_layers=True))


def rand(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rand_cache(model, rows: int, length: int, seed: int):
    """A prefill's output: random K/V for `rows` rows at `length` positions."""
    shapes = jax.tree.leaves(model.init_cache(rows, length))
    tree = jax.tree.structure(model.init_cache(rows, length))
    return tree.unflatten([jnp.asarray(rand(a.shape, seed + i)) for i, a in enumerate(shapes)])


def as_numpy(model, cache) -> np.ndarray:
    """Every array of the cache as one (arrays, slots, kv heads, positions, d_head) block."""
    axes = jax.tree.leaves(model.cache_axes())
    out = []
    for a, ax in zip(jax.tree.leaves(cache), axes):
        a = np.asarray(a)
        out += list(a) if ax.slot == 1 else [a]  # stacked layers: one block per layer
    return np.stack(out)


@pytest.mark.parametrize("model", [LOOP, SCAN], ids=["loop", "scan"])
def test_writes_moves_and_windows_follow_a_numpy_model(model):
    kv = KVCache.for_model(model, max_slots=4, max_len=S)
    ref = np.zeros_like(as_numpy(model, kv.store))  # (arrays, 4 slots, K, S, D)
    new = rand_cache(model, rows=2, length=5, seed=0)
    kv.write([3, 1], new)  # row 0 -> slot 3, row 1 -> slot 1, positions 0..4
    ref[:, [3, 1], :, :5] = as_numpy(model, new)
    np.testing.assert_array_equal(as_numpy(model, kv.store), ref)

    window = kv.window(capacity=4, length=8)  # what decode bucket (4, 8) takes
    np.testing.assert_array_equal(as_numpy(model, window), ref[:, :4, :, :8])
    assert kv.window(4, 8) is window  # unchanged: handed out again, no reload
    stepped = jax.tree.map(lambda a: a + 1.0, window)  # a "decode step" writes the window
    kv.set_window(stepped)
    ref[:, :4, :, :8] += 1.0
    kv.move(3, 0)  # writes the window back first, then moves in the store
    ref[:, 0] = ref[:, 3]
    np.testing.assert_array_equal(as_numpy(model, kv.store), ref)

    padded = rand_cache(model, rows=4, length=3, seed=7)  # a 4-row bucket, 1 row real
    kv.write([2], padded)  # rows 1..3 are padding: written nowhere
    ref[:, 2, :, :3] = as_numpy(model, padded)[:, 0]
    small = kv.window(capacity=2, length=4)  # a smaller bucket: reloaded from the store
    np.testing.assert_array_equal(as_numpy(model, small), ref[:, :2, :, :4])
    np.testing.assert_array_equal(as_numpy(model, kv.read(2))[:, None], ref[:, 2:3])
    assert kv.capacity == 2 and kv.length == 4 and kv.events == 2 and "4 slots" in repr(kv)


def test_updates_donate_the_old_buffers():
    kv = KVCache.for_model(LOOP, max_slots=4, max_len=S)
    old = jax.tree.leaves(kv.store)[0]
    kv.write([0], rand_cache(LOOP, 1, 2, seed=1))
    assert old.is_deleted()  # written in place, not copied
    old = jax.tree.leaves(kv.store)[0]
    kv.move(0, 3)
    assert old.is_deleted()
    window = kv.window(2, 8)
    kv.set_window(jax.tree.map(lambda a: a * 2, window))
    old = jax.tree.leaves(kv.store)[0]
    kv.flush()  # the window's tokens go back into the store in place
    assert old.is_deleted()


def test_cache_errors_are_clear():
    kv = KVCache.for_model(LOOP, max_slots=4, max_len=S)
    with pytest.raises(IndexError, match="slot 4 outside the 4 slots"):
        kv.write([4], rand_cache(LOOP, 1, 2, seed=2))
    with pytest.raises(ValueError, match="outside max_len=16"):
        kv.write([0], rand_cache(LOOP.__class__(LOOP.config.replace(max_len=32)), 1, 17, 2))
    with pytest.raises(ValueError, match="capacity must be in 1..4"):
        kv.window(5, 8)
    with pytest.raises(ValueError, match="length must be in 1..16"):
        kv.window(2, 17)
    with pytest.raises(RuntimeError, match="set_window without a window"):
        kv.set_window(LOOP.init_cache(2, 8))
    kv.window(2, 8)
    with pytest.raises(ValueError, match="returned a cache of shapes"):
        kv.set_window(LOOP.init_cache(2, 16))


def test_batch_sharded_windows_follow_their_capacity():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
    kv = KVCache.for_model(LOOP, max_slots=4, max_len=S, sharding=batch_sharding(mesh, "batch"))
    leaf = jax.tree.leaves(kv.store)[0]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("batch")  # 2 slots per device
    one = jax.tree.leaves(kv.window(1, 8))[0]
    assert one.sharding.spec == jax.sharding.PartitionSpec()  # 1 slot: replicated
    kv.write([3], jax.tree.map(jnp.ones_like, LOOP.init_cache(1, 4)))
    kv.move(3, 0)
    four = kv.window(4, 8)
    leaf = jax.tree.leaves(four)[0]
    assert leaf.sharding.spec == jax.sharding.PartitionSpec("batch")
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
    assert float(np.asarray(leaf)[0].sum()) == 4 * 2 * 8
    stepped = {(4, 8): jax.tree.map(  # a decode output described by shape and placement
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), four)}
    kv.warm_up([(1, 8), (4, 8)], stepped, writes=[LOOP.init_cache(1, 4)])  # changes nothing
    assert float(np.asarray(jax.tree.leaves(kv.window(4, 8))[0])[0].sum()) == 4 * 2 * 8


# ---------------------------------------------------------------------------------------------
# Sampling


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    rows = sampling_arrays([None, SamplingParams()], [0, 0])
    assert sample(logits, *rows).tolist() == [1, 0]
    assert sample_tokens(logits, [None, None], [0, 0]).tolist() == [1, 0]


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    logits = jnp.asarray(rand((16, 50), 3))
    greedy = np.argmax(np.asarray(logits), axis=-1)
    for params in (SamplingParams(temperature=2.0, top_k=1, seed=5),
                   SamplingParams(temperature=2.0, top_p=1e-6, seed=5)):
        out = sample_tokens(logits, [params] * 16, list(range(16)))
        assert out.tolist() == greedy.tolist()


def draws(logits_row, params, n=2000):
    logits = jnp.tile(jnp.asarray(logits_row, jnp.float32)[None], (n, 1))
    return np.asarray(sample(logits, *sampling_arrays([params] * n, list(range(n)))))


def test_temperature_sampling_follows_the_softmax():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    counts = np.bincount(draws(np.log(probs), SamplingParams(temperature=1.0, seed=1)),
                         minlength=4) / 2000
    np.testing.assert_allclose(counts, probs, atol=0.04)
    hot = np.bincount(draws(np.log(probs), SamplingParams(temperature=4.0, seed=1)),
                      minlength=4) / 2000
    assert hot[3] > counts[3] + 0.05  # higher temperature flattens


def test_top_k_and_top_p_cut_the_tail():
    probs = np.array([0.05, 0.4, 0.3, 0.2, 0.05])
    top_k = draws(np.log(probs), SamplingParams(temperature=1.0, top_k=2, seed=2))
    assert set(top_k.tolist()) == {1, 2}
    top_p = draws(np.log(probs), SamplingParams(temperature=1.0, top_p=0.75, seed=2))
    assert set(top_p.tolist()) == {1, 2, 3}  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.2
    both = draws(np.log(probs), SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=2))
    assert set(both.tolist()) == {1, 2}


def test_draws_depend_on_seed_and_index_only():
    logits = jnp.asarray(rand((1, 64), 4))
    p = SamplingParams(temperature=1.0, seed=11)
    alone = sample_tokens(logits, [p], [7])[0]
    batch = jnp.concatenate([jnp.asarray(rand((3, 64), 5)), logits, jnp.asarray(rand((4, 64), 6))])
    params = [SamplingParams(temperature=0.5, seed=i) for i in range(3)] + [p] + [None] * 4
    assert sample_tokens(batch, params, [0, 1, 2, 7, 0, 0, 0, 0])[3] == alone
    many = {int(sample_tokens(logits, [p], [i])[0]) for i in range(40)}
    assert len(many) > 5  # the index changes the draw
    seeds = {int(sample_tokens(logits, [SamplingParams(temperature=1.0, seed=s)], [7])[0])
             for s in range(40)}
    assert len(seeds) > 5


def test_sample_at_reads_each_rows_own_step():
    logits = jnp.asarray(rand((2, 6, 30), 7))
    last = np.array([2, 5], np.int32)
    want = [int(np.argmax(logits[0, 2])), int(np.argmax(logits[1, 5]))]
    assert sample_tokens(logits, [None, None], [0, 0], last=last).tolist() == want
    rows = sampling_arrays([SamplingParams(temperature=1.0, top_k=1)] * 2, [0, 0])
    assert sample_at(logits, last, *rows).tolist() == want
