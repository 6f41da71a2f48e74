"""Pass `plan`: the analytical planner applied to a traced graph, and what runs.

The labelled, block-structured graph is summarised as a `TransformerConfig` (the same
description the presets use), so a traced model and its preset plan through one code path
and agree. The plan lands in `graph.meta["plan"]`; what runs -- the planner's best, or what
the caller pinned (`ctx.force`) -- in `ctx.results.choice` (a `LayoutChoice`), with the mesh
(`ctx.results.mesh`, and `ctx.results.jax_mesh` laid out over `ctx.devices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from meshwright.models.config import TransformerConfig
from meshwright.passes.base import Force, Pass, PassContext, register

if TYPE_CHECKING:
    from meshwright.ir import Graph

AXES = ("x", "y", "z")


class PlanError(ValueError):
    """The graph does not describe a Transformer the planner can cost; says what is missing."""


class NotAsPlanned(ValueError):
    """`mw.shard(..., strict=True)`: part of the program would run other than planned
    (replicated where the layout splits it); `reasons` lists each part and why."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        more = f" (and {len(reasons) - 2} more)" if len(reasons) > 2 else ""
        super().__init__(
            f"strict: {len(reasons)} part(s) would run replicated where the plan splits "
            f"them: {'; '.join(reasons[:2])}{more}. Pick a mesh and layouts whose sizes "
            "divide these dimensions (or a batch that does), or drop strict to run them "
            "replicated (explain() lists them all)")


def config_from_graph(g: Graph) -> TransformerConfig:
    """The Transformer shape a labelled graph describes (needs infer-axes and find-blocks)."""
    if "axes" not in g.meta or "blocks" not in g.meta:
        raise PlanError("planning needs the 'infer-axes' and 'find-blocks' passes first")
    sizes = g.meta["axes"].sizes
    blocks = g.meta["blocks"]
    attention, ffn = blocks.of_kind("attention"), blocks.of_kind("ffn")
    missing = [role for role in ("embed", "head_dim") if role not in sizes]
    if not attention:
        missing.append("an attention block")
    if missing:
        raise PlanError(f"graph {g.name!r} has no {', '.join(missing)}; the planner costs "
                        f"Transformers (found blocks: {sorted({b.kind for b in blocks.blocks})})")
    first = attention[0].detail
    dtypes = {str(v.dtype) for v in g.inputs if np.issubdtype(v.dtype, np.floating)
              or str(v.dtype) == "bfloat16"}
    activation = "swiglu" if ffn and ffn[0].detail.get("activation") in ("swiglu", "geglu") \
        else "gelu"
    unembed = blocks.of_kind("unembedding")
    d_ff = sizes.get("mlp", 4 * sizes["embed"])
    return TransformerConfig(
        name=g.name, family="palm" if blocks.count("parallel") else "gpt2",
        n_layers=blocks.count("attention"), d_model=sizes["embed"], d_ff=d_ff,
        n_heads=first["heads"], n_kv_heads=first["kv_heads"], d_head=first["head_dim"],
        vocab_size=sizes.get("vocab", 1), max_len=sizes.get("kv_length", sizes.get("length", 1)),
        parallel_block=blocks.count("parallel") > 0, activation=activation,
        positions="learned" if "positions" in sizes else "rope",
        tie_embeddings=bool(unembed and unembed[0].detail.get("tied")),
        dtype="bfloat16" if "bfloat16" in dtypes else "float32")


def workload_from_graph(g: Graph) -> dict:
    """batch, context and phase of the traced step: prefill when it has a `length` dimension."""
    sizes = g.meta["axes"].sizes
    phase = "prefill" if sizes.get("length", 1) > 1 else "decode"
    context = sizes.get("length", 1) if phase == "prefill" else sizes.get("kv_length", 1)
    return {"batch": sizes.get("batch", 1), "context": context, "phase": phase}


@dataclass(frozen=True)
class LayoutChoice:
    """What runs: the planner's best, or what the caller pinned, on one mesh."""

    plan: Any  # the planner's Plan (None: a graph it cannot price, with the layouts pinned)
    ffn: str  # the FFN layout (LAYOUT_NAMES_FFN)
    attention: str  # the attention layout (LAYOUT_NAMES_ATTENTION)
    mesh_shape: dict[str, int]  # {"x": X, "y": Y, "z": Z}
    predicted: Any = None  # the cost model's CandidateCost of this choice (None: not priced)
    slow: tuple[int, int, int] = (1, 1, 1)  # nodes (processes) each mesh axis runs over


def pinned_mesh_shape(force: Force, chips: int) -> dict[str, int]:
    """The mesh `force` pins (default: all `chips` on z), checked against the chips."""
    if force.mesh is None:
        return {"x": 1, "y": 1, "z": chips}
    shape = dict(zip(AXES, force.mesh))
    if int(np.prod(list(shape.values()))) != chips:
        raise ValueError(f"forced mesh {shape} does not use the {chips} devices given")
    return shape


