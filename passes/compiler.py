"""`mw.shard`: trace, analyse, plan, annotate, lower to `shard_map`, compile, run.

    step = mw.shard(model.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}))
    logits, cache = step(params, tokens, cache, positions)   # compiled once per signature
    step.plan(*args); step.explain(*args); step.graph(*args, after="lower"); step.report(*args)

The compile boundary is `ShardedFunction._compile`, once per input signature (tree structure,
shapes, dtypes). Everything it builds is in a `Compiled` record.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import Mesh as JaxMesh
from meshwright.ir import Graph, trace
from meshwright.passes.annotate import annotate
from meshwright.passes.base import ANALYSES, STAGES, PassManager
from meshwright.passes.hlo import collective_bytes
from meshwright.passes.interleave import interleave_fused
from meshwright.passes.lower import LowerContext, Lowered, lower_graph
from meshwright.passes.sharding import (
    LAYOUT_NAMES_ATTENTION,
    LAYOUT_NAMES_FFN,
    Emitter,
    MeshInfo,
    Spec,
    make_layout,
)

AXES = ("x", "y", "z")


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


class _AnySplitFits(MeshInfo):
    """A mesh on which every split divides: the specs a layout asks for before sizes that do
    not divide drop axes (`spec_for`)."""

    def fits(self, size: int, axes) -> bool:
        return True


def unsplit_inputs(g: Graph, layout, mesh: MeshInfo, weight_ids: set) -> list[str]:
    """Inputs with a dimension the layout splits over mesh axes that ends up whole on every
    device (its size does not divide by theirs): replicated where the plan (and the cost
    model's prediction) has it split. A dimension that keeps some of its axes (48 heads on
    4x4x4 take x and y of x, y, z) is split as the planner priced it, and not listed."""
    from meshwright.passes.annotate import input_spec

    out = []
    paths = g.meta.get("float_input_paths") or []
    for i, (v, actual) in enumerate(zip(g.inputs, g.meta["in_specs"])):
        wanted = input_spec(v, v.id in weight_ids, layout, _AnySplitFits(mesh.sizes))
        roles = v.producer.meta["axes"][v.index]
        for d, (want, got) in enumerate(zip(wanted.dims, actual.dims)):
            if want and not got:
                name = paths[i] if i < len(paths) else f"argument {i}"
                n = mesh.count(want)
                out.append(f"{name} {v.dtype}{list(v.shape)}: dimension {d} "
                           f"({roles[d] or '?'}, {v.shape[d]}) is not split over "
                           f"{', '.join(want)} ({n} devices) as {layout.ffn}/"
                           f"{layout.attention} plans: {v.shape[d]} does not divide by {n}; "
                           "every device holds all of it")
    return out


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


def node_factors(sizes, nodes: int) -> tuple[int, int, int]:
    """How many of `nodes` nodes each axis of a mesh of `sizes` (x, y, z) crosses when the
    outer axes take them first: x the largest share it divides, then y, then z.

        >>> node_factors((2, 2, 2), 2), node_factors((1, 2, 4), 4)
        ((2, 1, 1), (1, 2, 2))
    """
    out, rest = [], nodes
    for size in sizes:
        g = math.gcd(int(size), rest)
        out.append(g)
        rest //= g
    if rest != 1:
        raise ValueError(f"a {'x'.join(map(str, sizes))} mesh does not split over {nodes} "
                         f"nodes: {nodes} does not divide its {int(np.prod(sizes))} devices")
    return tuple(out)


# What mw.shard lowers of the planner's ways across nodes (passes/multinode.py): a layout
# stretched over the nodes is the paper's layout on the bigger mesh, only priced otherwise;
# replicas split the batch over a mesh axis outside it (passes/replicas.py).
LOWERED_CROSSINGS = ("replicas", "stretched")


def _lowerable(plan, config, request: dict):
    """`plan`, or across nodes when its way of crossing them is not lowered, the plan of the
    best one that is, with a note saying what was set aside and at what price; a ValueError
    naming the reasons when none runs."""
    from meshwright.passes.planner import plan_config

    if plan.nodes == 1 or plan.cross_node.kind in LOWERED_CROSSINGS:
        return plan
    x = plan.cross_node
    runs = [c for c in plan.cross_node_candidates if c.kind in LOWERED_CROSSINGS]
    if not runs:
        why = "; ".join(f"{name}: {reason}" for name, reason in plan.cross_node_rejected
                        if any(k in name for k in LOWERED_CROSSINGS)) or "not priced"
        raise ValueError(
            f"{plan.chips} devices on {plan.nodes} nodes: the planner chose {x.label}, which "
            f"mw.shard does not lower yet, and no layout stretched over the nodes runs ({why});"
            " pin ffn, attention and mesh in force= to lower a layout anyway")
    chosen = plan_config(config, **{**request, "nodes": plan.nodes,
                                    "cross_node": runs[0].kind})
    chosen.forced["cross_node"] = f"{runs[0].kind} (what mw.shard lowers)"
    chosen.notes.append(
        f"the planner's best across {plan.nodes} nodes is {x.label} ({x.step_s * 1e3:.3g} "
        f"ms/step); mw.shard does not lower {x.kind} yet, so this runs "
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
        paths = self.graph.meta.get("float_input_paths", [])
        lines = []
        for i, steps in sorted(self.load_transforms.items()):
            name = paths[i] if i < len(paths) else f"argument {i}"
            lines.append(f"{name}: " + "; ".join(
                s.describe() if hasattr(s, "describe") else str(s) for s in steps))
        return lines


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
        unknown = set(force) - {"ffn", "attention", "mesh"}
        if unknown:
            raise ValueError(f"force takes ffn, attention and mesh; got {sorted(unknown)}")
        if force.get("ffn") not in (None, *LAYOUT_NAMES_FFN):
            raise ValueError(f"unknown FFN layout {force['ffn']!r}; "
                             f"choose from {', '.join(LAYOUT_NAMES_FFN)}")
        if force.get("attention") not in (None, *LAYOUT_NAMES_ATTENTION):
            raise ValueError(f"unknown attention layout {force['attention']!r}; "
                             f"choose from {', '.join(LAYOUT_NAMES_ATTENTION)}")
        self.fn = fn
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

        show = printer or (lambda name, graph: None)
        timings = {}
        t0 = time.perf_counter()
        g = trace(self.fn, *args, **kwargs)
        timings["trace"] = time.perf_counter() - t0
        show("trace", g)
        pm = PassManager(self.passes or ANALYSES)
        if printer is not None:
            pm.print_after, pm.printer = {p.name for p in pm.passes}, printer
        g = pm.run(g)
        timings.update(pm.timings)
        from meshwright.passes import infer_axes as ia
        from meshwright.passes.plan import PlanError, config_from_graph, workload_from_graph

        work = workload_from_graph(g)
        phase = work["phase"] if self.phase == "auto" else self.phase
        t0 = time.perf_counter()
        try:
            config = config_from_graph(g)
        except PlanError as e:
            # Not a Transformer the cost model can price: lower with the pinned layout.
            if not (self.force.get("ffn") and self.force.get("attention")):
                raise PlanError(f"{e}. Pin the layout with force={{'ffn': ..., "
                                f"'attention': ...}} to shard it anyway") from None
            config = None
        if config is None:
            plan, predicted = None, None
            ffn, attention = self.force["ffn"], self.force["attention"]
            mesh_shape = self._forced_mesh_shape()
            slow = self._node_factors(mesh_shape)
        else:
            plan, ffn, attention, mesh_shape, predicted, slow = self._choose(config, work,
                                                                             phase)
            from meshwright.passes.replicas import compile_replicas

            replicated = compile_replicas(self, plan, g, args, kwargs, printer)
            if replicated is not None:  # the batch split between node groups
                return replicated
        timings["plan"] = time.perf_counter() - t0
        g.meta["plan"] = plan
        show("plan", g)
        mesh_info = MeshInfo(mesh_shape)
        # axes that cross nodes run over them as the plan priced (the lowering is the same)
        jmesh = make_mesh(mesh_shape, self.devices, slow=slow)
        prog = ia._Program()
        ia._collect(g, prog, ia._parameter_inputs(g))
        g.meta["weight_values"] = prog.weight
        layout = make_layout(ffn, attention)
        t0 = time.perf_counter()
        annotate(g, layout, mesh_info)
        timings["annotate"] = time.perf_counter() - t0
        g.meta["pass_text"] = {"annotate": g.format()}  # for step.diff(); ~5 ms
        g.meta["float_input_paths"] = [v.producer.params.get("path", f"argument {i}")
                                       for i, v in enumerate(g.inputs)]
        # inputs the layout splits that run whole (a size that does not divide)
        unsplit = unsplit_inputs(g, g.meta["layout"], mesh_info, set(prog.weight))
        if self.strict and unsplit:
            raise NotAsPlanned(unsplit)
        show("annotate", g)
        t0 = time.perf_counter()
        interleave_fused(g, mesh_info)
        timings["interleave-fused"] = time.perf_counter() - t0
        show("interleave-fused", g)
        transforms = {i: list(steps) for i, steps in g.meta.get("load_transforms", {}).items()}
        if self.weights == "int8":
            from meshwright.passes.quantize import Int8Quantizer, quantize_int8

            t0 = time.perf_counter()
            quantize_int8(g)
            for w in g.meta["quantize-int8"].weights:
                transforms.setdefault(w.index, []).append(Int8Quantizer(w.reduce_axes,
                                                                        w.layout))
            timings["quantize-int8"] = time.perf_counter() - t0
            show("quantize-int8", g)
        from meshwright.passes.collective_einsum import collective_einsum

        t0 = time.perf_counter()
        collective_einsum(g, mesh_info, self.collective_einsum, self.hardware)
        timings["collective-einsum"] = time.perf_counter() - t0
        g.meta["pass_text"]["collective-einsum"] = g.format()
        show("collective-einsum", g)
        in_specs, out_specs = g.meta["in_specs"], g.meta["out_specs"]
        result = Lowered()
        emitter = Emitter(mesh_info)

        def per_device(*flat_locals):
            emitter.records.clear()
            ctx = LowerContext.for_graph(g, mesh_info, emitter, result)
            outs, specs = lower_graph(ctx, g, list(flat_locals), in_specs)
            return [ctx.to(o, s, want, "output") for o, s, want in zip(outs, specs, out_specs)]

        program = jax.shard_map(per_device, mesh=jmesh,
                                in_specs=tuple(s.partition_spec() for s in in_specs),
                                out_specs=[s.partition_spec() for s in out_specs],
                                check_vma=False)
        jitted = jax.jit(program, donate_argnums=self._donated(args, kwargs, transforms,
                                                               len(in_specs)))
        structs = [jax.ShapeDtypeStruct(v.shape, v.dtype,
                                        sharding=NamedSharding(jmesh, s.partition_spec()))
                   for v, s in zip(g.inputs, in_specs)]
        t0 = time.perf_counter()
        lowered = jitted.lower(*structs)
        timings["lower"] = time.perf_counter() - t0
        fallbacks = unsplit + list(result.fallbacks)
        if self.strict and fallbacks:
            raise NotAsPlanned(fallbacks)
        show("lower", g)
        return Compiled(graph=g, config=config, plan=plan, ffn_layout=ffn,
                        attention_layout=attention, mesh_shape=mesh_shape, jax_mesh=jmesh,
                        in_specs=in_specs, out_specs=out_specs, jitted=jitted, lowered=lowered,
                        records=list(emitter.records),
                        fallbacks=fallbacks, predicted=predicted,
                        timings=timings, load_transforms=transforms, slow=tuple(slow))

    def _donated(self, args, kwargs, transforms: dict, n_program: int) -> tuple[int, ...]:
        """The program's argument indices of the donated arguments' arrays. Arrays converted
        at load time (weights: never donated) may turn into several program arguments; the
        arrays after the last of them keep their order, shifted."""
        if not self.donate_argnums:
            return ()
        sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
        starts = np.cumsum([0, *sizes])
        donated = [i for a in self.donate_argnums for i in range(starts[a], starts[a + 1])]
        if transforms and donated and min(donated) <= max(transforms):
            raise ValueError(f"donate_argnums {self.donate_argnums}: an argument converted "
                             "at load time (an interleaved or int8 weight) cannot be donated")
        shift = n_program - len(jax.tree_util.tree_leaves((args, kwargs)))
        return tuple(int(i) + shift for i in donated)

    def _choose(self, config, work, phase):
        """(plan, ffn, attention, mesh shape, predicted cost, nodes per axis): the planner's
        choice, with whatever `force` pins. Over the devices of several processes every
        process is a node: the planner prices what crosses between them, and mw.shard lowers
        the layouts it stretches over nodes (`LOWERED_CROSSINGS`)."""
        from meshwright.passes.cost_model import LayoutNotApplicable, Mesh, Workload, evaluate
        from meshwright.passes.hardware import get_hardware
        from meshwright.passes.planner import plan_config

        n = len(self.devices)
        nodes = len(node_groups(self.devices))
        weights = self.weights if self.weights != "native" else (
            "bf16" if config.dtype == "bfloat16" else "fp32")
        context = work["context"]
        forced_mesh = self.force.get("mesh")
        if isinstance(forced_mesh, (tuple, list)):
            forced_mesh = dict(zip(AXES, forced_mesh))
        plan = None
        request = {"hardware": self.hardware, "chips": n, "batch": work["batch"],
                   "context": context, "phase": phase, "weights": weights,
                   "force_ffn": self.force.get("ffn"),
                   "force_attention": self.force.get("attention"),
                   "nodes": nodes if nodes > 1 else None}
        try:
            plan = _lowerable(plan_config(config, **request), config, request)
        except ValueError:
            if not (self.force.get("ffn") and self.force.get("attention")):
                raise
        if forced_mesh is None and plan is not None:
            best = plan.best
            return (plan, best.ffn_layout, best.attention_layout,
                    {"x": best.mesh.x, "y": best.mesh.y, "z": best.mesh.z}, best,
                    best.mesh.slow)
        mesh_shape = self._forced_mesh_shape()
        slow = self._node_factors(mesh_shape, plan.nodes if plan is not None else None)
        # the planner's best candidate on the pinned mesh (the pins on ffn/attention hold)
        on_mesh = [cand for cand in (plan.candidates if plan else [])
                   if (cand.mesh.x, cand.mesh.y, cand.mesh.z, tuple(cand.mesh.slow)) ==
                   (*(mesh_shape[a] for a in AXES), slow)]
        if on_mesh:
            best = on_mesh[0]
            return plan, best.ffn_layout, best.attention_layout, mesh_shape, best, slow
        ffn = self.force.get("ffn") or (plan.best.ffn_layout if plan else "ws-2d")
        attention = self.force.get("attention") or (plan.best.attention_layout if plan
                                                    else "heads")
        predicted = None
        try:
            predicted = evaluate(config, get_hardware(self.hardware),
                                 Mesh(**mesh_shape, slow=slow),
                                 Workload(work["batch"], context, phase, weights), ffn,
                                 attention)
        except (LayoutNotApplicable, ValueError):
            predicted = None
        return plan, ffn, attention, mesh_shape, predicted, slow

    def _node_factors(self, mesh_shape: dict[str, int],
                      nodes: int | None = None) -> tuple[int, int, int]:
        """Nodes each axis of a pinned mesh crosses: the processes' (or the plan's `nodes`),
        taken by the outer axes first (`node_factors`)."""
        nodes = nodes or len(node_groups(self.devices))
        return node_factors([mesh_shape[a] for a in AXES], nodes)

    def _forced_mesh_shape(self) -> dict[str, int]:
        n = len(self.devices)
        forced = self.force.get("mesh")
        if isinstance(forced, (tuple, list)):
            forced = dict(zip(AXES, forced))
        if forced is None:
            return {"x": 1, "y": 1, "z": n}
        shape = {a: int(forced.get(a, 1)) for a in AXES}
        if int(np.prod(list(shape.values()))) != n:
            raise ValueError(f"forced mesh {shape} does not use the {n} devices given")
        return shape

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
                     + (f"; {across} (each node a process)" if across else ""))
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

        return diff_text(self.graph_text(*args, after=before, **kwargs),
                         self.graph_text(*args, after=after, **kwargs), before, after,
                         side_by_side=side_by_side, width=width)

    def graph_text(self, *args, after: str = "lower", **kwargs) -> str:
        """The graph's text as it was right after a named pass (annotate and
        collective-einsum are kept from the compilation; interleave-fused and quantize-int8
        recompiled to catch it; the others printed anew)."""
        if after in ("interleave-fused", "quantize-int8"):
            if after == "quantize-int8" and self.weights != "int8":
                raise ValueError("quantize-int8 runs only with weights='int8'")
            texts = {}
            self.compile_watched(lambda name, g: texts.setdefault(name, g.format()), *args,
                                 **kwargs)
            return texts[after]
        if after in ("plan", "annotate", "collective-einsum"):
            texts = self.compiled(*args, **kwargs).graph.meta["pass_text"]
            # plan's and annotate's results are not part of the text: the same text
            return texts["annotate" if after == "plan" else after]
        return self.graph(*args, after=after, **kwargs).format()

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
