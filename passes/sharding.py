"""Shardings of values and the explicit collectives that turn one into another.

A `Spec` says, per dimension, which mesh axes split it (major first, as in a PartitionSpec),
and over which axes the local values are unreduced partial results (`partial`, with the
reduction: sum, max or min). `reshard` emits the collectives between two specs inside a
`shard_map` body, choosing the cheap ones the paper's layouts use:

    partial over a, target shards dim d on a next      -> psum_scatter over a on d
    partial over a otherwise                            -> psum / pmax / pmin over a
    axes g leave dim i and are the next ones dim j needs -> all_to_all(g, split j, concat i)
    axes g leave dim i otherwise                        -> all_gather over g on i
    dim d gains axes g                                  -> a local slice (no communication)

Every collective emitted is recorded (kind, axes, bytes per device) so that tests and
`report()` can compare what the program does with what the cost model predicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from meshwright.passes.layouts import ATTENTION_NAMES, FFN_NAMES, attention_layout, ffn_layout
from meshwright.passes.mesh import Mesh

Axes = tuple[str, ...]


@dataclass(frozen=True)
class Spec:
    dims: tuple[Axes, ...]  # mesh axes splitting each dimension, major first
    partial: tuple[tuple[str, str], ...] = ()  # (axis, "sum"|"max"|"min"): unreduced over axis

    @staticmethod
    def replicated(rank: int) -> Spec:
        return Spec(((),) * rank)

    def used(self) -> set[str]:
        return {a for d in self.dims for a in d} | {a for a, _ in self.partial}

    def partial_axes(self) -> set[str]:
        return {a for a, _ in self.partial}

    def with_dims(self, dims) -> Spec:
        return Spec(tuple(tuple(d) for d in dims), self.partial)

    def without_partial(self) -> Spec:
        return Spec(self.dims, ())

    def is_replicated(self) -> bool:
        return not any(self.dims) and not self.partial

    def partition_spec(self):
        from jax.sharding import PartitionSpec

        return PartitionSpec(*[(d if len(d) > 1 else d[0]) if d else None for d in self.dims])

    def text(self) -> tuple:
        """For node.meta["sharding"]: per dimension the axes (printed `embed_xzy`)."""
        return tuple(d for d in self.dims)

    def __str__(self) -> str:
        body = ", ".join("".join(d) or "-" for d in self.dims)
        part = "".join(f" +{op}{a}" for a, op in self.partial)
        return f"[{body}]{part}"


@dataclass
class CollectiveRecord:
    kind: str  # all-gather | reduce-scatter | all-reduce | all-to-all | collective-permute
    axes: Axes
    bytes: int  # per device: all-gather output, reduce-scatter input, all-reduce/all-to-all data
    note: str = ""
    site: str = ""  # the equation that emitted it (`lower_graph` fills it in), see `_site`


class MeshInfo(Mesh):
    """The mesh (`passes.mesh.Mesh`: `sizes`, `count`, `local_shape`, `fits`) built from its
    axis sizes, MeshInfo({"x": 2, "y": 2, "z": 2}): the lowering's name for it."""

    def __init__(self, sizes) -> None:
        super().__init__(*Mesh.parse(sizes).shape)