def choose(config: TransformerConfig | None, work: dict, request: dict,
           force: Force, graph: Graph | None = None) -> LayoutChoice:
    """What runs, in four steps:

    1. Plan `config` for `request` (plan_config's arguments: hardware, chips, nodes, batch,
       context, phase, weights, the pinned layouts); across nodes, the best way mw.shard
       lowers for the traced `graph` (`_lowerable`). A graph the planner cannot price, or a request it refuses,
       runs only with both layouts pinned.
    2. No pinned mesh: the plan's best candidate.
    3. A pinned mesh: the plan's best candidate on it (the pinned layouts hold),
    4. else the pinned layouts (or the plan's) on it, priced by the cost model if it can.
    """
    from meshwright.passes.compiler import _lowerable, node_factors
    from meshwright.passes.cost_model import LayoutNotApplicable, Mesh, StepWorkload, evaluate
    from meshwright.passes.hardware import get_hardware
    from meshwright.passes.planner import plan_config

    # 1. the plan
    plan = None
    if config is not None:
        try:
            plan = _lowerable(plan_config(config, **request), config, request, graph)
        except ValueError:
            if not (force.ffn and force.attention):
                raise
    # 2. no pinned mesh: the planner's best
    if force.mesh is None and plan is not None:
        best = plan.best
        return LayoutChoice(plan, best.ffn_layout, best.attention_layout,
                            {"x": best.mesh.x, "y": best.mesh.y, "z": best.mesh.z}, best,
                            best.mesh.slow)
    mesh_shape = pinned_mesh_shape(force, request["chips"])
    nodes = plan.nodes if plan is not None else (request["nodes"] or 1)
    slow = node_factors([mesh_shape[a] for a in AXES], nodes)
    if config is None:
        return LayoutChoice(None, force.ffn, force.attention, mesh_shape, None, slow)
    # 3. the planner's best candidate on the pinned mesh
    on_mesh = [cand for cand in (plan.candidates if plan else [])
               if (cand.mesh.x, cand.mesh.y, cand.mesh.z, tuple(cand.mesh.slow)) ==
               (*(mesh_shape[a] for a in AXES), slow)]
    if on_mesh:
        best = on_mesh[0]
        return LayoutChoice(plan, best.ffn_layout, best.attention_layout, mesh_shape, best,
                            slow)
    # 4. the pinned layouts on it, priced where the cost model can
    ffn = force.ffn or (plan.best.ffn_layout if plan else "ws-2d")
    attention = force.attention or (plan.best.attention_layout if plan else "heads")
    try:
        predicted = evaluate(config, get_hardware(request["hardware"]),
                             Mesh(**mesh_shape, slow=slow),
                             StepWorkload(work["batch"], request["context"], request["phase"],
                                      request["weights"]), ffn, attention)
    except (LayoutNotApplicable, ValueError):
        predicted = None
    return LayoutChoice(plan, ffn, attention, mesh_shape, predicted, slow)


@register
@dataclass(frozen=True)
class PlanPass(Pass):
    """Choose mesh factorisation and layouts with the analytical model (Pope et al.), and
    what runs: `ctx.results.choice`, the mesh (`ctx.results.mesh`, laid out over
    `ctx.devices` as `ctx.results.jax_mesh`). Each option defaults to the context's."""

    name = "plan"
    hardware: str | None = None  # default: ctx.hardware
    chips: int | None = None  # default: the context's device count, else 8
    batch: int | None = None  # default: the traced batch
    context: int | None = None  # default: the traced length (prefill) or cache length (decode)
    phase: str | None = None  # default: ctx.phase, "auto": from the traced shapes
    weights: str | None = None  # default: ctx.weights ("native": the traced dtype's)
    force_ffn: str | None = None  # default: ctx.force.ffn
    force_attention: str | None = None  # default: ctx.force.attention

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        from meshwright.passes.compiler import node_groups
        from meshwright.passes.sharding import MeshInfo

        force = Force(self.force_ffn or ctx.force.ffn,
                      self.force_attention or ctx.force.attention, ctx.force.mesh,
                      ctx.force.cross_node, ctx.force.microbatches)
        try:
            config = config_from_graph(graph)
        except PlanError as e:  # not a Transformer the cost model can price
            if not (force.ffn and force.attention):
                raise PlanError(f"{e}. Pin the layout with force={{'ffn': ..., "
                                f"'attention': ...}} to shard it anyway") from None
            config = None
        work = workload_from_graph(graph)
        phase = self.phase or (work["phase"] if ctx.phase == "auto" else ctx.phase)
        weights = self.weights or ctx.weights
        if weights == "native":
            weights = "bf16" if config is not None and config.dtype == "bfloat16" else "fp32"
        nodes = len(node_groups(ctx.devices)) if ctx.devices else 1
        request = {"hardware": self.hardware or ctx.hardware,
                   "chips": self.chips or len(ctx.devices) or 8,
                   "batch": self.batch or work["batch"],
                   "context": self.context or work["context"], "phase": phase,
                   "weights": weights, "force_ffn": force.ffn,
                   "force_attention": force.attention, "nodes": nodes if nodes > 1 else None,
                   "cross_node": force.cross_node, "microbatches": force.microbatches,
                   "blocks": graph.meta["blocks"].to_list() if config is not None else None}
        choice = choose(config, work, request, force, graph)
        graph.meta["plan"] = choice.plan
        ctx.results.config, ctx.results.choice = config, choice
        ctx.results.mesh = MeshInfo(choice.mesh_shape)
        if ctx.devices:  # axes that cross nodes run over them as the plan priced
            from meshwright.passes.compiler import make_mesh

            ctx.results.jax_mesh = make_mesh(choice.mesh_shape, list(ctx.devices),
                                             slow=choice.slow)
        return graph
