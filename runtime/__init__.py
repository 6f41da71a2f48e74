"""meshwright.runtime: serving with temporal fusion (Flover) on compiled model steps.

    >>> from meshwright.runtime import Engine, Request
    >>> engine = Engine("palm-tiny", max_slots=4, max_len=64)        # doctest: +SKIP
    >>> engine.generate([[1, 2, 3]], max_tokens=8)[0].tokens           # doctest: +SKIP

Modules: `request` (Request, SamplingParams, Result; plain data), `scheduler` (the
device-free state machine; imports no JAX), `kv_cache`, `sampling`, `engine`, `layouts`
(every bucket through `mw.shard` in its planned layout), `workload`, `bench`, `distributed` (multi-process jobs; `mw.distributed`), `distributed_engine` (the
engine across processes), `launch` (`meshwright launch`; imports no JAX). Names below are
imported lazily, so `meshwright.runtime.scheduler` stays usable without initialising JAX.
"""

import importlib
import importlib.util

_EXPORTS = {
    "Engine": "engine", "Bucket": "engine", "RequestHandle": "engine", "ServeReport": "engine",
    "StepClock": "engine", "DistributedEngine": "distributed_engine",
    "KVCache": "kv_cache", "batch_sharding": "kv_cache",
    "sharded_engine": "layouts", "plan_layouts": "layouts",
    "Request": "request", "Result": "request", "SamplingParams": "request",
    "Scheduler": "scheduler", "SchedulerOutput": "scheduler", "plan_moves": "scheduler",
    "sample": "sampling",
    "Workload": "workload", "make_workload": "workload", "summarize": "workload",
}

__all__ = ["Bucket", "DistributedEngine", "Engine", "KVCache", "Request", "RequestHandle",
           "Result", "SamplingParams", "Scheduler", "SchedulerOutput", "ServeReport", "StepClock",
           "Workload", "batch_sharding", "make_workload", "plan_layouts", "plan_moves", "sample",
           "sharded_engine", "summarize"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"meshwright.runtime.{_EXPORTS[name]}"), name)
    if importlib.util.find_spec(f"meshwright.runtime.{name}") is not None:
        return importlib.import_module(f"meshwright.runtime.{name}")  # mw.runtime.layouts
    raise AttributeError(f"module 'meshwright.runtime' has no attribute {name!r}")
