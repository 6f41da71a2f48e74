"""The KV cache (writes, moves, resizes, donation, sharding) and the batched sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.runtime.kv_cache import KVCache, batch_sharding
from meshwright.runtime.request import SamplingParams
from meshwright.runtime.sampling import sample, sample_at, sample_tokens, sampling_arrays

L, S, K, D = 2, 16, 2, 4  # layers, max_len, kv heads, head dim


def rand(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_update_move_resize_follow_a_numpy_model():
    kv = KVCache(L, max_slots=8, max_len=S, n_kv_heads=K, d_head=D, capacity=2)
    ref = np.zeros((L, 2, S, K, D), np.float32)
    k5, v5 = rand((L, 5, K, D), 0), rand((L, 5, K, D), 1)
    kv.update(1, 3, jnp.asarray(k5), jnp.asarray(v5))
    ref[:, 1, 3:8] = k5
    np.testing.assert_array_equal(np.asarray(kv.k), ref)
    np.testing.assert_array_equal(np.asarray(kv.v[:, 1, 3:8]), v5)

    kv.resize(8)  # grow: new slots are zero, old ones kept
    ref = np.concatenate([ref, np.zeros((L, 6, S, K, D), np.float32)], axis=1)
    np.testing.assert_array_equal(np.asarray(kv.k), ref)
    row = rand((L, 1, S, K, D), 2)  # (L, 1, T, K, D) is accepted too (a prefill cache)
    kv.update(6, 0, jnp.asarray(row), jnp.asarray(row))
    ref[:, 6] = row[:, 0]
    kv.move(6, 0)
    ref[:, 0] = ref[:, 6]
    kv.resize(4)  # shrink: slots >= 4 are dropped
    np.testing.assert_array_equal(np.asarray(kv.k), ref[:, :4])
    k0, _ = kv.read(0)
    np.testing.assert_array_equal(np.asarray(k0), row[:, 0])
    assert kv.capacity == 4 and kv.bucket_for(3) == 4 and "4/8 slots" in repr(kv)


def test_updates_donate_the_old_buffers():
    kv = KVCache(L, max_slots=4, max_len=S, n_kv_heads=K, d_head=D, capacity=4)
    old = kv.k
    kv.update(0, 0, jnp.ones((L, 2, K, D)), jnp.ones((L, 2, K, D)))
    assert old.is_deleted()  # written in place, not copied
    old = kv.v
    kv.move(0, 3)
    assert old.is_deleted()


def test_cache_errors_are_clear():
    kv = KVCache(L, max_slots=4, max_len=S, n_kv_heads=K, d_head=D, capacity=2)
    with pytest.raises(IndexError, match="slot 2 outside the 2 slots"):
        kv.update(2, 0, jnp.ones((L, 1, K, D)), jnp.ones((L, 1, K, D)))
    with pytest.raises(ValueError, match="outside max_len"):
        kv.update(0, S - 1, jnp.ones((L, 2, K, D)), jnp.ones((L, 2, K, D)))
    with pytest.raises(ValueError, match="capacity must be in 1..4"):
        kv.resize(5)
    with pytest.raises(ValueError, match="cache shape"):
        kv.set({"k": jnp.zeros((L, 3, S, K, D)), "v": jnp.zeros((L, 3, S, K, D))})


def test_batch_sharded_cache_follows_its_capacity():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
    kv = KVCache(L, max_slots=4, max_len=S, n_kv_heads=K, d_head=D,
                 sharding=batch_sharding(mesh, "batch"), capacity=1)
    assert kv.k.sharding.spec == jax.sharding.PartitionSpec()  # 1 slot: replicated
    kv.resize(4)
    assert kv.k.sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    assert {s.data.shape[1] for s in kv.k.addressable_shards} == {2}  # 2 slots per device
    kv.update(3, 0, jnp.ones((L, 2, K, D)), jnp.ones((L, 2, K, D)))
    kv.move(3, 0)
    assert float(kv.k[:, 0].sum()) == L * 2 * K * D
    assert kv.k.sharding.spec == jax.sharding.PartitionSpec(None, "batch")


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
