"""Pass `infer-axes`: what every tensor dimension means.

Two stages.

1. **Unify.** Every dimension of every value gets a symbol; per-primitive rules (a registry,
   `AXIS_RULES`, with a default for elementwise operations) say which dimensions are the same
   symbol: dot_general batch and contracting dimensions, reshape splits and merges (recorded as
   products, so `(B,T,H*D) -> (B,T,H,D)` knows `H*D` is heads times head_dim), transposes,
   broadcasts, reductions, gathers, cache updates, scan carries and per-layer slices...
   A primitive the rules do not know is reported, never guessed.

2. **Name.** Symbols get roles from the program's structure, not from variable names: the
   integer ids feeding an embedding gather give `batch` and `length`; the table gives `vocab`
   and `embed`; a dot_general of two activations followed by a softmax and a second
   dot_general is attention (contracted: `head_dim`; query-only: `heads`; key-only:
   `kv_length`); the head dimension of the key projection is `kv_heads`; a weight projection
   out of `embed` that comes back to `embed` through a nonlinearity is `mlp`; a stacked
   weight's scanned dimension is `layers`.

Where each part lives: the rules, one function per primitive, in `axis_rules` (`AXIS_RULES`);
the symbols they unify in `axis_symbols`; the naming in `axis_roles`; the structural facts
naming reads (weights, users, attention) in `passes.analysis`. This module runs them in order.

Results: `node.meta["axes"]` (per output, per dimension: a role or None) and
`graph.meta["axes"]`, an `AxesReport` with the size of every role and what stayed unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshwright.ir import Graph, Value
from meshwright.passes.analysis import analyze
from meshwright.passes.axis_roles import Namer, name_roles
from meshwright.passes.axis_rules import AXIS_RULES, unify_graph
from meshwright.passes.axis_symbols import AxisContext, Symbols
from meshwright.passes.base import Pass, PassContext, register

ROLES = ("batch", "length", "kv_length", "embed", "heads", "kv_heads", "head_dim", "mlp",
         "vocab", "layers", "groups", "fused")


@dataclass
class AxesReport:
    """What infer-axes found: the size of each role and what it could not label."""

    sizes: dict[str, int]  # role -> size (products like "heads*head_dim" included)
    unknown_primitives: list[str]  # "op at file:line: why"
    unlabelled: list[str]  # values with dimensions no role explains
    conflicts: list[str]  # unifications refused because sizes differed

    def to_dict(self) -> dict:
        return {"sizes": dict(self.sizes), "unknown_primitives": list(self.unknown_primitives),
                "unlabelled": list(self.unlabelled), "conflicts": list(self.conflicts)}


def infer_axes(g: Graph) -> AxesReport:
    """Label every dimension of every value in g (and its regions); returns the report."""
    syms = Symbols()
    ctx = AxisContext(syms, {}, [])
    unify_graph(ctx, g)
    syms.canonicalize()
    namer = Namer(syms, ctx.dims)
    name_roles(g, analyze(g), namer)
    syms.canonicalize()

    sizes: dict[str, int] = {}
    for c, role in sorted(namer.names.items()):
        sizes.setdefault(role, syms.size[c])
    unlabelled: list[str] = []
    _write_meta(g, namer, unlabelled)
    return AxesReport(sizes=sizes, unknown_primitives=ctx.unknown, unlabelled=unlabelled,
                      conflicts=syms.conflicts)


def _write_meta(g: Graph, n: Namer, unlabelled: list[str]) -> None:
    for node in g.topo_order():
        axes = []
        for o in node.outputs:
            labels = []
            for d, s in enumerate(n.dims.get(o.id, [])):
                role = n.role(s)
                if role is None and o.shape[d] == 1:
                    role = "1"
                labels.append(role)
            axes.append(tuple(labels))
            if any(lbl is None for lbl in labels) and node.op == "dot_general":
                unlabelled.append(f"{node.op} -> {list(o.shape)} at {node.source or '?'}")
        node.meta["axes"] = axes
        for body in node.region_graphs():
            _write_meta(body, n, unlabelled)


def axes_of(v: Value) -> tuple[str | None, ...]:
    """The role of each dimension of v (after infer-axes)."""
    return v.producer.meta["axes"][v.index]


@register
@dataclass(frozen=True)
class InferAxes(Pass):
    """Label every dimension with a role (batch, length, embed, heads, ...)."""

    name = "infer-axes"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        graph.meta["axes"] = infer_axes(graph)
        return graph


__all__ = ["AXIS_RULES", "ROLES", "AxesReport", "InferAxes", "axes_of", "infer_axes"]
