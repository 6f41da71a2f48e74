"""The serving KV cache: every slot's K/V in a store, and the window a decode step runs on.

    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("llama-tiny"))              # 2 layers, K/V (B, 2, S, 8)
    >>> kv = KVCache.for_model(model, max_slots=4, max_len=128)
    >>> new = model.init_cache(1, 8)                        # a prefill's K/V: 1 row, 8 positions
    >>> kv.write([2], new)                                  # into slot 2, positions 0..7
    >>> window = kv.window(capacity=4, length=64)           # what decode at bucket (4, 64) takes
    >>> window["k"][0].shape
    (4, 2, 64, 8)
    >>> kv.set_window(window)                               # what that step returned

The cache is any tree of arrays (the model's own layout, `model.init_cache(batch, length)`),
each with one axis of sequences and one of positions: `axes` says which
(`models.cache.CacheAxes`), and everything here goes through it.

Two copies, so that a decode step reads exactly the live part of the cache and writes it in
place, and nothing is compiled for every pair of shapes:

- the **store**: all `max_slots` slots at `max_len` positions. Prefills write their rows into
  it (`write`), the memory shuffle moves slots inside it (`move`); each of these is one
  program per shape of what is written, whatever the window is;
- the **window**: the first `capacity` slots at `length` positions, exactly the arrays the
  decode step of bucket (capacity, length) takes. The engine donates it to the step and
  adopts the step's output (`set_window`): between events a decode step is the only thing
  that touches the cache, and it writes one position per row in place.

`window(capacity, length)` hands out the window at a shape, (re)loading it from the store when
the shape changed or the store was written since -- after writing the window's new tokens back
into the store. Such an event costs copying the live window twice; it happens when requests
join or leave, or when the longest live row crosses a length bucket, not at every step.
The memory shuffle keeps live requests in slots [0, capacity), so the window holds them all.

Sharding: `sharding(capacity, length)` -> a Sharding (or a tree of them like the cache, or None)
places the window of that shape; the store takes `sharding(max_slots, max_len)`. The loads,
write-backs, writes and moves are compiled with those output shardings, so the arrays stay
where the compiled steps take them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding
from meshwright.runtime.scheduler import bucket_for, bucket_sizes, doubling

ShardingFn = Callable[[int, int], Any]  # (capacity, length) -> Sharding, tree of them, or None


def kv_lengths_for(max_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Window lengths decode steps are compiled for: powers of two from `smallest`, capped by
    max_len (a decode step runs at the smallest one that holds its longest live row).

    >>> kv_lengths_for(64), kv_lengths_for(1024), kv_lengths_for(300)
    ((64,), (64, 128, 256, 512, 1024), (64, 128, 256, 300))
    """
    return doubling(smallest, max_len)


def _index(axes, slot_index, length_stop: int | None = None) -> tuple:
    """An index tuple selecting `slot_index` on the slot axis and [:length_stop] on the length
    axis of an array with those axes."""
    idx: list = [slice(None)] * (max(axes.slot, axes.length) + 1)
    idx[axes.slot] = slot_index
    if length_stop is not None:
        idx[axes.length] = slice(0, length_stop)
    return tuple(idx)


def _load(store, axes, capacity: int, length: int):
    """The window: slots [0, capacity), positions [0, length)."""
    return jax.tree.map(lambda a, ax: a[_index(ax, slice(0, capacity), length)], store, axes)


def _store(store, window, axes):
    """The store with the window written over its first slots and positions."""
    return jax.tree.map(lambda a, w: jax.lax.dynamic_update_slice(a, w.astype(a.dtype),
                                                                  (0,) * a.ndim),
                        store, window)


def _write(store, new, slots, axes):
    """The store with row r of `new` (R rows, T positions) written into slot slots[r],
    positions 0..T-1."""
    def one(a, n, ax):
        return a.at[_index(ax, slots, n.shape[ax.length])].set(n.astype(a.dtype), mode="drop")

    return jax.tree.map(one, store, new, axes)


def _move(store, src, dst, axes):
    """The store with slot `dst` a copy of slot `src`."""
    def one(a, ax):
        row = jax.lax.dynamic_slice_in_dim(a, src, 1, axis=ax.slot)
        return jax.lax.dynamic_update_slice_in_dim(a, row, dst, axis=ax.slot)

    return jax.tree.map(one, store, axes)


