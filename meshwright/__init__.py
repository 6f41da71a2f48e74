"""meshwright: shard Transformer inference across device meshes, on JAX.

    >>> import meshwright as mw
    >>> g = mw.trace(fn, *example_args)      # a dataflow graph of fn; g(*args) == fn(*args)
    >>> mw.plan(model="palm-540b", hardware="tpu-v4", chips=64, batch=64, phase="decode")

Submodules load on first use, so `meshwright plan` answers without initialising JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {name: "meshwright.api" for name in ("trace", "trace_model", "plan", "shard", "make_mesh")}
_SUBMODULES = ("ir", "models", "passes", "runtime")
# `mw.distributed`: multi-process jobs (runtime/distributed.py); `mw.load_exported`: an
# artifact of `step.export` / `meshwright export` (passes/export.py)
_ALIASES = {"distributed": "meshwright.runtime.distributed"}
_API["load_exported"] = "meshwright.passes.export"

__all__ = ["__version__", "distributed", "ir", "load_exported", "make_mesh", "models", "passes",
           "plan", "runtime", "shard", "trace", "trace_model"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"meshwright.{name}")
    if name in _ALIASES:
        return importlib.import_module(_ALIASES[name])
    raise AttributeError(f"module 'meshwright' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