@dataclass
class Emitter:
    """Emits collectives inside a shard_map body and records them."""

    mesh: MeshInfo
    records: list[CollectiveRecord] = field(default_factory=list)
    trips: int = 1  # multiplier while emitting a loop body (records count per execution)

    def _record(self, kind, axes, local, note):
        nbytes = int(np.prod(local.shape)) * np.dtype(local.dtype).itemsize
        for _ in range(self.trips):
            self.records.append(CollectiveRecord(kind, tuple(axes), nbytes, note))

    # Each primitive: the local array before, the axes, the dimension.
    def all_gather(self, x, axes: Axes, dim: int, note=""):
        out = jax.lax.all_gather(x, _axis_name(axes), axis=dim, tiled=True)
        self._record("all-gather", axes, out, note)
        return out

    def all_gather_dims(self, x, groups: list[tuple[int, Axes]], note=""):
        """One all-gather of several dimensions at once (a weight split E_x F_y gathered over
        x and y): gather over every axis into a new leading axis, then put each axis's
        blocks back into its dimension (major axes first)."""
        all_axes = tuple(a for _, axes in groups for a in axes)
        y = jax.lax.all_gather(x, _axis_name(all_axes), axis=0, tiled=False)
        sizes = [self.mesh.sizes[a] for a in all_axes]
        y = y.reshape(*sizes, *x.shape)
        n_axes = len(all_axes)
        position, start = {}, 0
        for d, axes in groups:
            position[d] = list(range(start, start + len(axes)))
            start += len(axes)
        perm = []
        for k in range(x.ndim):
            perm += position.get(k, []) + [n_axes + k]
        y = jnp_transpose(y, perm)
        shape = [x.shape[k] * math.prod(self.mesh.sizes[a] for a in dict(groups).get(k, ()))
                 for k in range(x.ndim)]
        y = y.reshape(shape)
        self._record("all-gather", all_axes, y, note)
        return y

    def reduce_scatter(self, x, axes: Axes, dim: int, note=""):
        self._record("reduce-scatter", axes, x, note)
        return jax.lax.psum_scatter(x, _axis_name(axes), scatter_dimension=dim, tiled=True)

    def all_reduce(self, x, axes: Axes, op: str = "sum", note=""):
        self._record("all-reduce", axes, x, note)
        fn = {"sum": jax.lax.psum, "max": jax.lax.pmax, "min": jax.lax.pmin}[op]
        return fn(x, _axis_name(axes))

    def all_to_all(self, x, axes: Axes, split: int, concat: int, note=""):
        self._record("all-to-all", axes, x, note)
        return jax.lax.all_to_all(x, _axis_name(axes), split, concat, tiled=True)

    def ppermute(self, x, axes: Axes, perm: list[tuple[int, int]], note=""):
        """Send each device's x to another along `axes`; `perm` pairs are ppermute's own
        device indices over `axes` (see `collective_einsum.ring_perm`)."""
        self._record("collective-permute", axes, x, note)
        return jax.lax.ppermute(x, _axis_name(axes), perm=perm)

    def local_slice(self, x, axes: Axes, dim: int, major: Axes = ()):
        """The shard of dim this device holds along axes (no communication). With `major`
        axes (to be reduce-scattered onto dim next, in front of `axes`), the slice is
        strided: this device's part of each of their blocks."""
        parts = self.mesh.count(axes)
        # the indices are never negative: no select to wrap them (jax's default adds one per
        # slice, through jax.numpy: a third of the lowering's time on a 118-layer model)
        if major:
            blocks = self.mesh.count(major)
            shape = x.shape
            y = x.reshape(*shape[:dim], blocks, parts, shape[dim] // (blocks * parts),
                          *shape[dim + 1:])
            y = jax.lax.dynamic_slice_in_dim(y, self.device_index(axes), 1, axis=dim + 1,
                                             allow_negative_indices=False)
            return y.reshape(*shape[:dim], shape[dim] // parts, *shape[dim + 1:])
        size = x.shape[dim] // parts
        index = self.device_index(axes, stride=size)
        return jax.lax.dynamic_slice_in_dim(x, index, size, axis=dim,
                                            allow_negative_indices=False)

    def device_index(self, axes: Axes, stride: int = 1):
        """stride x this device's index along `axes` (the first the major one), as
        `jax.lax.axis_index(axes) * stride` computes it, in lax operations only (tracer
        arithmetic goes through jax.numpy's jitted functions: ~1 ms a call)."""
        index = None
        for a in reversed(tuple(axes)):
            term = jax.lax.axis_index(a)
            if stride != 1:
                term = jax.lax.mul(term, np.int32(stride))
            index = term if index is None else jax.lax.add(index, term)
            stride *= self.mesh.sizes.get(a, 1)
        return index if index is not None else np.int32(0)


def jnp_transpose(x, perm):
    return jax.lax.transpose(x, tuple(perm))


def _axis_name(axes: Axes):
    return axes[0] if len(axes) == 1 else tuple(axes)


def _is_prefix(a: Axes, b: Axes) -> bool:
    return tuple(b[:len(a)]) == tuple(a)


def reshard(em: Emitter, x, src: Spec, dst: Spec, note: str = ""):
    """Collectives (and local slices) turning a local array of spec `src` into spec `dst`."""
    if dst.partial:
        raise ValueError("a target spec cannot be partial")
    dims = [tuple(d) for d in src.dims]
    target = [tuple(d) for d in dst.dims]
    # 1. Reduce partial results (emitted after the slices of step 2): scatter onto a dimension
    #    that wants the axis next, or onto a dimension whose axes will move as one group into
    #    a dimension that wants them (the heads -> batch move of multiquery attention), else
    #    reduce in place.
    reduce_in_place: dict[str, list[str]] = {}
    scatter_groups: list[tuple[int, list[str]]] = []  # consecutive axes onto one dim: one op
    for axis, op in src.partial:
        placed = None
        if op == "sum":
            for d in range(len(dims)):
                if _is_prefix(dims[d] + (axis,), target[d]):
                    placed = d
                    break
            if placed is None:
                for d in range(len(dims)):
                    if not dims[d] or target[d][:len(dims[d])] == dims[d]:
                        continue
                    group = dims[d] + (axis,)
                    if any(j != d and _is_prefix(dims[j] + group, target[j])
                           for j in range(len(dims))):
                        placed = d
                        break
        if placed is None:
            reduce_in_place.setdefault(op, []).append(axis)
            continue
        dims[placed] = dims[placed] + (axis,)
        if scatter_groups and scatter_groups[-1][0] == placed:
            scatter_groups[-1][1].append(axis)
        else:
            scatter_groups.append((placed, [axis]))
    # 2. Slice first what this device keeps anyway: the axes a dimension gains after its own
    #    (and after the partial axes scattered onto it) that nothing holds yet, so that the
    #    collectives below move only this device's part (a projection replicated over z
    #    wanted B_(z,x,y) is sliced over z before its heads move; K partial over x wanted
    #    B_(x,z,y) keeps every x-block's (z,y) part before its reduce-scatter over x).
    held = {a for d in src.dims for a in d} | src.partial_axes()
    scattered: dict[int, Axes] = {}
    for d, axes in scatter_groups:
        scattered[d] = scattered.get(d, ()) + tuple(axes)
    for d in range(len(dims)):
        if not _is_prefix(dims[d], target[d]):
            continue
        free = []
        for a in target[d][len(dims[d]):]:
            if a in held:
                break
            free.append(a)
        if free:
            x = em.local_slice(x, tuple(free), d, major=scattered.get(d, ()))
            dims[d] = dims[d] + tuple(free)  # the scatter below keeps these minor
    for op, axes in reduce_in_place.items():
        x = em.all_reduce(x, tuple(axes), op, note)
    for d, axes in scatter_groups:
        x = em.reduce_scatter(x, tuple(axes), d, note)
    # 3. Axes that leave a dimension: the longest minor group that another dimension wants
    #    next moves there (all_to_all); when none does, the minor-most axis is gathered.
    #    When several dimensions only gather (a weight-gathered layout's E_x F_y), one
    #    collective gathers them all.
    gathers = _pure_gathers(dims, target)
    if gathers and len(gathers) >= 2:
        x = em.all_gather_dims(x, gathers, note)
        for i, axes in gathers:
            dims[i] = dims[i][:len(dims[i]) - len(axes)]
    changed = True
    while changed:
        changed = False
        for i in range(len(dims)):
            if _is_prefix(dims[i], target[i]):
                continue
            keep = 0
            while keep < len(dims[i]) and keep < len(target[i]) and \
                    dims[i][keep] == target[i][keep]:
                keep += 1
            cur = dims[i]
            best = None
            for start in range(keep, len(cur)):
                group = cur[start:]
                for m in range(len(group), 0, -1):
                    dest = next((j for j in range(len(dims)) if j != i and
                                 _is_prefix(dims[j] + group[:m], target[j])), None)
                    if dest is not None:
                        best = (start, m, dest)
                        break
                if best:
                    break
            if best:
                start, m, dest = best
                if start + m < len(cur):  # the minor axes below the moving group: gather
                    x = em.all_gather(x, cur[start + m:], i, note)
                x = em.all_to_all(x, cur[start:start + m], split=dest, concat=i, note=note)
                dims[dest] = dims[dest] + cur[start:start + m]
                dims[i] = cur[:start]
            else:
                x = em.all_gather(x, cur[keep:], i, note)
                dims[i] = cur[:keep]
            changed = True
    # 4. Axes a dimension still gains: the local shard.
    for d in range(len(dims)):
        extra = target[d][len(dims[d]):]
        if extra:
            x = em.local_slice(x, extra, d)
            dims[d] = target[d]
    return x


def _pure_gathers(dims, target) -> list[tuple[int, Axes]] | None:
    """[(dim, axes to gather)] when every leaving axis can only be gathered (none moves to a
    dimension that wants it), else None."""
    out = []
    for i in range(len(dims)):
        if _is_prefix(dims[i], target[i]):
            continue
        keep = 0
        while keep < len(dims[i]) and keep < len(target[i]) and dims[i][keep] == target[i][keep]:
            keep += 1
        leaving = dims[i][keep:]
        for start in range(len(leaving)):
            for m in range(len(leaving) - start, 0, -1):
                group = leaving[start:start + m]
                if any(j != i and _is_prefix(dims[j] + group, target[j])
                       for j in range(len(dims))):
                    return None
        out.append((i, leaving))
    return out


# ---------------------------------------------------------------------------------------------
# Layouts: which mesh axes each dimension role uses, per FFN and attention layout (the axis maps
# of the layout objects in `passes/layouts.py`, put together for annotate and lower).


@dataclass(frozen=True)
class Layout:
    ffn: str
    attention: str
    stored: dict  # role -> axes of the stored weights
    use: dict  # role -> axes of the weights as the matmuls use them (after WG gathers)
    residual: dict  # role -> axes of activations between blocks
    hidden: dict  # role -> axes of activations inside blocks (mlp, heads)
    attention_batch: Axes  # batch axes inside attention when attention == "batch"

    def weight_gather_axes(self) -> Axes:
        """The axes a weight-gathered layout gathers each layer's weights over (else ())."""
        return tuple(ffn_layout(self.ffn).gathered)

    @property
    def attention_splits_batch(self) -> bool:
        """Attention runs split over sequences (attention "batch")."""
        return attention_layout(self.attention).splits_batch

    @property
    def whole_input(self) -> bool:
        """Every chip multiplies the whole input B.L.E (ws-1d)."""
        return ffn_layout(self.ffn).whole_input


def make_layout(ffn: str, attention: str) -> Layout:
    """The axis maps of the registered layouts `ffn` and `attention` (a ValueError names the
    known ones for any other name)."""
    f = ffn_layout(ffn)
    attention_layout(attention)
    return Layout(ffn, attention, f.stored, f.use, f.residual, f.hidden, f.attention_batch)


LAYOUT_NAMES_FFN = FFN_NAMES  # live views of the registries' names
LAYOUT_NAMES_ATTENTION = ATTENTION_NAMES


def spec_for(roles, shape, role_axes: dict, mesh: MeshInfo) -> Spec:
    """A spec giving each dimension the axes its role asks for, when they divide its size and
    are not already used by another dimension (earlier dimensions first)."""
    used: set[str] = set()
    dims = []
    for role, size in zip(roles, shape):
        axes = tuple(a for a in role_axes.get(role, ()) if mesh.sizes.get(a, 1) > 1)
        while axes and (set(axes) & used or not mesh.fits(size, axes)):
            axes = axes[:-1]  # drop minor axes until it divides and does not clash
        used.update(axes)
        dims.append(axes)
    return Spec(tuple(dims))
