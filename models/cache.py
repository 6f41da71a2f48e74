"""The KV cache of the reference models: its shape, its axes, its size, and its writes. One
owner: `KVCacheShape` is the one description of the cache (the models build it, the engine
resizes and moves it through its axes, the cost model and the planner count its bytes).

    >>> from meshwright.models import get_config
    >>> cfg = get_config("llama-tiny")                       # 2 layers, 2 kv heads, d_head 8
    >>> kv = KVCacheShape.of(cfg)
    >>> kv.layer_shape(batch=4, length=16)                   # (batch, kv heads, positions, d_head)
    (4, 2, 16, 8)
    >>> cache = kv.zeros(batch=4, length=16)
    >>> len(cache["k"]), cache["k"][0].shape                 # one array per layer
    (2, (4, 2, 16, 8))
    >>> kv.axes()["k"][0]
    CacheAxes(slot=0, length=2)
    >>> kv.bytes_per_token(4)                                # K and V, every layer, float32
    256

Layout. Each layer's K and V are (batch, n_kv_heads, length, d_head):

- the kv heads before the positions, so that attention reads one head's keys as a contiguous
  (length, d_head) block and XLA's batched matmul takes the array as it is stored (no
  transpose is materialised, and grouped-query heads share their kv head by grouping the
  query heads, never by repeating K/V);
- one array per layer (`{"k": [layer 0, layer 1, ...], "v": [...]}`), so that no step slices
  a layer out of a stacked array: XLA copies every slice that feeds a matmul. With
  `config.scan_layers` the layers are stacked, (n_layers, batch, n_kv_heads, length, d_head),
  because `jax.lax.scan` takes them so;
- `length` positions, which need not be `max_len`: the engine keeps the arrays at the smallest
  length bucket that holds its longest live sequence, so a decode step reads the live prefix
  only. The model derives every shape from the arrays it is given.

`KVCacheShape.axes` says, for every leaf, which axis holds the sequences (slots) and which the
positions: the serving engine resizes, moves and writes caches through it and nothing else.
A model served from functions (`models.functions`) brings its own cache tree; the engine
reads its shapes and axes off that model the same way (`model.cache_shapes`,
`model.cache_axes`).

Writes are in place when the step donates the cache: decode writes one position per row
(`write_token`, a scatter with the row as a batching dimension), prefill the first T positions
(`write_prompt`, a dynamic_update_slice at 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from meshwright.models.config import TransformerConfig

NAMES = ("k", "v")


@dataclass(frozen=True)
class CacheAxes:
    """Where one cache array keeps its sequences and its positions."""

    slot: int  # the batch axis: one sequence (one serving slot) per index
    length: int  # the positions (the kv_length axis)


@dataclass(frozen=True)
class KVCacheShape:
    """The KV cache of a `TransformerConfig`: the arrays, their shapes, dtype and axes, and
    the bytes a token takes. `length` (positions) defaults to the config's max_len."""

    n_layers: int
    n_kv_heads: int
    d_head: int
    max_len: int
    dtype: str = "float32"
    stacked: bool = False  # the layers stacked in one array (config.scan_layers)

    @classmethod
    def of(cls, config: TransformerConfig) -> KVCacheShape:
        return cls(config.n_layers, config.n_kv_heads, config.d_head, config.max_len,
                   config.dtype, config.scan_layers)

    def layer_shape(self, batch: int, length: int | None = None) -> tuple[int, ...]:
        """(batch, n_kv_heads, length, d_head): one layer's K (or V)."""
        return (batch, self.n_kv_heads, length or self.max_len, self.d_head)

    def shapes(self, batch: int, length: int | None = None) -> dict[str, Any]:
        """The cache as `jax.ShapeDtypeStruct`s: {"k": [...], "v": [...]}, one per layer, or
        one (n_layers, ...) array each when stacked."""
        shape = self.layer_shape(batch, length)
        dtype = jnp.dtype(self.dtype)
        if self.stacked:
            return {name: jax.ShapeDtypeStruct((self.n_layers, *shape), dtype)
                    for name in NAMES}
        return {name: [jax.ShapeDtypeStruct(shape, dtype) for _ in range(self.n_layers)]
                for name in NAMES}

    def zeros(self, batch: int, length: int | None = None) -> dict:
        """A zero cache for `batch` sequences of `length` positions."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.shapes(batch, length))

    def axes(self) -> dict[str, Any]:
        """A tree like the cache with a `CacheAxes` for every array."""
        if self.stacked:
            return {name: CacheAxes(slot=1, length=3) for name in NAMES}
        return {name: [CacheAxes(slot=0, length=2) for _ in range(self.n_layers)]
                for name in NAMES}

    def bytes_per_token(self, bytes_per_element: int, kv_heads: int | None = None) -> int:
        """Bytes of K and V for one token of one sequence over every layer, with all kv heads
        or `kv_heads` of them (what one chip holds when the heads are split)."""
        heads = self.n_kv_heads if kv_heads is None else kv_heads
        return len(NAMES) * self.n_layers * heads * self.d_head * bytes_per_element


def cache_length(cache: dict) -> int:
    """How many positions a cache holds."""
    first = cache["k"] if not isinstance(cache["k"], list) else cache["k"][0]
    return first.shape[-2]


def _write_row(row: jax.Array, new: jax.Array, position: jax.Array) -> jax.Array:
    """row (K, S, D) <- new (K, D) at position; vmapped over the batch it is a scatter whose
    batch dimension is a batching dimension (each row its own index), which XLA runs in place
    and the compiler can split over devices."""
    return jax.lax.dynamic_update_slice(row, new[:, None, :], (0, position, 0))


def write_token(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache (B, K, S, D) with new (B, K, D) written at position positions[b] of row b."""
    if cache.shape[0] == 1:
        return write_one_row(cache, new, positions)
    return jax.vmap(_write_row)(cache, new.astype(cache.dtype), positions)


def write_one_row(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """`write_token` for a single row, as a scatter of two updates whose second is out of
    range (dropped). XLA rewrites a one-update scatter into a bounds-checked
    dynamic_update_slice, which it then fuses twice (once for the step's output, once for
    attention reading the row through a bitcast of its size-1 batch) and copies the whole
    cache around both; a two-update scatter stays one scatter, in place."""
    B = cache.shape[0]
    rows = jnp.array([0, B], jnp.int32)  # row B does not exist: its update is dropped
    index = jnp.stack([rows, jnp.concatenate([positions, positions])], axis=1)  # (2, 2)
    update = jnp.concatenate([new, new]).astype(cache.dtype)  # (2, K, D)
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2),
                                           inserted_window_dims=(0, 2),
                                           scatter_dims_to_operand_dims=(0, 2))
    return jax.lax.scatter(cache, index, update, dims,
                           mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def write_prompt(cache: jax.Array, new: jax.Array) -> jax.Array:
    """cache (B, K, S, D) with new (B, K, T, D) written at positions 0..T-1."""
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, 0, 0, 0))
