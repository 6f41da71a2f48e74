"""Pass `plan`: the analytical planner applied to a traced graph.

The labelled, block-structured graph is summarised as a `TransformerConfig` (the same
description the presets use), so a traced model and its preset plan through one code path
and agree. The plan lands in `graph.meta["plan"]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from meshwright.models.config import TransformerConfig
from meshwright.passes.base import Pass, PassContext, register

if TYPE_CHECKING:
    from meshwright.ir import Graph


class PlanError(ValueError):
    """The graph does not describe a Transformer the planner can cost; says what is missing."""


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


@register
@dataclass(frozen=True)
class PlanPass(Pass):
    """Choose mesh factorisation and layouts with the analytical model (Pope et al.)."""

    name = "plan"
    hardware: str = "tpu-v4"
    chips: int | None = None  # default: the mesh's device count, else 8
    batch: int | None = None  # default: the traced batch
    context: int | None = None  # default: the traced length (prefill) or cache length (decode)
    phase: str | None = None  # default: from the traced shapes
    weights: str = "bf16"
    force_ffn: str | None = None
    force_attention: str | None = None

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        from meshwright.passes.planner import plan_config

        config = config_from_graph(graph)
        work = workload_from_graph(graph)
        mesh = ctx.options.get("mesh")
        chips = self.chips or (mesh.devices.size if mesh is not None else 8)
        graph.meta["plan"] = plan_config(
            config, hardware=self.hardware, chips=chips,
            batch=self.batch or work["batch"], context=self.context or work["context"],
            phase=self.phase or work["phase"], weights=self.weights,
            force_ffn=self.force_ffn, force_attention=self.force_attention,
            blocks=graph.meta["blocks"].to_list())
        return graph
