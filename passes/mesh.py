"""The mesh: one description of a logical x, y, z mesh of chips, for the planner, the lowering,
the runtime and the CLI.

    >>> m = Mesh.parse("2x4")                     # the CLI's --mesh; missing axes are 1
    >>> m, m.shape, m.sizes, m.text
    (Mesh(x=2, y=4, z=1, slow=(1, 1, 1)), (2, 4, 1), {'x': 2, 'y': 4, 'z': 1}, '2x4x1')
    >>> Mesh.parse({"y": 4}) == Mesh.parse((1, 4)) == Mesh(1, 4, 1)
    True
    >>> m.count(("x", "y")), m.size("xy"), m.fits(6, ("x",)), m.fits(6, ("y",))
    (8, 8, True, False)
    >>> m = Mesh(4, 2, 2, slow=(2, 1, 1))          # x runs over 2 nodes of 2 chips each
    >>> m.nodes, m.chips_per_node, m.slow_axes, str(m)
    (2, 8, {'x': 2}, '[2*2]x2x2')
    >>> Mesh(2, 2, 2).over_nodes(2).slow, Mesh(1, 2, 4).over_nodes(4).slow
    ((2, 1, 1), (1, 2, 2))

The spellings a mesh arrives in, and where they turn into a `Mesh`:

| spelling | who writes it | in | out |
|---|---|---|---|
| "2x2x2" | the CLI's `--mesh`, tables | `Mesh.parse` | `.text` (`str()` marks node axes: `[2*2]x2x2`) |
| {"x": 2, "y": 2, "z": 2} | `mw.shard(force={"mesh": ...})`, `mw.make_mesh`, JSON | `Mesh.parse` | `.sizes` / `.to_dict()` |
| (2, 2, 2) | benchmarks, `mw.make_mesh` | `Mesh.parse` | `.shape` |
| a jax `Mesh` over axes x, y, z | `mw.shard(mesh=...)` | `Mesh.of_jax` | `.jax(devices)` (`mw.make_mesh`) |

`Mesh.parse` takes any of them (and a `Mesh`), through `validate.mesh_shape`: a bad size or a
fourth axis is one `InvalidArgument` line. The cost model prices collectives on it (`size`,
`ring_steps`, the nodes an axis crosses), the lowering counts shards and local shapes on it
(`count`, `local_shape`, `fits`), the runtime keys and prints its layouts with it.

The axes are always x, y, z (sizes of 1 allowed): the paper's layouts name them so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

AXES = ("x", "y", "z")


@dataclass(frozen=True)
class Mesh:
    """A logical 3D mesh of chips, `x * y * z = n` (sizes of 1 allowed).

    `slow` gives, per axis, over how many nodes it runs (its outer factor; 1: the axis stays
    inside a node). A mesh with any factor > 1 spans `nodes` nodes of `chips_per_node` chips,
    and its collectives over those axes cross the slow network (`passes/network.py`).
    """

    x: int
    y: int
    z: int
    slow: tuple[int, int, int] = (1, 1, 1)

    def __post_init__(self) -> None:
        for a, s in zip(AXES, self.slow):
            if s < 1 or getattr(self, a) % s:
                raise ValueError(f"mesh axis {a}={getattr(self, a)} cannot run over {s} nodes "
                                 f"(nodes must divide the axis)")

    # ---- conversions --------------------------------------------------------------------
    @classmethod
    def parse(cls, value: Any, name: str = "mesh") -> Mesh:
        """A Mesh from "2x2x2", {"x": 2, ...}, (2, 2, 2), a jax Mesh or a Mesh (returned as
        is). One to three sizes, missing axes 1; `InvalidArgument` naming `name` otherwise."""
        if isinstance(value, Mesh):
            return value
        if hasattr(value, "axis_names") and hasattr(value, "devices"):
            return cls.of_jax(value)
        from meshwright.validate import mesh_shape

        return cls(*mesh_shape(value, name))

    @classmethod
    def of_jax(cls, mesh: Any) -> Mesh:
        """The sizes of a jax Mesh over (some of) the axes x, y, z."""
        return cls.parse(dict(mesh.shape))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(x, y, z)."""
        return (self.x, self.y, self.z)

    @property
    def sizes(self) -> dict[str, int]:
        """{"x": x, "y": y, "z": z}."""
        return {"x": self.x, "y": self.y, "z": self.z}

    def to_dict(self) -> dict:
        return self.sizes

    @property
    def text(self) -> str:
        """'2x2x2' (without the node marks of `str()`)."""
        return "x".join(str(s) for s in self.shape)

    def __str__(self) -> str:
        return "x".join(f"[{s}*{getattr(self, a) // s}]" if s > 1 else str(getattr(self, a))
                        for a, s in zip(AXES, self.slow))

    def jax(self, devices=None):
        """A jax Mesh of these sizes over `devices` (default: `jax.devices()`), laid over the
        nodes as `slow` says when it spans several (`mw.make_mesh`)."""
        from meshwright.passes.compiler import make_mesh

        return make_mesh(self.sizes, devices, slow=self.slow if self.nodes > 1 else None)

    # ---- chips and nodes ----------------------------------------------------------------
    @property
    def n(self) -> int:
        return self.x * self.y * self.z

    @property
    def nodes(self) -> int:
        """Nodes the mesh spans (1 unless an axis crosses nodes)."""
        return math.prod(self.slow)

    @property
    def chips_per_node(self) -> int:
        return self.n // self.nodes

    @property
    def slow_axes(self) -> dict[str, int]:
        """The axes that cross nodes, and over how many nodes each runs."""
        return {a: s for a, s in zip(AXES, self.slow) if s > 1}

    def size(self, axes) -> int:
        """Chips in a group spanning `axes` ("yz" or ("y", "z")): y * z."""
        return math.prod(getattr(self, a) for a in axes)

    count = size  # the lowering's name: shards over `axes`

    def slow_size(self, axes) -> int:
        """Nodes a group spanning `axes` reaches (1: the group stays inside a node)."""
        return math.prod(self.slow[AXES.index(a)] for a in axes)

    def inside_node(self) -> Mesh:
        """The part of the mesh inside one node: every axis divided by its node count."""
        return Mesh(*(getattr(self, a) // s for a, s in zip(AXES, self.slow)))

    def over_nodes(self, nodes: int) -> Mesh:
        """This mesh over `nodes` nodes as `mw.make_mesh` lays it out (`node_factors`)."""
        return Mesh(self.x, self.y, self.z, slow=node_factors(self.shape, nodes))

    def ring_steps(self, axes) -> int:
        """Neighbour exchanges of a collective done axis by axis: sum(a_i - 1)."""
        return sum(getattr(self, a) - 1 for a in axes)

    # ---- shards (the lowering) ----------------------------------------------------------
    def local_shape(self, shape, spec) -> tuple[int, ...]:
        """One device's block of an array of `shape` split as `spec` (a `sharding.Spec`)."""
        return tuple(s // self.count(d) for s, d in zip(shape, spec.dims))

    def fits(self, size: int, axes) -> bool:
        """`size` splits evenly over `axes`."""
        return size % self.count(axes) == 0


def node_factors(sizes, nodes: int) -> tuple[int, int, int]:
    """How many of `nodes` nodes each axis of a mesh of `sizes` (x, y, z) crosses when the
    outer axes take them first: x the largest share it divides, then y, then z.

        >>> node_factors((2, 2, 2), 2), node_factors((1, 2, 4), 4)
        ((2, 1, 1), (1, 2, 2))
    """
    out, rest = [], nodes
    for size in sizes:
        g = math.gcd(int(size), rest)
        out.append(g)
        rest //= g
    if rest != 1:
        raise ValueError(f"a {'x'.join(map(str, sizes))} mesh does not split over {nodes} "
                         f"nodes: {nodes} does not divide its {math.prod(sizes)} devices")
    return tuple(out)


def factorizations(n: int) -> list[Mesh]:
    """Every ordered X*Y*Z = n, including 1s, in a fixed order.

        >>> [str(m) for m in factorizations(4)]
        ['1x1x4', '1x2x2', '1x4x1', '2x1x2', '2x2x1', '4x1x1']
    """
    if n < 1:
        raise ValueError(f"chips must be >= 1, got {n}")
    meshes = []
    for x in range(1, n + 1):
        if n % x:
            continue
        for y in range(1, n // x + 1):
            if (n // x) % y == 0:
                meshes.append(Mesh(x, y, n // x // y))
    return meshes
