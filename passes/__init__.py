"""Passes over the graph IR: analyses (infer-axes, find-blocks, plan) and rewrites.

Every pass registers itself by name in `PASSES` when its module loads; `get_pass(name)` loads
the module of a pass named in `PASS_MODULES` on demand, so importing the planner alone does
not import JAX. `PIPELINE` lists mw.shard's stages in the order they run.
"""

from meshwright.passes.base import (
    ANALYSES,
    PASS_MODULES,
    PASSES,
    PIPELINE,
    STAGES,
    Force,
    Pass,
    PassContext,
    PassError,
    PassManager,
    Results,
    Stage,
    get_pass,
    pipeline_diagram,
    pipeline_passes,
    register,
)

__all__ = ["ANALYSES", "PASSES", "PASS_MODULES", "PIPELINE", "STAGES", "Force", "Pass",
           "PassContext", "PassError", "PassManager", "Results", "Stage", "get_pass",
           "pipeline_diagram", "pipeline_passes", "register"]
