"""Stored layout of fused projection weights: each shard holds its share of every part.

A fused Q/K/V weight (GPT-2's `c_attn`, E x (H + 2K)·D) is multiplied once and its output is
cut apart along the fused dimension (`split`). When the layout splits that dimension over n
devices, device d holds columns [d·F/n, (d+1)·F/n) of [Q | K | V] — a piece of Q on some
devices, of V on others — and the split can only run after an all-gather of the whole fused
activation. Megatron-LM stores such weights interleaved instead; so does meshwright:

    columns stored:  [Q_0 K_0 V_0 | Q_1 K_1 V_1 | ... | Q_{n-1} K_{n-1} V_{n-1}]
    (Q_d = Q's columns [d·|Q|/n, (d+1)·|Q|/n))

so that shard d of the product is [Q_d K_d V_d] and the split is local: every part keeps the
sharding, nothing is gathered. The permutation is applied to the weight (and to a bias added
before the split) once, when the arguments are placed on the mesh (`Compiled.place`), never per
step. It is an annotation for `lower`, like a sharding: the graph keeps its original meaning
and the interpreter never sees permuted weights.

What it matches: `split` along dimension a of a value that is a weight dot_general's output
(a free dimension of the weight), optionally through elementwise ops with a bias broadcast
along a, where
- annotate asked for the dot's output to be split over mesh axes A on dimension a,
- every part size is a multiple of n = |A|,
- the weight (and the bias) reach this dot and nothing else, from a top-level argument (through
  scan boundaries: a stacked weight's layers axis is kept),
- no value between the dot and the split is used elsewhere.

Results: `split.meta["interleave"] = {"axes": A, "sizes": sizes}` (lower splits locally) and
`graph.meta["load_transforms"][i]` for every permuted argument i: `Interleave(dim, sizes, n)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from meshwright.ir import Graph, Literal, Node, Value
from meshwright.passes.base import Pass, PassContext, register
from meshwright.passes.sharding import MeshInfo

_ELEMENTWISE = frozenset({"add", "sub", "mul", "convert_element_type", "copy"})


@dataclass(frozen=True)
class Interleave:
    """Permute dimension `dim` of an argument from [P_0 | P_1 | ...] (part sizes `sizes`) to
    n shards of [P_0,d | P_1,d | ...]."""

    dim: int
    sizes: tuple[int, ...]
    shards: int

    def permutation(self) -> np.ndarray:
        offsets = np.cumsum((0,) + self.sizes[:-1])
        cols = [off + d * (s // self.shards) + np.arange(s // self.shards)
                for d in range(self.shards) for off, s in zip(offsets, self.sizes)]
        return np.concatenate(cols)

    def __call__(self, x):
        return [jnp.take(jnp.asarray(x), jnp.asarray(self.permutation()), axis=self.dim)]

    def input_spec(self, spec: tuple) -> tuple:
        """The argument's partition spec when its permutation is placed with `spec`."""
        return tuple(spec)

    def describe(self) -> str:
        return (f"interleave dim {self.dim}: parts {list(self.sizes)} as {self.shards} shards "
                f"of [{' | '.join(f'{s // self.shards}' for s in self.sizes)}]")


def _uses(g: Graph, v: Value) -> list[Node]:
    return [n for n in g.users(v) for x in n.inputs if x is v]


def _used_once(v: Value) -> bool:
    """`v` feeds exactly one operand of one node and is not an output of its graph."""
    g = v.producer.graph
    return len(_uses(g, v)) == 1 and not g.is_output(v)


def _argument(v: Value, dim: int, owners: dict[int, Node]) -> tuple[Value, int] | None:
    """Follow `v` (used once) back to a top-level argument: (argument, the dim there), or None
    when it comes from anything but a plain argument (possibly through scans) or is used
    elsewhere on the way."""
    while True:
        p = v.producer
        g = p.graph
        if p.op != "input":
            return None
        owner = owners.get(id(g))
        if owner is None:
            return v, dim
        scan = owner
        if scan.op != "scan":
            return None
        i = g.inputs.index(v)
        n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
        if n_consts <= i < n_consts + n_carry:
            return None
        outer = scan.inputs[i]
        if not isinstance(outer, Value) or not _used_once(outer):
            return None
        if i >= n_consts + n_carry:
            dim += 1  # the stacked layers axis
        v = outer


