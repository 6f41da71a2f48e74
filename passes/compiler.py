"""`mw.shard`: trace, then the pass pipeline (`meshwright.passes.PIPELINE`) to a jitted
`shard_map` program; compile, run. And the pipeline's last pass, `lower`.

    step = mw.shard(model.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}))
    logits, cache = step(params, tokens, cache, positions)   # compiled once per signature
    step.plan(*args); step.explain(*args); step.graph(*args, after="lower"); step.report(*args)

The compile boundary is `ShardedFunction._compile`, once per input signature (tree structure,
shapes, dtypes):

1. trace the function into a Graph;
2. run `PassManager(pipeline_passes(ctx))` over it, the `PassContext` holding the caller's
   options (devices, hardware, phase, weights, force, strict, donated arguments) and the
   typed results the passes leave one another (`ctx.results`);
3. build the `Compiled` record from the graph and those results.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import Mesh as JaxMesh
from meshwright.ir import Graph, trace
from meshwright.passes.base import (
    STAGES,
    Force,
    Pass,
    PassContext,
    PassManager,
    pipeline_passes,
    register,
)
from meshwright.passes.hlo import collective_bytes
from meshwright.passes.lower import LowerContext, Lowered, lower_graph
from meshwright.passes.mesh import AXES, node_factors  # the mesh: passes/mesh.py
from meshwright.passes.plan import NotAsPlanned
from meshwright.passes.sharding import (
    LAYOUT_NAMES_ATTENTION,
    LAYOUT_NAMES_FFN,
    Emitter,
    Spec,
)


def make_mesh(shape: dict[str, int] | tuple[int, ...], devices=None,
              slow: dict[str, int] | tuple[int, ...] | None = None) -> JaxMesh:
    """A mesh with axes x, y, z (missing ones of size 1), e.g. make_mesh({"x": 2, "y": 4}).

    Over the devices of several processes (nodes) the mesh is hybrid, as
    `jax.experimental.mesh_utils.create_hybrid_device_mesh` lays it out: axis a runs over
    `slow[a]` nodes (its outer factor) and a / slow[a] devices inside each. `slow` defaults
    to the nodes taken by the outer axes first (`node_factors`: 2 processes of 4 devices as
    a 2x2x2 mesh: x crosses them); in one process it says which consecutive blocks of the
    devices to treat as nodes (default: none).

        >>> mesh = mw.make_mesh({"x": 2, "y": 2, "z": 2})
        >>> mesh = mw.make_mesh({"x": 4, "y": 2}, slow={"x": 2})  # x over 2 nodes
    """
    from meshwright.validate import enough_devices, mesh_shape

    sizes = mesh_shape(shape, "mesh")  # InvalidArgument for 0, negative or a 4th axis
    devices = list(devices if devices is not None else jax.devices())
    n = int(np.prod(sizes))
    enough_devices(n, len(devices), f"a {'x'.join(map(str, sizes))} mesh")
    devices = devices[:n]
    groups = node_groups(devices)
    if slow is None and len(groups) == 1:
        return JaxMesh(np.array(devices).reshape(sizes), AXES,
                       axis_types=(AxisType.Auto,) * 3)
    text = "x".join(map(str, sizes))
    if slow is None:
        slow = node_factors(sizes, len(groups))
    else:
        slow = tuple(int(slow.get(a, 1)) for a in AXES) if isinstance(slow, dict) \
            else tuple(int(s) for s in slow) + (1,) * (3 - len(slow))
        for a, size, s in zip(AXES, sizes, slow):
            if s < 1 or size % s:
                raise ValueError(f"mesh {text}: axis {a}={size} cannot run over {s} nodes "
                                 f"(the nodes an axis crosses must divide it)")
        nodes = int(np.prod(slow))
        if len(groups) == 1:  # one process: consecutive blocks of the devices as nodes
            groups = [devices[k * n // nodes:(k + 1) * n // nodes] for k in range(nodes)]
        elif nodes != len(groups):
            raise ValueError(f"mesh {text} with slow={dict(zip(AXES, slow))} spans {nodes} "
                             f"nodes; its devices are on {len(groups)} processes: the nodes "
                             f"the axes cross must multiply to {len(groups)}")
    inner = [size // s for size, s in zip(sizes, slow)]
    grid = np.empty((len(groups), n // len(groups)), dtype=object)
    for k, g in enumerate(groups):
        grid[k, :] = g
    # (node x, node y, node z, in-node x, y, z) -> each axis its node factor outside
    grid = grid.reshape(*slow, *inner).transpose(0, 3, 1, 4, 2, 5).reshape(sizes)
    return JaxMesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def where_nodes(mesh) -> str:
    """What a node is for a mesh: a process of a job over several, or in one process a block
    of its devices (the hardware profile's nodes simulated)."""
    processes = {d.process_index for d in np.asarray(mesh.devices).flat}
    return "a process" if len(processes) > 1 else "a block of this process's devices"


def node_groups(devices) -> list[list]:
    """The devices of each node: one node per process of a multi-process job (in process
    order), else one. Processes must hold equally many of the devices: a ValueError naming
    the counts otherwise."""
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(int(getattr(d, "process_index", 0)), []).append(d)
    counts = {p: len(v) for p, v in sorted(by_process.items())}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"process {p}: {c}" for p, c in counts.items())
        raise ValueError(f"the processes hold unequal numbers of the mesh's devices ({listed});"
                         " a mesh over processes needs the same number from each: start every"
                         " process with the same device count (meshwright launch does)")
    return [by_process[p] for p in sorted(by_process)]


