"""The public face of meshwright: thin functions over the library packages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshwright.ir import Graph


def trace(fn: Callable, *example_args: Any, **example_kwargs: Any) -> Graph:
    """Trace `fn` into a `meshwright.ir.Graph`; `g(*args)` then equals `fn(*args)`.

        >>> import jax.numpy as jnp, meshwright as mw
        >>> g = mw.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
        >>> print(g)
        graph(%x:f32[3]) {
          %0:f32[3] = sin %x
          %1:f32[3] = mul %0 2.0:f32[]
          return %1
        }
    """
    from meshwright.ir import trace as _trace

    return _trace(fn, *example_args, **example_kwargs)


def trace_model(config, phase: str = "decode", batch: int = 2, length: int = 8,
                seed: int = 0) -> Graph:
    """Trace a bundled reference model's prefill or decode step for a config."""
    import jax

    from meshwright.models import build

    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    model = build(config)
    args = model.example_args(phase, batch=batch, length=length, key=jax.random.PRNGKey(seed))
    return trace(model.fn(phase), *args)


def run_passes_until(graph: Graph, after: str, **plan_options) -> Graph:
    """Run mw.shard's pipeline (`meshwright.passes.PIPELINE`) on a traced graph up to and
    including the pass named `after`, one of the stages before the mesh is needed (trace
    through plan); `plan_options` configure the plan pass."""
    from meshwright.passes import STAGES, PassContext, PassManager, get_pass, pipeline_passes

    if after == "trace":
        return graph
    shown = STAGES[1:STAGES.index("plan") + 1]
    if after not in shown:
        needs_mesh = f" ({after!r} needs the mesh: step.graph_text(*args, after={after!r}))" \
            if after in STAGES else ""
        raise ValueError(f"unknown pass {after!r}; the pipeline is: trace, "
                         f"{', '.join(shown)}{needs_mesh}")
    names = pipeline_passes(PassContext())[:shown.index(after) + 1]
    passes = [get_pass(n, **plan_options) if n == "plan" else n for n in names]
    return PassManager(passes, verify=True).run(graph)


def plan(model: str | Any = "palm-tiny", hardware: str = "tpu-v4", chips: int = 64,
         batch: int | None = None, context: int | None = None, phase: str | None = None,
         weights: str = "bf16", gen_tokens: int = 64, force_ffn: str | None = None,
         force_attention: str | None = None, kv_memory_fraction: float | None = None,
         overrides: tuple[str, ...] = ()):
    """The analytical planner alone, on a preset name, a TransformerConfig or a traced Graph.

        >>> p = mw.plan(model="palm-540b", hardware="tpu-v4", chips=64, batch=64,
        ...             context=2048, phase="decode", weights="int8")
        >>> p.ffn_layout, p.attention_layout
        ('ws-2d', 'batch')

    For a Graph, batch, context and phase default to the traced shapes.
    """
    from meshwright import validate
    from meshwright.passes import PassManager
    from meshwright.passes import planner as _planner
    from meshwright.passes.plan import config_from_graph, workload_from_graph

    chips = validate.slice_chips(chips, hardware, "chips")  # a size the hardware comes in
    batch = None if batch is None else validate.batch(batch)
    context = None if context is None else validate.length(context, "context")
    gen_tokens = validate.positive_int(gen_tokens, "gen_tokens")
    if kv_memory_fraction is not None:
        kv_memory_fraction = validate.fraction(kv_memory_fraction, "kv_memory_fraction")

    extra = {} if kv_memory_fraction is None else {"kv_memory_fraction": kv_memory_fraction}
    common = dict(hardware=hardware, chips=chips, weights=weights, gen_tokens=gen_tokens,
                  force_ffn=force_ffn, force_attention=force_attention, **extra)
    graph_module = sys.modules.get("meshwright.ir.graph")  # no IR loaded: not a Graph
    if graph_module is not None and isinstance(model, graph_module.Graph):
        g = model
        if "axes" not in g.meta or "blocks" not in g.meta:
            g = PassManager(["infer-axes", "find-blocks"]).run(g)
        config = config_from_graph(g)
        if overrides:
            config = config.with_overrides(list(overrides))
        work = workload_from_graph(g)
        return _planner.plan_config(
            config, batch=batch or work["batch"], context=context or work["context"],
            phase=phase or work["phase"], blocks=g.meta["blocks"].to_list(), **common)
    return _planner.plan(model, batch=batch or 64, context=context or 2048,
                         phase=phase or "decode", overrides=overrides, **common)


def make_mesh(shape, devices=None, slow=None):
    """A device mesh with axes x, y, z: `mw.make_mesh({"x": 2, "y": 2, "z": 2})`.

    Over several processes' devices (`meshwright launch`) each process is a node and the
    mesh is hybrid: an axis crosses nodes with its outer factor, `slow={"x": 2}` (default:
    the outer axes take the nodes first); in one process `slow` treats consecutive blocks of
    the devices as nodes.

    Raises `meshwright.validate.InvalidArgument` (a ValueError) for a size below 1, an axis
    not named x, y or z, more than three axes, or more devices than JAX has (naming the
    XLA_FLAGS line that simulates them on CPU); a ValueError naming the numbers for a slow
    factor that does not divide its axis or does not match the processes, and for processes
    holding unequal numbers of the devices."""
    from meshwright.passes.compiler import make_mesh as _make_mesh

    return _make_mesh(shape, devices, slow=slow)


def shard(fn=None, *, mesh=None, phase: str = "auto", hardware: str | None = None,
          weights: str = "native", passes=None, force: dict | None = None,
          collective_einsum="auto", donate_argnums: int | tuple[int, ...] = (),
          strict: bool = False):
    """Compile a function for a device mesh and run it there; decorator or call form.

        >>> @mw.shard(mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}), force={"ffn": "ws-2d"})
        ... def step(params, tokens, cache, positions): ...
        >>> logits, cache = step(params, tokens, cache, positions)
        >>> step.explain(params, tokens, cache, positions)   # why this layout; what ran replicated
        >>> step.report(params, tokens, cache, positions)    # predicted vs measured collective bytes

    `collective_einsum`: "auto" (loop a matmul's all-gather / reduce-scatter as ppermute
    steps where the hardware profile says the overlap pays; on the simulated CPU mesh it
    never does), "on", "off", or a configured `CollectiveEinsum` pass. `donate_argnums` as in
    `jax.jit`: `donate_argnums=2` lets a decode step update its KV cache in place on every
    device (the arrays passed in are deleted by the call).

    Anything that would run other than planned -- a value the layout splits whose size does
    not divide over its mesh axes, an operation lowered replicated -- runs replicated
    (correct) and is listed with its reason in `explain()`, `report()["replicated_fallbacks"]`
    and an export's manifest; `strict=True` makes it an error (`NotAsPlanned`, a ValueError).
    """
    from meshwright.passes.compiler import shard as _shard

    return _shard(fn, mesh=mesh, phase=phase, hardware=hardware, weights=weights,
                  passes=passes, force=force, collective_einsum=collective_einsum,
                  donate_argnums=donate_argnums, strict=strict)
