"""Passes over the graph IR: analyses (infer-axes, find-blocks, plan) and rewrites.

Every pass registers itself by name in `PASSES`; `PassManager` runs a list of them.
"""

from meshwright.passes import find_blocks, infer_axes  # noqa: F401  (register the passes)
from meshwright.passes.base import (PASSES, Pass, PassContext, PassError, PassManager, get_pass,
                                    register)

__all__ = ["PASSES", "Pass", "PassContext", "PassError", "PassManager", "get_pass", "register"]