# What mw.shard lowers of the planner's ways across nodes (passes/multinode.py): a layout
# stretched over the nodes is the paper's layout on the bigger mesh, only priced otherwise;
# replicas split the batch over a mesh axis outside it (passes/replicas.py); pipeline stages
# split the layers of a scan over another (passes/stages.py), when the function allows.
LOWERED_CROSSINGS = ("replicas", "stretched", "pipeline")


def _why_not_lowered(x, graph) -> str | None:
    """Why mw.shard cannot lower the way across nodes `x` for the traced `graph`, or None."""
    if x.kind not in LOWERED_CROSSINGS:
        return "not lowered yet"
    if x.kind != "pipeline":
        return None
    if graph is None:
        return "no traced function to split"
    from meshwright.passes.stages import lowerable

    return lowerable(graph, x.stages)


def _lowerable(plan, config, request: dict, graph=None):
    """`plan`, or across nodes when its way of crossing them is not lowered (for the traced
    `graph`), the plan of the best one that is, with a note saying what was set aside, why
    and at what price; a ValueError naming the reasons when none runs."""
    from meshwright.passes.planner import plan_config

    if plan.nodes == 1:
        return plan
    x = plan.cross_node
    why = _why_not_lowered(x, graph)
    if why is None:
        return plan
    runs = [c for c in plan.cross_node_candidates if _why_not_lowered(c, graph) is None]
    if not runs:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in plan.cross_node_rejected
                            if any(k in name for k in LOWERED_CROSSINGS)) or "not priced"
        raise ValueError(
            f"{plan.chips} devices on {plan.nodes} nodes: the planner chose {x.label}, which "
            f"mw.shard does not lower ({why}), and no other way across the nodes runs "
            f"({reasons}); pin ffn, attention and mesh in force= to lower a layout anyway")
    chosen = plan_config(config, **{**request, "nodes": plan.nodes,
                                    "cross_node": runs[0].kind})
    chosen.forced["cross_node"] = f"{runs[0].kind} (what mw.shard lowers)"
    chosen.notes.append(
        f"the planner's best across {plan.nodes} nodes is {x.label} ({x.step_s * 1e3:.3g} "
        f"ms/step); mw.shard does not lower it ({why}), so this runs "
        f"{chosen.cross_node.label} ({chosen.cross_node.step_s * 1e3:.3g} ms/step)")
    return chosen


def _mesh_devices(mesh) -> list:
    if mesh is None:
        return list(jax.devices())
    if isinstance(mesh, JaxMesh):
        return list(np.asarray(mesh.devices).reshape(-1))
    if isinstance(mesh, dict):
        return list(np.asarray(make_mesh(mesh).devices).reshape(-1))
    raise TypeError(f"mesh must be a jax.sharding.Mesh or a dict of axis sizes, got {mesh!r}")


def convert_argument(steps: list, x) -> list:
    """One argument through its load-time conversions (`Compiled.load_transforms[i]`): the
    arrays the program takes in its place (int8: values, scale). Traceable: an exported
    program's conversion (passes/export.py) is these steps under `jax.jit`."""
    ys = [x]
    for step in steps:
        ys = [z for y in ys for z in step(y)]
    return ys


