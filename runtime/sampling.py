"""Token sampling for a batch of rows, each with its own settings. Jittable.

    >>> import jax.numpy as jnp
    >>> from meshwright.runtime.request import SamplingParams
    >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    >>> rows = sampling_arrays([SamplingParams(), SamplingParams(temperature=1.0, top_k=1,
    ...                         seed=3)], indices=[0, 5])
    >>> sample(logits, *rows).tolist()          # greedy; top-k 1 is greedy too
    [1, 0]

Per row: temperature 0 -> argmax (ties: the lowest id). Otherwise the logits are divided by
the temperature, cut to the top_k most likely (0: no cut) and then to the smallest prefix of
the sorted distribution whose probability reaches top_p (the most likely token always stays),
and one token is drawn with the key fold_in(PRNGKey(seed), index), where index is the
position of the token in the request's output. So a request samples the same tokens whatever
batch it runs in: its draw depends on its own logits, seed and index only.

Stop tokens are checked by the scheduler on the host (it reads every sampled token anyway to
stream it), see `Scheduler.update`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.runtime.request import GREEDY, SamplingParams


class SamplingArrays(NamedTuple):
    """Per-row sampling settings, each (B,)."""

    temperature: np.ndarray  # float32; 0 = greedy
    top_k: np.ndarray  # int32; 0 = no limit
    top_p: np.ndarray  # float32 in (0, 1]
    seed: np.ndarray  # uint32
    index: np.ndarray  # int32: which output token of its request this row samples


def sampling_arrays(params: Sequence[SamplingParams | None],
                    indices: Sequence[int]) -> SamplingArrays:
    """Stack per-row settings (None: an idle row, sampled greedily and ignored)."""
    rows = [p or GREEDY for p in params]
    return SamplingArrays(
        temperature=np.array([p.temperature for p in rows], np.float32),
        top_k=np.array([p.top_k for p in rows], np.int32),
        top_p=np.array([p.top_p for p in rows], np.float32),
        seed=np.array([p.seed for p in rows], np.uint32),
        index=np.asarray(indices, np.int32))


def _sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
            seed: jax.Array, index: jax.Array) -> jax.Array:
    """logits (B, V) -> token ids (B,) int32."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)  # (B,)
    order = jnp.argsort(-logits, axis=-1, stable=True)  # (B, V): most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)  # (B, V) descending
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]  # (B, 1)
    scaled = ranked / t  # (B, V)
    rank = jnp.arange(V)[None, :]  # (1, V)
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])  # (B, V)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)  # (B, V)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # (B, V): probability of better tokens
    keep = keep & ((mass_before < top_p[:, None]) | (rank == 0))
    masked = jnp.where(keep, scaled, -jnp.inf)  # (B, V)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed, index)
    choice = jax.vmap(jax.random.categorical)(keys, masked)  # (B,) rank of the drawn token
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]  # (B,)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


sample = jax.jit(_sample)
sample.__doc__ = """Sample one token per row of logits (B, V) with per-row settings -> (B,) int32.

`sample(logits, *sampling_arrays(params, indices))`; see the module docstring."""


@jax.jit
def sample_at(logits: jax.Array, last: jax.Array, temperature: jax.Array, top_k: jax.Array,
              top_p: jax.Array, seed: jax.Array, index: jax.Array) -> jax.Array:
    """`sample` on logits (B, T, V) at time step last[b] of each row (prefill: the prompt's
    last real token when the prompt is padded on the right)."""
    rows = logits[jnp.arange(logits.shape[0]), last]  # (B, V)
    return _sample(rows, temperature, top_k, top_p, seed, index)


@jax.jit
def greedy(logits: jax.Array) -> jax.Array:
    """argmax of logits (B, V) -> (B,) int32: `sample` when every row is greedy, without
    its sort and random draws (~10x cheaper on CPU)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.jit
def greedy_at(logits: jax.Array, last: jax.Array) -> jax.Array:
    """`greedy` on logits (B, T, V) at time step last[b] of each row."""
    return jnp.argmax(logits[jnp.arange(logits.shape[0]), last], axis=-1).astype(jnp.int32)


def sample_tokens(logits: jax.Array, params: Sequence[SamplingParams | None],
                  indices: Sequence[int], last: Sequence[int] | None = None) -> np.ndarray:
    """Sample every row on the host's behalf -> numpy (B,) int32; `params[b]` None is an idle
    row. Logits (B, V), or (B, T, V) read at step last[b]. Uses `greedy` when no row samples."""
    if all(p is None or p.greedy for p in params):
        out = greedy(logits) if last is None else greedy_at(logits, np.asarray(last, np.int32))
    else:
        arrays = sampling_arrays(params, indices)
        out = (sample(logits, *arrays) if last is None
               else sample_at(logits, np.asarray(last, np.int32), *arrays))
    return np.asarray(out)
