"""Lazy reads from safetensors files, and parameters placed on devices block by block.

A checkpoint tensor is never read whole unless a device needs it whole. The loader describes
each parameter as a small *lazy array* — a stored tensor, optionally transposed, with rows
picked or reordered, or stacked over layers — and each device asks it for its own block only:

    >>> import numpy as np
    >>> lazy = Stacked((Transposed(Constant(np.arange(6.0).reshape(2, 3))),) * 4)  # (4, 3, 2)
    >>> lazy.shape, lazy.read((slice(1, 3), slice(0, 3), slice(1, 2))).shape
    ((4, 3, 2), (2, 3, 1))

`place(lazy, sharding, dtype)` then builds a jax.Array in `sharding`: one read per distinct
block (a replicated block is read once and copied to its devices), each block on its devices
before the next is read, so the host holds about one block at a time beyond what the devices
hold. (`jax.make_array_from_callback` would read every local block first and
transfer them together: up to the whole tensor on the host at once; see
benchmarks/checkpoint_load_memory.py.)
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jax
import ml_dtypes
import numpy as np

Index = tuple[slice, ...]

# safetensors dtype names numpy cannot hold; these are read through a memory map instead.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2}
_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                 "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                 "BOOL": np.bool_}
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 8 * 2**20  # transposed blocks are read this many bytes at a time


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unknown architecture, missing, unexpected or
    wrongly shaped tensor. The message names the file, the tensor and the config field."""


class LazyArray(Protocol):
    shape: tuple[int, ...]

    def read(self, index: Index) -> np.ndarray:
        """The block `index` (one slice per dimension, step 1) as a new numpy array."""
        ...


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


def normalize_index(index: tuple, shape: tuple[int, ...]) -> Index:
    """JAX's per-device index (slices, possibly open-ended, possibly fewer than dims) as one
    closed slice per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided block {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; CheckpointError naming the file when it is not."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or re-download it") \
            from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face checkpoint directory, read lazily.

    Either `model.safetensors.index.json` (a sharded save: its weight_map names the file of
    every tensor) or every `*.safetensors` file in the directory. Files are memory-mapped by
    safetensors (`safe_open(framework="numpy")`); a read copies only the requested block.
    bfloat16/float8 tensors, which numpy cannot hold, are read from a numpy memmap with the
    ml_dtypes type at the offset the file's header gives.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no 'weight_map' object (tensor name "
                                      "-> file); re-save the checkpoint")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(
                f"no *.safetensors files in {self.directory} (PyTorch .bin checkpoints are not "
                "read: re-save with `model.save_pretrained(dir, safe_serialization=True)`)")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}  # key -> (shape, dtype name)
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{index_path.name} lists {name}, which is not in "
                                      f"{self.directory}")
            try:
                handle = safe_open(str(path), framework="numpy")
                names = handle.keys()
                pieces = {key: handle.get_slice(key) for key in names}
            except (SafetensorError, OSError) as e:  # header, size, format; unreadable
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                    "it may be truncated or corrupt: download or save it again") from None
            self._handles[name] = handle
            for key, piece in pieces.items():
                self._file_of[key] = name
                self._info[key] = (tuple(piece.get_shape()), piece.get_dtype())
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise CheckpointError(f"{INDEX_FILE} lists tensor {missing[0]!r} in "
                                      f"{weight_map[missing[0]]}, but that file lacks it")
        self._memmaps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> np.dtype:
        name = self._info[key][1]
        if name in _NUMPY_DTYPES:
            return np.dtype(_NUMPY_DTYPES[name])
        if name in _ML_DTYPES:
            return np.dtype(_ML_DTYPES[name])
        raise CheckpointError(f"tensor {key!r} in {self._file_of[key]} has dtype {name}, which "
                              "meshwright cannot read")

    def nbytes(self) -> int:
        """Bytes of tensor data in all files."""
        return sum(int(np.prod(s)) * self.dtype(k).itemsize for k, (s, _) in self._info.items())

    def read(self, key: str, index: Index) -> np.ndarray:
        """The block `index` of tensor `key` as a new array (only that block is copied)."""
        if self._info[key][1] in _NUMPY_DTYPES:
            return np.asarray(self._handles[self._file_of[key]].get_slice(key)[index])
        return np.array(self._memmap(key)[index])  # np.array copies out of the map

    def _memmap(self, key: str) -> np.memmap:
        if key not in self._memmaps:
            path = self.directory / self._file_of[key]
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            begin, _ = header[key]["data_offsets"]
            self._memmaps[key] = np.memmap(path, dtype=self.dtype(key), mode="r",
                                           offset=8 + header_len + begin, shape=self.shape(key))
        return self._memmaps[key]


# ---- lazy arrays: each maps a requested block to the blocks it needs from its source ------

@dataclass(frozen=True, eq=False)
class Stored:
    """Tensor `key` of a checkpoint, as stored."""
    checkpoint: SafetensorsCheckpoint
    key: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.checkpoint.shape(self.key)

    def read(self, index: Index) -> np.ndarray:
        return self.checkpoint.read(self.key, index)


@dataclass(frozen=True, eq=False)
class Constant:
    """An in-memory array (tests, doctests)."""
    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    def read(self, index: Index) -> np.ndarray:
        return np.array(self.value[index])


@dataclass(frozen=True, eq=False)
class Transposed:
    """A 2-D source transposed: PyTorch's Linear (out, in) as our (in, out)."""
    source: LazyArray

    @property
    def shape(self) -> tuple[int, ...]:
        rows, cols = self.source.shape
        return cols, rows

    def read(self, index: Index) -> np.ndarray:
        # In chunks of source rows, so that the host holds the block plus one chunk rather
        # than the block twice (read, then its transposed copy).
        rows, cols = index
        out = None
        step = max(1, CHUNK_BYTES // (4 * max(1, rows.stop - rows.start)))
        for start in range(cols.start, cols.stop, step):
            stop = min(start + step, cols.stop)
            part = self.source.read((slice(start, stop), rows))  # (chunk, rows)
            if out is None:
                out = np.empty((rows.stop - rows.start, cols.stop - cols.start), part.dtype)
            out[:, start - cols.start:stop - cols.start] = part.T
        if out is None:  # an empty block
            out = self.source.read((cols, rows)).T.copy()
        return out


@dataclass(frozen=True, eq=False)
class Gathered:
    """Entries `indices` of the source along `axis`, in that order (a row subset or
    permutation: dropping unused positions, splitting a fused QKV, reordering RoPE pairs).

    A block reads the smallest contiguous range of source rows covering what it needs.
    """
    source: LazyArray
    axis: int
    indices: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.source.shape)
        shape[self.axis] = len(self.indices)
        return tuple(shape)

    def read(self, index: Index) -> np.ndarray:
        wanted = self.indices[index[self.axis]]
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
        source_index = list(index)
        source_index[self.axis] = slice(lo, hi)
        block = self.source.read(tuple(source_index))
        if hi - lo == len(wanted) and np.array_equal(wanted, np.arange(lo, hi)):
            return block  # a contiguous run, in order
        return np.take(block, wanted - lo, axis=self.axis)