@dataclass
class Compiled:
    """Everything one compilation produced, for one input signature."""

    graph: Graph  # after every pass; node.meta["sharding"] holds the lowered specs
    config: Any  # the TransformerConfig the graph describes
    plan: Any  # the planner's Plan (None when the layout was forced entirely)
    ffn_layout: str
    attention_layout: str
    mesh_shape: dict[str, int]
    jax_mesh: JaxMesh
    in_specs: list[Spec]
    out_specs: list[Spec]
    jitted: Callable
    lowered: Any  # jax Lowered (StableHLO) of the shard_map program
    records: list = field(default_factory=list)  # collectives the lowering emitted
    fallbacks: list[str] = field(default_factory=list)
    predicted: Any = None  # CandidateCost of the chosen layout
    timings: dict[str, float] = field(default_factory=dict)
    # caller's flat argument index -> conversions applied once at load time (interleaved fused
    # weights, int8); each maps one array to a list of arrays (int8: values, scale)
    load_transforms: dict[int, list] = field(default_factory=dict)
    _converted: dict = field(default_factory=dict, repr=False)
    executable: Any = field(default=None, repr=False)  # see `compiled`
    slow: tuple[int, int, int] = (1, 1, 1)  # nodes (processes) each mesh axis runs over
    arguments: tuple[str, ...] = ()  # the caller's flat arguments' paths, as traced
    # the program's input shapes when they are not the graph's (replicas and pipeline stages
    # lower the function at a share of the batch; the program takes all of it)
    in_shapes: tuple = ()

    @property
    def compiled(self):
        """The jax Compiled program for this machine's devices, compiled by XLA on first use
        (`step.export` needs only `lowered`: a TPU artifact is not compiled for the host)."""
        if self.executable is None:
            import time

            t0 = time.perf_counter()
            self.executable = self.lowered.compile()
            self.timings["xla_compile"] = time.perf_counter() - t0
        return self.executable

    def place(self, flat_args: list) -> list:
        """The caller's flat arguments as the program takes them: converted (once per weight
        array: the result is kept while the array lives) and put on the mesh."""
        out: list = []
        for i, x in enumerate(flat_args):
            steps = self.load_transforms.get(i)
            if not steps:
                out.append(self._put(x, len(out)))
                continue
            hit = self._converted.get(i)
            if hit is not None and hit[0]() is x:
                out += hit[1]
                continue
            ys = convert_argument(steps, x)
            placed = [self._put(y, len(out) + k) for k, y in enumerate(ys)]
            try:
                self._converted[i] = (weakref.ref(x), placed)
            except TypeError:  # not weak-referenceable (a Python scalar): convert every call
                pass
            out += placed
        return out

    def _put(self, x, k: int):
        sharding = NamedSharding(self.jax_mesh, self.in_specs[k].partition_spec())
        if self.jax_mesh.is_multi_process:  # each process builds only its own devices' blocks
            from meshwright.runtime.distributed import put

            return put(x, sharding)
        return jax.device_put(x, sharding)

    def describe_load_transforms(self) -> list[str]:
        paths = self.arguments
        lines = []
        for i, steps in sorted(self.load_transforms.items()):
            name = paths[i] if i < len(paths) else f"argument {i}"
            lines.append(f"{name}: " + "; ".join(
                s.describe() if hasattr(s, "describe") else str(s) for s in steps))
        return lines


@dataclass
class Program:
    """What the `lower` pass leaves (`ctx.results.program`): the program and how it is called."""

    jitted: Callable  # jax.jit of the shard_map program (donating `ctx.donated`'s arrays)
    lowered: Any  # its jax Lowered (StableHLO) for the mesh's devices; not compiled by XLA
    in_specs: list[Spec]  # how each program argument is split over the mesh
    out_specs: list[Spec]  # how each output is
    records: list  # the collectives the lowering emitted (CollectiveRecord)


