"""The serving KV cache: K and V of every layer for a set of slots, one sequence per slot.

    >>> import jax.numpy as jnp
    >>> kv = KVCache(n_layers=2, max_slots=8, max_len=16, n_kv_heads=1, d_head=4)
    >>> kv.resize(4)                      # keep slots 0..3 on device: the bucket of 4 rows
    >>> kv.update(slot=2, pos=0, k=jnp.ones((2, 3, 1, 4)), v=jnp.ones((2, 3, 1, 4)))
    >>> kv.move(src=2, dst=0)             # the memory shuffle, on device
    >>> kv.k.shape, float(kv.k[:, 0, :3].sum()), float(kv.k[:, 0, 3:].sum())
    ((2, 4, 16, 1, 4), 24.0, 0.0)

Layout: `k` and `v` are (n_layers, capacity, max_len, n_kv_heads, d_head), the model's own
cache layout, so `as_dict()` is what `model.decode_step` takes. `capacity` is the current
bucket: the scheduler keeps every live request in slots [0, bucket), so the cache holds only
those rows and a decode step runs on the whole array, donated, with no slicing or copying.
Changing bucket (`resize`) copies once; the slots of a shrunk-away bucket are free by the
scheduler's invariant (`Scheduler.schedule` moves live requests out first).

Every update is a jitted function that donates the old buffers, so it writes in place.

Sharding: `sharding` is None (the default device, unsharded), one `jax.sharding.Sharding`
for every capacity, or a function capacity -> Sharding (`batch_sharding` shards the slot
axis over a mesh axis when the capacity divides evenly, as MQA/GQA decode wants, and
replicates otherwise). A resize re-places the arrays with the new capacity's sharding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding
from meshwright.runtime.scheduler import bucket_for, bucket_sizes

ShardingSpec = Sharding | Callable[[int], Sharding | None] | None


def _write_impl(cache: dict, new: dict, slot: jax.Array, pos: jax.Array) -> dict:
    """cache[name][:, slot, pos:pos+T] = new[name] for (L, T, K, D) or (L, 1, T, K, D) values."""
    out = {}
    for name, c in cache.items():
        x = new[name]
        if x.ndim == 4:
            x = x[:, None]  # (L, 1, T, K, D)
        out[name] = jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, slot, pos, 0, 0))
    return out


def _move_impl(cache: dict, src: jax.Array, dst: jax.Array) -> dict:
    """cache[name][:, dst] = cache[name][:, src]."""
    return {name: jax.lax.dynamic_update_slice_in_dim(
        c, jax.lax.dynamic_slice_in_dim(c, src, 1, axis=1), dst, axis=1)
        for name, c in cache.items()}


def _resize_impl(cache: dict, capacity: int) -> dict:
    """Keep slots [0, capacity) (shrink) or append zero slots (grow)."""
    out = {}
    for name, c in cache.items():
        if capacity <= c.shape[1]:
            out[name] = c[:, :capacity]
        else:
            pad = [(0, 0)] * c.ndim
            pad[1] = (0, capacity - c.shape[1])
            out[name] = jnp.pad(c, pad)
    return out


@functools.cache
def _jitted(kind: str, sharding: Sharding | None, capacity: int = 0) -> Callable:
    """The jitted write / move (donated: in place) or resize (to `capacity`; not donated,
    the shapes differ) whose output has `sharding` (None: wherever XLA puts it), so the
    cache stays placed as the next model step takes it, without a reshard."""
    out = {} if sharding is None else {"out_shardings": sharding}
    if kind == "write":
        return jax.jit(_write_impl, donate_argnums=(0,), **out)
    if kind == "move":
        return jax.jit(_move_impl, donate_argnums=(0,), **out)
    return jax.jit(functools.partial(_resize_impl, capacity=capacity), **out)


def _write(cache: dict, new: dict, slot, pos, sharding: Sharding | None = None) -> dict:
    return _jitted("write", sharding)(cache, new, slot, pos)


def _move(cache: dict, src, dst, sharding: Sharding | None = None) -> dict:
    return _jitted("move", sharding)(cache, src, dst)


def _resize(cache: dict, capacity: int, sharding: Sharding | None = None) -> dict:
    return _jitted("resize", sharding, capacity)(cache)


def batch_sharding(mesh: Mesh, axis: str) -> Callable[[int], Sharding]:
    """Capacity -> sharding: slots split over mesh axis `axis` when the capacity divides by its
    size (attention sharded over batch, Pope et al. section 3.3), replicated otherwise."""
    size = mesh.shape[axis]

    def sharding(capacity: int) -> Sharding:
        spec = PartitionSpec(None, axis) if capacity % size == 0 else PartitionSpec()
        return NamedSharding(mesh, spec)

    return sharding


def warm_up(kv: KVCache, capacity: int, new: dict | None = None) -> None:
    """Compile and run once the write/move at `capacity` slots and the resizes from it to every
    other bucket, on scratch arrays (`kv` is untouched), so nothing compiles while serving.
    `new`: K/V to write, placed as the prefill step returns them (default: one zero slot)."""
    def zeros(slots):
        z = jnp.zeros((kv.n_layers, slots, kv.max_len, kv.n_kv_heads, kv.d_head), kv.dtype)
        sharding = kv.sharding_for(slots)
        return z if sharding is None else jax.device_put(z, sharding)

    sharding = kv.sharding_for(capacity)
    cache = {"k": zeros(capacity), "v": zeros(capacity)}
    cache = _write(cache, new if new is not None else {"k": zeros(1), "v": zeros(1)},
                   np.int32(0), np.int32(0), sharding)
    cache = _move(cache, np.int32(0), np.int32(0), sharding)
    for other in kv.buckets:
        if other != capacity:
            jax.block_until_ready(_resize(cache, other, kv.sharding_for(other)))
    jax.block_until_ready(cache)


class KVCache:
    """K/V of `max_slots` sequences of up to `max_len` tokens; `capacity` slots live on device."""

    def __init__(self, n_layers: int, max_slots: int, max_len: int, n_kv_heads: int,
                 d_head: int, dtype="float32", *, sharding: ShardingSpec = None,
                 capacity: int = 1) -> None:
        self.n_layers, self.max_slots, self.max_len = n_layers, max_slots, max_len
        self.n_kv_heads, self.d_head = n_kv_heads, d_head
        self.dtype = jnp.dtype(dtype)
        self.sharding = sharding
        self.buckets = bucket_sizes(max_slots)
        self._check_capacity(capacity)
        shape = (n_layers, capacity, max_len, n_kv_heads, d_head)
        self._cache = self._place({"k": jnp.zeros(shape, self.dtype),
                                   "v": jnp.zeros(shape, self.dtype)})

    @classmethod
    def for_config(cls, config, max_slots: int, max_len: int | None = None,
                   **kwargs) -> KVCache:
        """A cache shaped for a model config (`max_len` defaults to the config's)."""
        return cls(config.n_layers, max_slots, max_len or config.max_len, config.n_kv_heads,
                   config.d_head, config.dtype, **kwargs)

    # ---- the arrays -----------------------------------------------------------------------
    @property
    def k(self) -> jax.Array:
        return self._cache["k"]

    @property
    def v(self) -> jax.Array:
        return self._cache["v"]

    @property
    def capacity(self) -> int:
        return self._cache["k"].shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.size * self.dtype.itemsize

    def as_dict(self) -> dict[str, jax.Array]:
        """{"k", "v"} as the model takes them. Pass it to a step that donates it, then `set`
        the step's output: the old buffers are gone after a donated call."""
        return dict(self._cache)

    def set(self, cache: dict[str, jax.Array]) -> None:
        """Adopt the cache a model step returned (same capacity)."""
        if cache["k"].shape != self.k.shape:
            raise ValueError(f"cache shape {cache['k'].shape} != {self.k.shape}")
        self._cache = {"k": cache["k"], "v": cache["v"]}

    def sharding_for(self, capacity: int) -> Sharding | None:
        """The sharding the arrays get at `capacity` slots (None: default placement)."""
        if callable(self.sharding) and not isinstance(self.sharding, Sharding):
            return self.sharding(capacity)
        return self.sharding

    def bucket_for(self, rows: int) -> int:
        """Smallest bucket (1, 2, 4, ..., max_slots) holding `rows` rows."""
        return bucket_for(rows, self.max_slots)

    # ---- updates (jitted, donated) --------------------------------------------------------
    def update(self, slot: int, pos: int, k: jax.Array, v: jax.Array) -> None:
        """Write K/V of T tokens, (n_layers, T, K, D) or (n_layers, 1, T, K, D), into `slot`
        at positions pos..pos+T-1."""
        self._check_slot(slot)
        T = k.shape[-3]
        if not 0 <= pos <= self.max_len - T:
            raise ValueError(f"positions {pos}..{pos + T - 1} outside max_len={self.max_len}")
        self._cache = _write(self._cache, {"k": k, "v": v}, np.int32(slot), np.int32(pos),
                             self.sharding_for(self.capacity))

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` onto slot `dst` (the memory shuffle); `src` keeps stale data."""
        self._check_slot(src)
        self._check_slot(dst)
        if src != dst:
            self._cache = _move(self._cache, np.int32(src), np.int32(dst),
                                self.sharding_for(self.capacity))

    def resize(self, capacity: int) -> None:
        """Keep `capacity` slots on device: slots >= capacity are dropped (they must be free),
        new slots are zero. No-op when unchanged."""
        self._check_capacity(capacity)
        if capacity != self.capacity:
            self._cache = _resize(self._cache, capacity, self.sharding_for(capacity))

    def set_sharding(self, sharding: ShardingSpec) -> None:
        """Change how the arrays are placed (a Sharding, capacity -> Sharding, or None) and
        re-place the current ones accordingly."""
        self.sharding = sharding
        self._cache = self._place(self._cache)

    def read(self, slot: int) -> tuple[jax.Array, jax.Array]:
        """K and V of one slot, (n_layers, max_len, K, D) each (for tests and debugging)."""
        self._check_slot(slot)
        return self.k[:, slot], self.v[:, slot]

    # ---- helpers --------------------------------------------------------------------------
    def _place(self, cache: dict) -> dict:
        sharding = self.sharding_for(cache["k"].shape[1])
        return cache if sharding is None else jax.device_put(cache, sharding)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} outside the {self.capacity} slots on device "
                             f"(resize first; max_slots={self.max_slots})")

    def _check_capacity(self, capacity: int) -> None:
        if not 1 <= capacity <= self.max_slots:
            raise ValueError(f"capacity must be in 1..{self.max_slots}, got {capacity}")

    def __repr__(self) -> str:
        return (f"KVCache(capacity={self.capacity}/{self.max_slots} slots, max_len="
                f"{self.max_len}, layers={self.n_layers}, kv_heads={self.n_kv_heads}, "
                f"d_head={self.d_head}, {self.dtype.name}, {self.nbytes / 2**20:.2f} MiB)")