def _bias_argument(v: Value, axis: int, owners: dict[int, Node]):
    """A bias added along `axis`: broadcast_in_dim of a vector, used once; its argument."""
    if isinstance(v, Literal):
        return ()
    p = v.producer
    if p.op != "broadcast_in_dim" or not _used_once(v):
        return None
    src = p.inputs[0]
    if not isinstance(src, Value) or not _used_once(src):
        return None
    dims = p.params["broadcast_dimensions"]
    if axis not in dims:
        return ()  # constant along the fused axis: no permutation needed
    found = _argument(src, dims.index(axis), owners)
    return None if found is None else (found,)


def _match(split: Node, owners: dict[int, Node], mesh: MeshInfo, weights: set[int]):
    axis = split.params["axis"]
    sizes = tuple(int(x) for x in split.params["sizes"])
    v = split.inputs[0]
    if not isinstance(v, Value) or not _used_once(v):
        return None
    extra = []
    while v.producer.op in _ELEMENTWISE:
        p = v.producer
        nxt = next((x for x in p.inputs if isinstance(x, Value) and x.shape == v.shape and
                    x.producer.op in _ELEMENTWISE | {"dot_general"}), None)
        if nxt is None:
            return None
        for o in p.inputs:
            if o is nxt:
                continue
            bias = _bias_argument(o, axis, owners)
            if bias is None:
                return None
            extra += list(bias)
        if not _used_once(nxt):
            return None
        v = nxt
    dot = v.producer
    if dot.op != "dot_general":
        return None
    target = (dot.meta.get("target") or [None])[0]
    if target is None or not target.dims[axis] or target.partial:
        return None
    axes = tuple(target.dims[axis])
    n = mesh.count(axes)
    if n <= 1 or any(s % n for s in sizes):
        return None
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    lhs, rhs = dot.inputs
    n_batch = len(lb)
    lhs_free = [d for d in range(len(lhs.shape)) if d not in lc and d not in lb]
    rhs_free = [d for d in range(len(rhs.shape)) if d not in rc and d not in rb]
    if axis < n_batch:
        return None
    if axis < n_batch + len(lhs_free):
        w, wdim = lhs, lhs_free[axis - n_batch]
    else:
        w, wdim = rhs, rhs_free[axis - n_batch - len(lhs_free)]
    if not isinstance(w, Value) or not _used_once(w):
        return None
    found = _argument(w, wdim, owners)
    if found is None or found[0].id not in weights:
        return None
    return axes, sizes, n, [found] + extra


def interleave_fused(g: Graph, mesh: MeshInfo) -> Graph:
    """Mark every fused split that can run locally; record the argument permutations in
    `g.meta["load_transforms"]`. Run after `annotate`."""
    owners = g.region_owners()
    weights = set(g.meta.get("weight_values", ()))
    transforms = g.meta.setdefault("load_transforms", {})
    index = {v.id: i for i, v in enumerate(g.inputs)}
    for node, _ in list(g.walk()):
        if node.op != "split" or "interleave" in node.meta:
            continue
        found = _match(node, owners, mesh, weights)
        if found is None:
            continue
        axes, sizes, n, args = found
        if any(index.get(a.id) in transforms for a, _ in args):
            continue  # already permuted for another split
        for arg, dim in args:
            transforms[index[arg.id]] = [Interleave(dim, sizes, n)]
        node.meta["interleave"] = {"axes": axes, "sizes": sizes}
    return g


@register
@dataclass(frozen=True)
class InterleaveFused(Pass):
    """Fused projection weights stored interleaved, so that their split runs on each shard
    (see the module docstring). Run after `annotate`, with the mesh."""

    name = "interleave-fused"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        mesh = ctx.results.mesh
        if mesh is None or "in_specs" not in graph.meta:
            raise ValueError("interleave-fused needs 'annotate' first (and the mesh 'plan' "
                             "chose)")
        interleave_fused(graph, mesh)
        for i, steps in graph.meta.get("load_transforms", {}).items():
            ctx.results.load_transforms[i] = list(steps)
        return graph
