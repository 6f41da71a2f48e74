"""Spec propagation: which spec every value of an annotated graph has, what each equation asks
of its operands, and which collectives the lowering will put in between — from the graph, its
layout and the mesh alone, with no JAX tracing.

`lower` is one walk (`lower.lower_graph`) over one set of rules (`lower.LOWER_RULES`), each
deciding specs and then asking its context to reshard (`ctx.to`) and to run the equation
(`ctx.bind`). What the context does with that is the difference between the two uses:

- **emission** (`lower`, under `jax.shard_map`): local JAX arrays; `ctx.to` writes collectives
  through a `sharding.Emitter`, `ctx.bind` binds the primitive on local shapes;
- **propagation** (`propagate`, here): each local array is an `Abstract` (shape, dtype);
  `ctx.to` runs the same `sharding.reshard` algorithm on a `SpecEmitter`, which records each
  collective with its bytes and computes shapes, and `ctx.bind` returns `Abstract` results.

Nothing is compiled or traced and nothing is written on the graph: the answer is a
`Propagation` (each equation's operand and result specs, the collectives with their sites, the
replicated fallbacks, and a `MatmulSite` per dot_general — what a matmul lowering such as
collective-einsum needs to price its alternative). Since both uses run the same rules, the
propagated specs and collectives are the ones emission writes (for plain matmuls: a registered
matmul lowering replaces a dot_general's collectives only at emission;
`tests/test_lower.py` checks propagation against emission on every layout).

    >>> prop = propagate(g, MeshInfo({"x": 2, "y": 2, "z": 2}))
    >>> prop.specs[node]            # the equation's result specs
    >>> [str(s.wants[1]) for s in prop.matmuls]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshwright.ir import Graph, Node
from meshwright.passes.sharding import Axes, CollectiveRecord, Emitter, MeshInfo, Spec


@dataclass(eq=False)
class Abstract:
    """A local array during propagation: its shape and dtype (compared by identity, as the
    lowering's reshard cache compares arrays). `shape` is None between an equation's bind
    and the walk giving it the local shape of its result spec."""

    shape: tuple[int, ...] | None
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)


class SpecEmitter(Emitter):
    """An `Emitter` that moves no data: each collective records what it would send (the
    same bytes `Emitter` records) and returns an `Abstract` of the shape it would make."""

    def _like(self, x: Abstract, shape) -> Abstract:
        return Abstract(tuple(shape), x.dtype)

    def _scaled(self, x: Abstract, dim: int, factor: float) -> Abstract:
        shape = list(x.shape)
        shape[dim] = int(shape[dim] * factor)
        return self._like(x, shape)

    def all_gather(self, x, axes: Axes, dim: int, note=""):
        out = self._scaled(x, dim, self.mesh.count(axes))
        self._record("all-gather", axes, out, note)
        return out

    def all_gather_dims(self, x, groups: list[tuple[int, Axes]], note=""):
        all_axes = tuple(a for _, axes in groups for a in axes)
        shape = [x.shape[k] * math.prod(self.mesh.sizes[a] for a in dict(groups).get(k, ()))
                 for k in range(x.ndim)]
        out = self._like(x, shape)
        self._record("all-gather", all_axes, out, note)
        return out

    def reduce_scatter(self, x, axes: Axes, dim: int, note=""):
        self._record("reduce-scatter", axes, x, note)
        return self._scaled(x, dim, 1 / self.mesh.count(axes))

    def all_reduce(self, x, axes: Axes, op: str = "sum", note=""):
        self._record("all-reduce", axes, x, note)
        return self._like(x, x.shape)

    def all_to_all(self, x, axes: Axes, split: int, concat: int, note=""):
        self._record("all-to-all", axes, x, note)
        n = self.mesh.count(axes)
        shape = list(x.shape)
        shape[split] //= n
        shape[concat] *= n
        return self._like(x, shape)

    def ppermute(self, x, axes: Axes, perm: list[tuple[int, int]], note=""):
        self._record("collective-permute", axes, x, note)
        return self._like(x, x.shape)

    def local_slice(self, x, axes: Axes, dim: int, major: Axes = ()):
        return self._scaled(x, dim, 1 / self.mesh.count(axes))


@dataclass(frozen=True)
class MatmulSite:
    """One dot_general as propagation reached it: what a matmul lowering decides from.

    `arrived`: its operands' specs as they come; `wants`: the specs it computes on
    (`lower.dot_operand_specs`); `reused`: per operand, whether an earlier equation already
    resharded that same array to its wanted spec (q, k and v of one normed input gather it
    once); `trips`: executions per call (a scan body's matmul: the scan's length)."""

    node: Node
    arrived: tuple[Spec, Spec]
    wants: tuple[Spec, Spec]
    reused: tuple[bool, bool]
    trips: int


@dataclass
class Propagation:
    """What `propagate` found: specs, collectives and matmul sites of one annotated graph."""

    specs: dict[Node, list[Spec]] = field(default_factory=dict)  # results, after their targets
    operand_specs: dict[Node, list[Spec | None]] = field(default_factory=dict)  # as they came
    collectives: list[CollectiveRecord] = field(default_factory=list)  # per call, with sites
    matmuls: list[MatmulSite] = field(default_factory=list)  # in the order the walk met them
    fallbacks: list[str] = field(default_factory=list)  # equations that would run replicated

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.collectives:
            out[r.kind] = out.get(r.kind, 0) + r.bytes
        return out


def propagate(g: Graph, mesh: MeshInfo) -> Propagation:
    """Propagate specs through the annotated graph `g` (it needs `annotate`'s
    `g.meta["in_specs"]`) on `mesh`: the walk emission runs, on `Abstract` local arrays."""
    from meshwright.passes.lower import LowerContext, Lowered, lower_graph

    if "in_specs" not in g.meta:
        raise ValueError("propagate needs an annotated graph: run 'annotate' first")
    in_specs = g.meta["in_specs"]
    prop = Propagation()
    em = SpecEmitter(mesh)
    result = Lowered(fallbacks=prop.fallbacks)
    ctx = LowerContext.for_graph(g, mesh, em, result)
    ctx.propagation = prop
    flat = [Abstract(mesh.local_shape(v.shape, s), v.dtype) for v, s in zip(g.inputs, in_specs)]
    lower_graph(ctx, g, flat, list(in_specs))
    prop.collectives = em.records
    return prop