@dataclass(frozen=True, eq=False)
class Stacked:
    """Equal-shaped sources stacked on a new leading axis (layers for `scan_layers`)."""
    parts: tuple[LazyArray, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def read(self, index: Index) -> np.ndarray:
        out = None
        for row, layer in enumerate(range(len(self.parts))[index[0]]):
            part = self.parts[layer].read(index[1:])
            if out is None:
                out = np.empty((index[0].stop - index[0].start, *part.shape), part.dtype)
            out[row] = part
        return out if out is not None else np.stack([])


# ---- placement -----------------------------------------------------------------------------

def place(lazy: LazyArray, sharding: jax.sharding.Sharding, dtype) -> jax.Array:
    """`lazy` as a jax.Array of `dtype` laid out in `sharding`; each device gets only its block.

    Blocks are grouped by index: each distinct block is read (and cast) once, put on every
    device that holds it, and dropped before the next is read.
    """
    shape = tuple(lazy.shape)
    dtype = np.dtype(dtype)
    devices_of: dict[tuple, list] = defaultdict(list)  # (start, stop) per dim -> devices
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple((s.start, s.stop) for s in normalize_index(index, shape))
        devices_of[bounds].append(device)  # (slices are unhashable before Python 3.12)
    arrays = []
    for bounds, devices in devices_of.items():
        block = lazy.read(tuple(slice(*b) for b in bounds)).astype(dtype, copy=False)
        copies = [jax.device_put(block, device) for device in devices]
        # device_put is asynchronous and keeps `block` alive until its copy is done: wait, or
        # the next blocks would be read while this one is still held (measured: up to ~a
        # whole tensor more host memory).
        jax.block_until_ready(copies)
        arrays.extend(copies)
        del block, copies
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