def _out(sharding) -> dict:
    return {} if sharding is None else {"out_shardings": sharding}


def _compiled(kind: str, axes: Any, sharding, *static) -> Callable:
    """The jitted helper of one kind, for one tree of axes, output sharding (a Sharding, a
    tree of them, or None) and static arguments; the store is donated wherever it is updated
    (written in place). Built once per key."""
    return _compiled_by_key(kind, _Hashable(axes), _Hashable(sharding), *static)


@functools.cache
def _compiled_by_key(kind: str, axes_key, sharding_key, *static) -> Callable:
    axes, sharding = axes_key.value, sharding_key.value
    if kind == "load":
        return jax.jit(functools.partial(_load, axes=axes, capacity=static[0],
                                         length=static[1]), **_out(sharding))
    fn = {"store": _store, "write": _write, "move": _move}[kind]
    return jax.jit(functools.partial(fn, axes=axes), donate_argnums=(0,), **_out(sharding))


def zeros_maker(structs: Any, sharding) -> Callable[[], Any]:
    """A jitted function of no arguments returning zeros shaped as the tree of
    `jax.ShapeDtypeStruct`s `structs`, placed by `sharding` (a tree of Shardings like it, or
    None). Built once per (shapes and dtypes, sharding): every cache of the same shapes shares
    one compile."""
    plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), structs)
    return _zeros_by_key(_Hashable(plain), _Hashable(sharding))


@functools.cache
def _zeros_by_key(structs_key, sharding_key) -> Callable[[], Any]:
    structs = structs_key.value
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs),
                   **_out(sharding_key.value))


