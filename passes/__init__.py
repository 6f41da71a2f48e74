"""Passes over the graph IR: analyses (infer-axes, find-blocks, plan) and rewrites.

Every pass registers itself by name in `PASSES` when its module loads; `get_pass(name)` loads
the module of a pass named in `PASS_MODULES` on demand, so importing the planner alone does
not import JAX.
"""

from meshwright.passes.base import (
    PASS_MODULES,
    PASSES,
    Pass,
    PassContext,
    PassError,
    PassManager,
    get_pass,
    register,
)

__all__ = ["PASSES", "PASS_MODULES", "Pass", "PassContext", "PassError", "PassManager",
           "get_pass", "register"]