@register
@dataclass(frozen=True)
class Lower(Pass):
    """The annotated graph as an explicit per-device `shard_map` program, every collective
    written out (`passes/lower.py`'s rules), jitted and lowered by JAX for the mesh `plan`
    laid out: `ctx.results.program`. Equations lowered replicated join
    `ctx.results.fallbacks` (`ctx.strict`: NotAsPlanned instead)."""

    name = "lower"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        mesh, jmesh = ctx.results.mesh, ctx.results.jax_mesh
        if jmesh is None or "in_specs" not in graph.meta:
            raise ValueError("lower needs 'annotate' first and the devices to run on "
                             "(ctx.devices, laid out by 'plan')")
        in_specs, out_specs = graph.meta["in_specs"], graph.meta["out_specs"]
        result = Lowered()
        emitter = Emitter(mesh)

        def per_device(*flat_locals):
            emitter.records.clear()
            lctx = LowerContext.for_graph(graph, mesh, emitter, result)
            outs, specs = lower_graph(lctx, graph, list(flat_locals), in_specs)
            return [lctx.to(o, s, want, "output") for o, s, want in zip(outs, specs, out_specs)]

        program = jax.shard_map(per_device, mesh=jmesh,
                                in_specs=tuple(s.partition_spec() for s in in_specs),
                                out_specs=[s.partition_spec() for s in out_specs],
                                check_vma=False)
        jitted = jax.jit(program, donate_argnums=donated_program_args(ctx, len(in_specs)))
        structs = [jax.ShapeDtypeStruct(v.shape, v.dtype,
                                        sharding=NamedSharding(jmesh, s.partition_spec()))
                   for v, s in zip(graph.inputs, in_specs)]
        lowered = jitted.lower(*structs)
        ctx.results.fallbacks += result.fallbacks
        if ctx.strict and ctx.results.fallbacks:
            raise NotAsPlanned(ctx.results.fallbacks)
        ctx.results.program = Program(jitted, lowered, in_specs, out_specs,
                                      list(emitter.records))
        return graph


def donated_program_args(ctx: PassContext, n_program: int) -> tuple[int, ...]:
    """The program's argument indices of the caller's donated arrays (`ctx.donated`). Arrays
    converted at load time (weights: never donated) may turn into several program
    arguments; the arrays after the last of them keep their order, shifted."""
    donated, transforms = ctx.donated, ctx.results.load_transforms
    if not donated:
        return ()
    if transforms and min(donated) <= max(transforms):
        names = [ctx.arguments[i] if i < len(ctx.arguments) else f"argument {i}"
                 for i in donated if i <= max(transforms)]
        raise ValueError(f"donate_argnums: {', '.join(names[:3])}"
                         f"{f' and {len(names) - 3} more' if len(names) > 3 else ''}: an "
                         "argument converted at load time (an interleaved or int8 weight), "
                         "or one before it, cannot be donated")
    shift = n_program - len(ctx.arguments)
    return tuple(int(i) + shift for i in donated)