class _Hashable:
    """A tree (of CacheAxes, of Shardings) as a cache key: its structure and leaves."""

    def __init__(self, value):
        self.value = value
        leaves, tree = jax.tree.flatten(value, is_leaf=lambda x: x is None)
        self._key = (tree, tuple(leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


def batch_sharding(mesh: Mesh, axis: str, slot_axis: int = 0) -> ShardingFn:
    """(capacity, length) -> sharding: slots split over mesh axis `axis` when the capacity
    divides by its size (attention sharded over batch, Pope et al. section 3.3), replicated
    otherwise. `slot_axis` is where the cache arrays keep their slots (0 for the reference
    models' per-layer arrays, 1 when layers are stacked for a scan)."""
    size = mesh.shape[axis]

    def sharding(capacity: int, length: int) -> Sharding:
        if capacity % size:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, PartitionSpec(*([None] * slot_axis), axis))

    return sharding


class KVCache:
    """K/V of `max_slots` sequences of up to `max_len` positions (see the module docstring).

    `shapes(batch, length)` gives the cache tree as `jax.ShapeDtypeStruct`s (a model's
    `cache_shapes`), `axes` the tree of `CacheAxes`.
    """

    def __init__(self, shapes: Callable[[int, int], Any], axes: Any, max_slots: int,
                 max_len: int, *, sharding: ShardingFn | Sharding | None = None) -> None:
        if max_slots < 1 or max_len < 1:
            raise ValueError(f"max_slots and max_len must be >= 1, got {max_slots}, {max_len}")
        self.shapes, self.axes = shapes, axes
        self.max_slots, self.max_len = max_slots, max_len
        self.buckets = bucket_sizes(max_slots)
        self.sharding = sharding
        self.store = self._zeros(max_slots, max_len)
        self._window = None  # (capacity, length, tree) handed out last
        self._window_dirty = False  # a decode step wrote into the window since it was loaded
        self._store_newer = False  # the store was written since the window was loaded
        self.events = 0  # window (re)loads: shape changes, joins, moves
        self._shapes_seen: dict[tuple[int, int], Any] = {}

    @classmethod
    def for_model(cls, model, max_slots: int, max_len: int | None = None, *,
                  params: Any = None, **kwargs) -> KVCache:
        """A cache shaped as `model` lays it out (`model.cache_shapes`, `model.cache_axes`:
        a reference Model or one served from functions, whose axes are found by tracing its
        decode step with `params`); `max_len` defaults to the model's."""
        return cls(model.cache_shapes, model.cache_axes(params), max_slots,
                   max_len or model.max_len, **kwargs)

    # ---- placement --------------------------------------------------------------------------
    def sharding_for(self, capacity: int, length: int):
        """How the arrays of that shape are placed (None: default placement)."""
        s = self.sharding
        if callable(s) and not isinstance(s, Sharding):
            return s(capacity, length)
        return s

    def set_sharding(self, sharding: ShardingFn | Sharding | None) -> None:
        """Change how the arrays are placed, and re-place the store (the window reloads)."""
        self.flush()
        self.sharding = sharding
        target = self.sharding_for(self.max_slots, self.max_len)
        if target is not None:
            self.store = jax.device_put(self.store, _broadcast(target, self.store))
        self._store_newer = True

    def _zeros(self, capacity: int, length: int):
        structs = self.shapes(capacity, length)
        sharding = self.sharding_for(capacity, length)
        return zeros_maker(structs, None if sharding is None else _broadcast(sharding, structs))()

    # ---- the window -------------------------------------------------------------------------
    def window(self, capacity: int, length: int):
        """The first `capacity` slots at `length` positions, as the decode step of that bucket
        takes them. Pass it to a step that donates it, then `set_window` what it returns."""
        self._check(capacity, length)
        w = self._window
        if w is not None and w[:2] == (capacity, length) and not self._store_newer:
            return w[2]
        self.flush()
        sharding = self.sharding_for(capacity, length)
        load = _compiled("load", self.axes, sharding, capacity, length)
        self._window = (capacity, length, load(self.store))
        self._window_dirty = self._store_newer = False
        self.events += 1
        return self._window[2]

    def set_window(self, cache) -> None:
        """Adopt the window a decode step returned (the shape it was handed out at)."""
        if self._window is None:
            raise RuntimeError("set_window without a window: call window(capacity, length)")
        capacity, length, _ = self._window
        want = self._shapes_of(capacity, length)
        got = jax.tree.map(lambda a: a.shape, cache)
        if want != got:
            raise ValueError(f"the step returned a cache of shapes {got}, the window is "
                             f"{want}")
        self._window = (capacity, length, cache)
        self._window_dirty = True

    def _shapes_of(self, capacity: int, length: int):
        """The window's array shapes at (capacity, length), computed once."""
        key = (capacity, length)
        if key not in self._shapes_seen:
            self._shapes_seen[key] = jax.tree.map(lambda s: s.shape,
                                                  self.shapes(capacity, length))
        return self._shapes_seen[key]

    def flush(self) -> None:
        """Write the window's new tokens back into the store (no-op when there are none)."""
        if self._window is None or not self._window_dirty:
            return
        sharding = self.sharding_for(self.max_slots, self.max_len)
        store = _compiled("store", self.axes, sharding)
        self.store = store(self.store, self._window[2])
        self._window_dirty = False

    @property
    def capacity(self) -> int:
        """Slots of the last window handed out (0 before any)."""
        return self._window[0] if self._window else 0

    @property
    def length(self) -> int:
        """Positions of the last window handed out (0 before any)."""
        return self._window[1] if self._window else 0

    # ---- writes into the store --------------------------------------------------------------
    def write(self, slots: Sequence[int], new) -> None:
        """Write a prefill's K/V -- a cache tree of len(slots) rows and T positions -- into
        those slots, positions 0..T-1. Rows beyond len(slots) (a padded prefill bucket) are
        dropped."""
        slots = [int(s) for s in slots]
        for s in slots:
            self._check_slot(s)
        rows = jax.tree.leaves(jax.tree.map(lambda a, ax: a.shape[ax.slot], new, self.axes))[0]
        T = jax.tree.leaves(jax.tree.map(lambda a, ax: a.shape[ax.length], new, self.axes))[0]
        if T > self.max_len:
            raise ValueError(f"positions 0..{T - 1} outside max_len={self.max_len}")
        if len(slots) > rows:
            raise ValueError(f"{len(slots)} slots for {rows} rows of K/V")
        # padded rows go to slot max_slots: out of bounds, so the scatter drops them
        index = np.full(rows, self.max_slots, np.int32)
        index[:len(slots)] = slots
        self.flush()
        write = _compiled("write", self.axes,
                          self.sharding_for(self.max_slots, self.max_len))
        self.store = write(self.store, new, index)
        self._store_newer = True

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` onto slot `dst` (the memory shuffle); `src` keeps stale data."""
        self._check_slot(src)
        self._check_slot(dst)
        if src == dst:
            return
        self.flush()
        move = _compiled("move", self.axes, self.sharding_for(self.max_slots, self.max_len))
        self.store = move(self.store, np.int32(src), np.int32(dst))
        self._store_newer = True

    def read(self, slot: int):
        """One slot's K/V (all max_len positions), a tree like the cache (for tests)."""
        self._check_slot(slot)
        self.flush()
        return jax.tree.map(lambda a, ax: a[_index(ax, slot)], self.store, self.axes)

    # ---- compiling ahead of time ------------------------------------------------------------
    def warm_up(self, windows: Sequence[tuple[int, int]], stepped: dict | None = None,
                writes: Sequence[Any] = ()) -> None:
        """Run once, on a scratch store placed like the real one, the load and write-back of
        every window shape, the write of every given prefill output and the move, so that
        nothing compiles while serving; the cache's contents are unchanged. `stepped` maps
        a window shape to what the decode step of that bucket returned (its placement may
        differ from the load's), `writes` are prefill outputs as the prefill steps return
        them: arrays, or `jax.ShapeDtypeStruct`s with their sharding (zeros are made of
        those one at a time, so that only one bucket's cache exists at once)."""
        stepped = stepped or {}
        scratch = self._zeros(self.max_slots, self.max_len)
        store_sharding = self.sharding_for(self.max_slots, self.max_len)
        store = _compiled("store", self.axes, store_sharding)
        for capacity, length in windows:
            load = _compiled("load", self.axes, self.sharding_for(capacity, length),
                             capacity, length)
            window = load(scratch)
            scratch = store(scratch, window)
            if (capacity, length) in stepped:
                scratch = store(scratch, _materialize(stepped[(capacity, length)]))
        write = _compiled("write", self.axes, store_sharding)
        for new in writes:
            rows = jax.tree.leaves(jax.tree.map(lambda a, ax: a.shape[ax.slot], new,
                                                self.axes))[0]
            scratch = write(scratch, _materialize(new), np.full(rows, self.max_slots, np.int32))
        move = _compiled("move", self.axes, store_sharding)
        jax.block_until_ready(move(scratch, np.int32(0), np.int32(0)))

    # ---- helpers ----------------------------------------------------------------------------
    def bucket_for(self, rows: int) -> int:
        """Smallest bucket (1, 2, 4, ..., max_slots) holding `rows` rows."""
        return bucket_for(rows, self.max_slots)

    @property
    def nbytes(self) -> int:
        """Bytes of the store (every slot at max_len)."""
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.store))

    def _check(self, capacity: int, length: int) -> None:
        if not 1 <= capacity <= self.max_slots:
            raise ValueError(f"capacity must be in 1..{self.max_slots}, got {capacity}")
        if not 1 <= length <= self.max_len:
            raise ValueError(f"length must be in 1..{self.max_len}, got {length}")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise IndexError(f"slot {slot} outside the {self.max_slots} slots")

    def __repr__(self) -> str:
        window = (f"window {self.capacity} slots x {self.length} positions"
                  if self._window else "no window")
        return (f"KVCache({self.max_slots} slots x {self.max_len} positions, {window}, "
                f"{self.nbytes / 2**20:.2f} MiB stored)")


def _materialize(tree):
    """Zeros for every `jax.ShapeDtypeStruct` leaf of `tree`: committed to its sharding, or
    uncommitted on the default device when it has none; arrays as they are."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.sharding is None:
                return jnp.zeros(x.shape, x.dtype)
            return jnp.zeros(x.shape, x.dtype, device=x.sharding)
        return x

    return jax.tree.map(one, tree)


def _broadcast(sharding, tree):
    """A sharding for every leaf of `tree` (one given for all, or a tree of them)."""
    if isinstance(sharding, Sharding):
        return jax.tree.map(lambda _: sharding, tree)
    return sharding