class ShardedFunction:
    """A function compiled for a device mesh. See `meshwright.shard`."""

    def __init__(self, fn: Callable, mesh=None, phase: str = "auto", hardware: str | None = None,
                 weights: str = "native", passes: list | None = None,
                 force: dict | None = None, collective_einsum="auto",
                 donate_argnums: int | tuple[int, ...] = (), strict: bool = False):
        from meshwright.passes.collective_einsum import CollectiveEinsum

        if phase not in ("auto", "prefill", "decode"):
            raise ValueError(f"phase must be 'prefill', 'decode' or 'auto', got {phase!r}")
        force = dict(force or {})
        unknown = set(force) - {"ffn", "attention", "mesh", "cross_node", "microbatches"}
        if unknown:
            raise ValueError(f"force takes ffn, attention, mesh, cross_node and microbatches; "
                             f"got {sorted(unknown)}")
        if force.get("cross_node") not in (None, "replicas", "pipeline", "stretched"):
            raise ValueError(f"unknown way across nodes {force['cross_node']!r}; choose from "
                             "replicas, pipeline, stretched")
        mb = force.get("microbatches")
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
            raise ValueError(f"force['microbatches'] must be a positive int, got {mb!r}")
        if force.get("ffn") not in (None, *LAYOUT_NAMES_FFN):
            raise ValueError(f"unknown FFN layout {force['ffn']!r}; "
                             f"choose from {', '.join(LAYOUT_NAMES_FFN)}")
        if force.get("attention") not in (None, *LAYOUT_NAMES_ATTENTION):
            raise ValueError(f"unknown attention layout {force['attention']!r}; "
                             f"choose from {', '.join(LAYOUT_NAMES_ATTENTION)}")
        self.fn = fn
        pinned = force.get("mesh")
        if isinstance(pinned, (tuple, list)):
            pinned = dict(zip(AXES, pinned))
        self._force = Force(force.get("ffn"), force.get("attention"),
                            None if pinned is None else tuple(int(pinned.get(a, 1))
                                                              for a in AXES),
                            force.get("cross_node"), mb)
        self.devices = _mesh_devices(mesh)
        self.phase = phase
        self.hardware = hardware or ("cpu" if self.devices[0].platform == "cpu" else "tpu-v4")
        self.weights = weights
        self.passes = passes
        self.force = force
        # strict: anything that would run other than planned (replicated) is an error
        self.strict = bool(strict)
        # arguments whose buffers the program may reuse for its outputs (as jax.jit's): a KV
        # cache donated is updated in place on every device instead of copied
        self.donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) \
            else tuple(donate_argnums)
        # looped collective einsums: "auto" (where the hardware profile says overlap pays;
        # never on the simulated CPU mesh), "on", "off", or a configured CollectiveEinsum pass
        self.collective_einsum = collective_einsum if isinstance(
            collective_einsum, CollectiveEinsum) else CollectiveEinsum(mode=collective_einsum)
        self._cache: dict[Any, Compiled] = {}
        functools.update_wrapper(self, fn)

    # ---- the compile boundary ----------------------------------------------------------
    def _signature(self, args, kwargs):
        flat, tree = jax.tree_util.tree_flatten((args, kwargs))
        return tree, tuple((np.shape(x), str(np.asarray(x).dtype) if not hasattr(x, "dtype")
                            else str(x.dtype)) for x in flat)

    def compiled(self, *args, **kwargs) -> Compiled:
        c = self._lowered(args, kwargs)
        _ = c.compiled  # XLA compiles it here (timed in c.timings["xla_compile"])
        return c

    def _lowered(self, args, kwargs) -> Compiled:
        """The Compiled record with the program lowered, not yet compiled by XLA."""
        key = self._signature(args, kwargs)
        if key not in self._cache:
            self._cache[key] = self._compile(args, kwargs)
        return self._cache[key]

    def compile_watched(self, printer: Callable[[str, Graph], None], *args,
                        **kwargs) -> Compiled:
        """Compile afresh (the cache is neither read nor filled), calling
        `printer(pass_name, graph)` right after every stage, trace to lower: what
        `tests/test_golden_passes.py` records of each pass."""
        return self._compile(args, kwargs, printer)

    def _compile(self, args, kwargs, printer=None) -> Compiled:
        import time

        # 1. trace
        t0 = time.perf_counter()
        g = trace(self.fn, *args, **kwargs)
        timings = {"trace": time.perf_counter() - t0}
        if printer is not None:
            printer("trace", g)
        # 2. the passes, under the caller's options
        ctx = self._context(g, args, kwargs)
        pm = PassManager(pipeline_passes(ctx, {"collective-einsum": self.collective_einsum},
                                         analyses=list(self.passes) if self.passes else None))
        if printer is not None:
            pm.print_after, pm.printer = {p.name for p in pm.passes}, printer
        after_plan = [p.name for p in pm.passes].index("plan") + 1
        g = pm.run(g, ctx, stop=after_plan)
        from meshwright.passes.replicas import compile_replicas

        replicated = compile_replicas(self, ctx.results.choice.plan, g, args, kwargs, printer)
        if replicated is not None:  # the batch split between node groups
            return replicated
        from meshwright.passes.stages import compile_stages

        staged = compile_stages(self, ctx.results.choice.plan, g, args, kwargs, printer)
        if staged is not None:  # the layers split between nodes
            return staged
        g = pm.run(g, ctx, start=after_plan)
        timings.update(pm.timings)
        # 3. the record
        r, choice = ctx.results, ctx.results.choice
        return Compiled(graph=g, config=r.config, plan=choice.plan, ffn_layout=choice.ffn,
                        attention_layout=choice.attention, mesh_shape=choice.mesh_shape,
                        jax_mesh=r.jax_mesh, in_specs=r.program.in_specs,
                        out_specs=r.program.out_specs, jitted=r.program.jitted,
                        lowered=r.program.lowered, records=r.program.records,
                        fallbacks=list(r.fallbacks), predicted=choice.predicted,
                        timings=timings, load_transforms=r.load_transforms,
                        slow=tuple(choice.slow), arguments=ctx.arguments)

    def _context(self, g: Graph, args, kwargs) -> PassContext:
        """The pipeline's context for one traced call: the options this function was made
        with, the caller's arguments by path and which of them are donated."""
        return PassContext(
            devices=tuple(self.devices), hardware=self.hardware, phase=self.phase,
            weights=self.weights, force=self._force, strict=self.strict,
            arguments=tuple(v.producer.params.get("path", f"argument {i}")
                            for i, v in enumerate(g.inputs)),
            donated=self._donated_leaves(args))

    def _donated_leaves(self, args) -> tuple[int, ...]:
        """The caller's flat argument indices of the donated arguments' arrays."""
        if not self.donate_argnums:
            return ()
        starts = np.cumsum([0, *(len(jax.tree_util.tree_leaves(a)) for a in args)])
        return tuple(int(i) for a in self.donate_argnums for i in range(starts[a], starts[a + 1]))

    def _donated(self, args, kwargs, transforms: dict, n_program: int) -> tuple[int, ...]:
        """The program's argument indices of the donated arguments' arrays, for a program of
        `n_program` arguments whose inputs convert at load time as `transforms` says."""
        from meshwright.passes.base import Results

        n_caller = len(jax.tree_util.tree_leaves((args, kwargs)))
        ctx = PassContext(arguments=tuple(f"argument {i}" for i in range(n_caller)),
                          donated=self._donated_leaves(args),
                          results=Results(load_transforms=transforms))
        return donated_program_args(ctx, n_program)

    # ---- running -----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        c = self.compiled(*args, **kwargs)
        flat, _ = jax.tree_util.tree_flatten((args, kwargs))
        outs = c.compiled(*c.place(flat))
        return jax.tree_util.tree_unflatten(c.graph.out_tree, outs)

    # ---- inspection --------------------------------------------------------------------
    def plan(self, *args, **kwargs):
        """The planner's Plan for these arguments (layouts, mesh, predicted costs)."""
        c = self.compiled(*args, **kwargs)
        return c.plan

    def explain(self, *args, **kwargs) -> str:
        """Why each layout won, the cost of every candidate, and what ran replicated."""
        c = self.compiled(*args, **kwargs)
        lines = []
        if c.plan is not None:
            lines.append(c.plan.explain())
        across = ", ".join(f"{a} over {k} nodes" for a, k in zip(AXES, c.slow) if k > 1)
        lines.append(f"lowered with FFN {c.ffn_layout}, attention {c.attention_layout} on mesh "
                     f"{'x'.join(str(c.mesh_shape[a]) for a in AXES)} (x, y, z)"
                     + (f"; {across} (each node {where_nodes(c.jax_mesh)})" if across else ""))
        if self.force:
            lines.append(f"forced by the caller: {self.force}")
        converted = c.describe_load_transforms()
        if converted:
            lines.append("weights converted once, when placed on the mesh:")
            lines += [f"  - {t}" for t in converted]
        if c.fallbacks:
            lines.append("ran replicated (correct, not sharded):")
            lines += [f"  - {f}" for f in c.fallbacks]
        else:
            lines.append("nothing ran replicated")
        if c.graph.meta.get("collective_einsum_note"):
            lines.append(c.graph.meta["collective_einsum_note"])
            lines += [f"  - {d}" for d in c.graph.meta.get("collective_einsum", [])]
        return "\n".join(lines)

    def graph(self, *args, after: str = "lower", **kwargs) -> Graph:
        """The graph after a named stage of `meshwright.passes.PIPELINE`: trace through
        fuse-parallel-block (each run anew), or plan and after (the compiled graph, which
        carries every pass's annotations; `graph_text` has the text as it was right after
        each)."""
        if after not in STAGES:
            raise ValueError(f"unknown pass {after!r}; the pipeline is {', '.join(STAGES)}")
        if STAGES.index(after) >= STAGES.index("plan"):
            return self.compiled(*args, **kwargs).graph
        from meshwright.api import run_passes_until

        return run_passes_until(trace(self.fn, *args, **kwargs), after)

    def diff(self, *args, before: str = "annotate", after: str = "collective-einsum",
             side_by_side: bool = False, width: int = 200, **kwargs) -> str:
        """The graph text after pass `before` against after pass `after`: a unified diff, or
        two columns (`side_by_side=True`). See `meshwright.ir.diff`."""
        from meshwright.ir.diff import diff_text

        texts = self.stage_texts(*args, stages=(before, after), **kwargs)
        return diff_text(texts[before], texts[after], before, after,
                         side_by_side=side_by_side, width=width)

    def graph_text(self, *args, after: str = "lower", **kwargs) -> str:
        """The graph's text as it was right after a named stage (see `stage_texts`)."""
        return self.stage_texts(*args, stages=(after,), **kwargs)[after]

    def stage_texts(self, *args, stages: tuple[str, ...], **kwargs) -> dict[str, str]:
        """The graph's text right after each named stage: trace through fuse-parallel-block
        printed anew, lower from the compiled graph, and the stages between (plan through
        collective-einsum) caught on one fresh compilation (`compile_watched`)."""
        for name in stages:
            if name not in STAGES:
                raise ValueError(f"unknown pass {name!r}; the pipeline is {', '.join(STAGES)}")
        if "quantize-int8" in stages and self.weights != "int8":
            raise ValueError("quantize-int8 runs only with weights='int8'")
        first, last = STAGES.index("plan"), STAGES.index("lower")
        caught = {n for n in stages if first <= STAGES.index(n) < last}
        texts: dict[str, str] = {}
        if caught:
            self.compile_watched(lambda name, g: texts.__setitem__(name, g.format())
                                 if name in caught else None, *args, **kwargs)
        for name in stages:
            if name not in texts:
                texts[name] = self.graph(*args, after=name, **kwargs).format()
        return texts

    def lower(self, *args, **kwargs):
        """The jax Lowered program (`.as_text()` is its StableHLO; `.compile()`), as jax.jit."""
        return self.compiled(*args, **kwargs).lowered

    def report(self, *args, **kwargs) -> dict:
        """Predicted vs measured: collective bytes counted in the compiled HLO per device."""
        c = self.compiled(*args, **kwargs)
        measured = collective_bytes(c.compiled.as_text())
        emitted: dict[str, int] = {}
        for r in c.records:
            emitted[r.kind] = emitted.get(r.kind, 0) + r.bytes
        predicted = None
        if c.predicted is not None:
            predicted = int(c.predicted.comm_bytes_per_chip)
        return {
            # "wire": bytes each device sends (comparable with and without collective-einsum)
            "collective_bytes": {"measured": measured["total"], "predicted": predicted,
                                 "wire": measured["wire"],
                                 "emitted": sum(emitted.values()),
                                 "by_kind": measured["by_kind"], "count": measured["count"],
                                 "emitted_by_kind": emitted},
            "layouts": {"ffn": c.ffn_layout, "attention": c.attention_layout,
                        "mesh": dict(c.mesh_shape)},
            "replicated_fallbacks": list(c.fallbacks),
            "load_transforms": c.describe_load_transforms(),
            "weights": self.weights,
            "timings_s": dict(c.timings),
        }

    def export(self, *args, platforms: tuple[str, ...] = ("tpu",)):
        """The compiled program at these arguments (arrays or jax.ShapeDtypeStructs), lowered
        for `platforms` with `jax.export`: an `ExportedProgram` to `.save(FILE)` and load with
        `mw.load_exported(FILE)`. See passes/export.py."""
        from meshwright.passes.export import export_sharded

        return export_sharded(self, *args, platforms=platforms)


def shard(fn: Callable | None = None, *, mesh=None, phase: str = "auto",
          hardware: str | None = None, weights: str = "native", passes: list | None = None,
          force: dict | None = None, collective_einsum="auto",
          donate_argnums: int | tuple[int, ...] = (), strict: bool = False):
    """Compile `fn` for a device mesh: decorator (`@mw.shard(mesh=...)`) or call
    (`mw.shard(fn, mesh=...)`). Options: `mesh`, `phase`, `hardware`, `weights`, `passes`,
    `force` (see docs/overview.md), `collective_einsum`, `donate_argnums` as in
    `jax.jit` (e.g. 2 for a decode step's KV cache: updated in place on every device; the
    arrays passed are deleted by the call), and `strict` (NotAsPlanned, a ValueError,
    instead of running any part replicated that the plan splits)."""
    def wrap(f):
        return ShardedFunction(f, mesh=mesh, phase=phase, hardware=hardware, weights=weights,
                               passes=passes, force=force, collective_einsum=collective_einsum,
                               donate_argnums=donate_argnums, strict=strict)

    return wrap(fn) if fn is not None else wrap
