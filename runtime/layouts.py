"""Layouts that follow the batch: every engine bucket compiled through `mw.shard` in the layout
the planner picks for it, on one mesh, with the weights placed once.

    >>> from meshwright.runtime.layouts import sharded_engine
    >>> engine = sharded_engine(model, params, jax.devices()[:8], hardware="cpu",
    ...                         max_slots=8, max_len=64)                  # doctest: +SKIP
    >>> print(engine.layout_plan.table())                                 # doctest: +SKIP

The rule (Pope et al. keep one stored weight layout so that prefill and decode can switch
layouts without moving weights):

1. Plan every (phase, bucket) freely: the analytical planner over every mesh factorisation,
   FFN layout and attention layout (`plan_config`).
2. Fix the engine's mesh and stored weight layout from the free choice at the *reference
   bucket*, the largest decode bucket (the batch the engine runs under load). If some bucket
   has no layout that shares those weights (a weight-gathered layout splits the batch and
   cannot run batch 1), take the reference bucket's next candidate that every bucket can
   share, and say so.
3. Every bucket then runs the cheapest candidate *on that mesh* whose stored weights are
   those placed: the same role -> mesh axes map for every weight (the layout object's
   `stored`, `passes/layouts.py`, with axes of size 1 dropped, which is exactly what
   `spec_for` sees). Candidates that would store a weight differently are set aside with the
   weight and split named, e.g. "vocab over (z) not (x, y, z)".

With today's lowering the embedding table's split differs between every two FFN layouts that
are not the same program (ws-2d stores V_xzy, wg-x V_zy, wg-xy V_z, wg-xyz V), and ws-1d
stores the layer weights as E F_xyz: on one mesh only the attention layout (heads or batch)
can change between buckets without moving a weight. `EngineLayouts.explain()` lists what was
set aside per bucket and why.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshwright.passes.layouts import ffn_layout
from meshwright.passes.mesh import Mesh

# ---------------------------------------------------------------------------------------------
# Planning


def stored_weights(ffn: str, mesh: dict) -> tuple:
    """How `ffn` stores the weights on `mesh`: sorted (role, axes) pairs, axes of size 1
    dropped (they split nothing). Equal keys give equal weight shardings."""
    stored = ffn_layout(ffn).stored
    return tuple(sorted((role, tuple(a for a in axes if mesh.get(a, 1) > 1))
                        for role, axes in stored.items()))


def describe_stored(key: tuple) -> str:
    """'embed (x), heads (z, y), ...' for a `stored_weights` key."""
    return ", ".join(f"{role} over ({', '.join(axes)})" if axes else f"{role} whole"
                     for role, axes in key)


def _difference(key: tuple, placed: tuple) -> str:
    """'heads, mlp over (z, y) not (x, y, z); vocab over (z) not (x, y, z)'."""
    mine, theirs = dict(key), dict(placed)
    groups: dict[tuple, list[str]] = {}
    for role in sorted(set(mine) | set(theirs)):
        a, b = mine.get(role, ()), theirs.get(role, ())
        if a != b:
            groups.setdefault((a, b), []).append(role)
    return "; ".join(f"{', '.join(roles)} over ({', '.join(a) or 'nothing'}) not "
                     f"({', '.join(b) or 'nothing'})" for (a, b), roles in groups.items())


def _mesh_text(mesh: dict) -> str:
    return Mesh.parse(mesh).text


@dataclass
class LayoutChoice:
    """What one (phase, bucket) runs, and why."""

    phase: str
    batch: int  # rows
    length: int  # decode: KV length; prefill: padded prompt length
    ffn: str  # FFN layout compiled
    attention: str  # attention layout compiled
    mesh: dict  # the engine's mesh {"x", "y", "z"}
    predicted_s: float  # the planner's step time for it
    free: str  # the planner's own choice over every mesh: "ffn/attention XxYxZ"
    free_s: float  # its predicted step time
    runner_up: str | None  # the next sharing candidate, "ffn/attention (+x%)"
    set_aside: list[str] = field(default_factory=list)  # cheaper candidates on this mesh that
    #                                                      store weights differently, and how

    @property
    def name(self) -> str:
        """'ffn/attention' (the engine's layout label)."""
        return f"{self.ffn}/{self.attention}"

    @property
    def why(self) -> str:
        """One sentence: the planner's free choice, or why another layout runs."""
        here = f"{self.name} {_mesh_text(self.mesh)}"
        slower = 100 * (self.predicted_s / self.free_s - 1)
        if self.free == here:
            head = "the planner's own choice"
        elif self.free.split(" ")[0] == self.name:
            head = (f"the planner's layout, on the engine's mesh (free: {self.free}, "
                    f"{slower:+.1f}% predicted)")
        else:
            head = (f"free choice {self.free} stores weights differently; best layout "
                    f"sharing them ({slower:+.1f}% predicted)")
        if self.runner_up:
            head += f"; next: {self.runner_up}"
        return head


@dataclass
class EngineLayouts:
    """The engine's mesh, its stored weight layout, and every bucket's layout."""

    hardware: str
    chips: int
    mesh: dict  # {"x", "y", "z"}
    stored: tuple  # stored_weights key of the placed weights
    reference: str  # how the mesh and stored layout were chosen
    choices: dict  # (phase, Bucket) -> LayoutChoice
    share_weights: bool = True  # every bucket's layout stores the weights as placed

    def choice(self, phase: str, bucket) -> LayoutChoice:
        return self.choices[(phase, bucket)]

    def table(self, steps: dict | None = None) -> str:
        """One line per bucket: the layout that runs, the free choice, the predicted step, and
        (given {(phase, bucket): count}) how many steps ran it."""
        head = (f"{'bucket':<16}{'runs':<14}{'planner, free':<22}{'predicted ms':>13}"
                + (f"{'steps':>8}" if steps is not None else "") + "  why")
        lines = [head, "-" * len(head)]
        for (phase, bucket), c in self.choices.items():
            n = f"{steps.get((phase, bucket), 0):>8}" if steps is not None else ""
            lines.append(f"{phase + ' ' + str(c.batch) + 'x' + str(c.length):<16}"
                         f"{c.name:<14}{c.free:<22}{c.predicted_s * 1e3:>13.4g}{n}  {c.why}")
        return "\n".join(lines)

    @property
    def stored_text(self) -> str:
        return describe_stored(self.stored)

    def explain_header(self) -> str:
        """Mesh, how the weights are placed, and how that was chosen."""
        if self.share_weights:
            placed = f"weights placed once: {self.stored_text}"
        else:
            n = len({stored_weights(c.ffn, c.mesh) for c in self.choices.values()})
            placed = f"weights in {n} stored layout(s), one copy each"
        return (f"mesh {_mesh_text(self.mesh)} on {self.chips} x {self.hardware}; {placed}\n"
                f"{self.reference}")

    def set_aside_text(self) -> str:
        """The cheaper candidates each bucket set aside because they store weights
        otherwise ('' when none)."""
        aside = [c for c in self.choices.values() if c.set_aside]
        if not aside:
            return ""
        lines = [("set aside because they store weights differently (a bucket switch would "
                  "move them):")]
        for c in aside:
            lines.append(f"  {c.phase} {c.batch}x{c.length}: " + " | ".join(c.set_aside))
        return "\n".join(lines)

    def explain(self) -> str:
        """The table, and what was set aside per bucket because it stores weights otherwise."""
        aside = self.set_aside_text()
        return "\n".join([self.explain_header(), "", self.table()]
                         + (["", aside] if aside else []))

    def to_dict(self) -> list[dict]:
        return [{"phase": c.phase, "batch": c.batch, "length": c.length, "layout": c.name,
                 "mesh": dict(c.mesh), "predicted_s": c.predicted_s, "free": c.free,
                 "free_s": c.free_s, "why": c.why, "set_aside": list(c.set_aside)}
                for c in self.choices.values()]


def _context(phase: str, bucket) -> int:
    return bucket.length  # decode: KV length; prefill: the padded prompt


def plan_layouts(config, buckets: Sequence, *, chips: int, hardware: str = "cpu",
                 weights: str = "fp32", mesh: dict | None = None,
                 share_weights: bool = True, nodes: int | None = None) -> EngineLayouts:
    """Choose the engine's mesh and stored weight layout, then each bucket's layout (see the
    module docstring). `buckets` are (phase, Bucket) pairs; `mesh` pins the factorisation
    (the stored layout is then the reference bucket's best on it). `share_weights=False`
    drops rule 3's restriction: every bucket runs its cheapest layout on the mesh, and a
    bucket whose layout stores the weights otherwise keeps its own copy of them (placed once;
    memory, not traffic) -- to see what the restriction costs.

    `nodes`: the chips are that many nodes (the processes of a multi-process job; default:
    as the hardware profile splits `chips`). Across nodes every bucket runs a layout
    stretched over them, each mesh axis crossing the nodes `mw.shard` lays it over
    (`Mesh.over_nodes`), priced with the network between nodes; `free` is then the planner's
    choice across the nodes, which may be replicas or pipeline stages."""
    from meshwright.passes.cost_model import StepWorkload
    from meshwright.passes.hardware import get_hardware
    from meshwright.passes.mesh import factorizations
    from meshwright.passes.multinode import PricingContext, split_nodes
    from meshwright.passes.planner import evaluate_all, plan_config

    buckets = list(buckets)
    hw = get_hardware(hardware)
    split = split_nodes(hw, chips, nodes)
    free, cands = {}, {}
    for phase, bucket in buckets:
        work = StepWorkload(bucket.batch, _context(phase, bucket), phase, weights)
        free[(phase, bucket)] = plan_config(config, hardware=hw, chips=chips,
                                            batch=bucket.batch, context=work.context,
                                            phase=phase, weights=weights, nodes=nodes)
        if split.nodes == 1:
            ok, _ = evaluate_all(config, hw, chips, work)
        else:  # the paper's layouts on meshes over the nodes, as mw.shard lays them out
            meshes = [m.over_nodes(split.nodes) for m in factorizations(chips)]
            ok = PricingContext(config, hw, split, work).layouts(config, meshes, work)
        cands[(phase, bucket)] = [c for c in ok if c.fits]
    decode = [(p, b) for p, b in buckets if p == "decode"]
    ref = max(decode or buckets, key=lambda k: (k[0] == "decode", k[1].batch, k[1].length))

    def family(c) -> tuple[dict, tuple]:
        m = c.mesh.to_dict()
        return m, stored_weights(c.ffn_layout, m)

    def sharing(key, m, stored):
        return [c for c in cands[key] if c.mesh.to_dict() == m
                and (not share_weights or stored_weights(c.ffn_layout, m) == stored)]

    ref_cands = cands[ref] if mesh is None else [c for c in cands[ref]
                                                 if c.mesh.to_dict() == mesh]
    if not ref_cands:
        raise ValueError(f"no layout of {config.name} fits {chips} x {hw.name}"
                         + (f" on mesh {_mesh_text(mesh)}" if mesh else ""))
    best_ref = ref_cands[0]
    chosen, skipped = None, []
    for c in ref_cands:
        m, stored = family(c)
        missing = [k for k in buckets if not sharing(k, m, stored)]
        if not missing:
            chosen = c
            break
        if len(skipped) < 3:
            skipped.append(f"{c.ffn_layout}/{c.attention_layout} {_mesh_text(m)} cannot run "
                           f"{missing[0][0]} {missing[0][1].batch}x{missing[0][1].length}")
    if chosen is None:
        raise ValueError(f"no stored weight layout of {config.name} on {chips} x {hw.name} "
                         "serves every bucket: " + "; ".join(skipped))
    m, stored = family(chosen)
    ref_name = f"{ref[0]} {ref[1].batch}x{ref[1].length}"
    if chosen is best_ref:
        reference = (f"mesh and stored layout: the planner's choice at the reference bucket "
                     f"{ref_name} ({chosen.ffn_layout}/{chosen.attention_layout})")
    else:
        reference = (f"mesh and stored layout: {chosen.ffn_layout}/{chosen.attention_layout} "
                     f"{_mesh_text(m)}, the cheapest candidate at the reference bucket "
                     f"{ref_name} whose stored weights every bucket can run with "
                     f"({'; '.join(skipped)})")
    if mesh is not None:
        reference += f"; mesh pinned to {_mesh_text(mesh)} by the caller"
    if not share_weights:
        reference += ("; weights NOT shared (share_weights=False): a bucket whose layout "
                      "stores them otherwise keeps its own copy")
    choices = {}
    for key in buckets:
        phase, bucket = key
        share = sharing(key, m, stored)
        best = share[0]
        f = free[key].best
        aside = []
        for c in cands[key]:
            if c.step_s >= best.step_s:
                break
            if c.mesh.to_dict() == m and (c.ffn_layout, c.attention_layout) not in {
                    tuple(a.split(" ")[0].split("/")) for a in aside}:
                aside.append(f"{c.ffn_layout}/{c.attention_layout} "
                             f"({100 * (c.step_s / best.step_s - 1):+.1f}%) stores "
                             + _difference(stored_weights(c.ffn_layout, m), stored))
        nxt = share[1] if len(share) > 1 else None
        choices[key] = LayoutChoice(
            phase, bucket.batch, bucket.length, best.ffn_layout, best.attention_layout, m,
            best.step_s, f"{f.ffn_layout}/{f.attention_layout} {f.mesh.text}",
            f.step_s,
            None if nxt is None else f"{nxt.ffn_layout}/{nxt.attention_layout} "
            f"({100 * (nxt.step_s / best.step_s - 1):+.1f}%)", aside)
    return EngineLayouts(hw.name, chips, m, stored, reference, choices, share_weights)


# ---------------------------------------------------------------------------------------------
# Compiling: one mw.shard program per bucket, handed to the engine with its shardings


class CompiledStep:
    """One bucket's program, as the engine's `compile_fn` returns it.

    Called like the model's step (`prefill(params, tokens, cache)`, `decode_step(params,
    tokens, cache, positions)`) -> (logits, cache). `in_shardings` is the argument tree of
    the shardings the program takes (the engine places the weights and the KV cache with them
    once). A weight placed otherwise is copied once and the copy kept (the engine lists such
    buckets in `weight_copies`); any other argument placed otherwise is put on the mesh at
    each call.
    An argument the program converts when it is placed (`Compiled.load_transforms`: an
    interleaved fused weight, int8) has None there: `Compiled.place` converts and places it
    once per array and keeps the result. `layout` and `why` name the layout for the
    engine's per-bucket table.
    """

    def __init__(self, compiled, example_args: tuple, layout: str, why: str = "",
                 seconds: float = 0.0) -> None:
        import jax
        from jax.sharding import NamedSharding

        self.record = compiled  # passes.compiler.Compiled
        self.layout = layout
        self.why = why
        self.seconds = seconds  # mw.shard: trace, passes, lower, XLA compile
        mesh = compiled.jax_mesh
        flat, self._in_tree = jax.tree_util.tree_flatten((tuple(example_args), {}))
        self._transforms = getattr(compiled, "load_transforms", None) or {}
        self._in, k = [], 0
        for i, x in enumerate(flat):  # caller's argument i -> the program's argument k
            steps = self._transforms.get(i)
            if not steps:
                self._in.append(NamedSharding(mesh, compiled.in_specs[k].partition_spec()))
                k += 1
                continue
            self._in.append(None)
            ys = [x]  # how many program arguments it becomes (int8: values and scales)
            for step in steps:
                ys = [z for y in ys for z in step(y)]
            k += len(ys)
        self._out_tree = compiled.graph.out_tree
        self._call = compiled.compiled
        self._jax = jax
        self._n_weights = len(jax.tree_util.tree_leaves(example_args[0]))
        self._copies: dict[int, tuple] = {}  # weight index -> (weakref to it, its copy)

    @property
    def in_shardings(self) -> tuple:
        args, _ = self._jax.tree_util.tree_unflatten(self._in_tree, self._in)
        return args

    def __call__(self, *args):
        flat = self._jax.tree_util.tree_leaves((args, {}))
        if self._transforms:
            placed = self.record.place(flat)
        else:
            placed = [x if getattr(x, "sharding", s) == s else self._put(i, x, s)
                      for i, (x, s) in enumerate(zip(flat, self._in))]
        return self._jax.tree_util.tree_unflatten(self._out_tree, self._call(*placed))

    def _put(self, i: int, x, sharding):
        """An argument placed otherwise than this program takes it. A weight (an argument that
        comes back as the same array on every call) is placed once and the copy kept while
        the original lives; anything else is put on the mesh each call."""
        hit = self._copies.get(i)
        if hit is not None and hit[0]() is x:
            return hit[1]
        placed = self._jax.device_put(x, sharding)
        if i < self._n_weights:
            self._copies[i] = (weakref.ref(x), placed)
        return placed


class ShardedCompiler:
    """The engine's `compile_fn`: `mw.shard` each (phase, bucket) with the layout
    `plan_layouts` chose for it, forced on the engine's mesh, the KV cache donated."""

    def __init__(self, model, params: dict, devices: Sequence, layouts: EngineLayouts,
                 hardware: str = "cpu") -> None:
        self.model, self.params, self.devices = model, params, list(devices)
        self.layouts, self.hardware = layouts, hardware

    def __call__(self, phase: str, bucket) -> CompiledStep:
        from meshwright.passes.compiler import make_mesh

        import meshwright as mw

        c = self.layouts.choice(phase, bucket)
        mesh = make_mesh(c.mesh, self.devices)
        step = mw.shard(self.model.fn(phase), mesh=mesh, phase=phase, hardware=self.hardware,
                        force={"ffn": c.ffn, "attention": c.attention, "mesh": c.mesh},
                        donate_argnums=(2,))
        args = example_args(self.model, self.params, phase, bucket.batch, bucket.length)
        t0 = time.perf_counter()
        compiled = step.compiled(*args)
        seconds = time.perf_counter() - t0
        if (compiled.ffn_layout, compiled.attention_layout) != (c.ffn, c.attention):
            raise RuntimeError(f"mw.shard compiled {compiled.ffn_layout}/"
                               f"{compiled.attention_layout}, the plan said {c.name}")
        return CompiledStep(compiled, args, c.name, c.why, seconds)


def example_args(model, params, phase: str, batch: int, length: int) -> tuple:
    """Zero arguments (and the real weights) of the engine's step at one bucket (what
    `compile_fn` serves): decode (params, tokens (batch,), cache of `length` positions,
    positions (batch,)); prefill (params, tokens (batch, length), cache of `length`
    positions, last (batch,)). `model`: a Model, a model from functions, or a
    TransformerConfig."""
    import jax.numpy as jnp
    from meshwright.models import TransformerConfig, build

    if isinstance(model, TransformerConfig):
        model = build(model)
    cache = model.init_cache(batch, length)
    rows = jnp.zeros((batch,), jnp.int32)
    if phase == "prefill":
        return params, jnp.zeros((batch, length), jnp.int32), cache, rows
    return params, rows, cache, rows


def sharded_engine(model, params: dict, devices: Sequence, *, hardware: str = "cpu",
                   mesh: dict | None = None, share_weights: bool = True,
                   max_slots: int = 8, max_len: int = 128, weights: str | None = None,
                   progress: bool = False, **engine_kwargs):
    """An `Engine` whose every bucket is `mw.shard`-compiled on a mesh of `devices` in the
    layout `plan_layouts` picks for it (planned with the `hardware` profile). The weights are
    placed once, the KV cache takes each decode bucket's cache sharding. With
    `share_weights=False` a bucket may run a layout that stores the weights otherwise
    (`engine.weight_copies` lists those; each keeps a copy). The buckets are the engine's
    (`kv_lengths`, `prefill_rows`, `prefill_lengths`, `prefill_tokens` among
    `engine_kwargs`): decode is planned at each KV window length, so the planner prices the
    live context of the bucket, not max_len. `engine.layout_plan` is the EngineLayouts.

    `model` may be a model served from functions (`models.from_functions`): the planner then
    prices the Transformer read off its traced decode step (`planning_config`), and each
    bucket's cache sharding is the one `mw.shard` gives the cache arrays, in their own
    layout."""
    from meshwright.models import FunctionModel, Model, build
    from meshwright.runtime.engine import Engine

    model = model if isinstance(model, (Model, FunctionModel)) else build(model)
    warmup = engine_kwargs.pop("warmup", True)  # False: each bucket compiles on first use
    engine = Engine(model, params, max_slots=max_slots, max_len=max_len, warmup=False,
                    progress=progress, **engine_kwargs)  # resolves the buckets; unrolls a scan
    cfg = engine.config or engine.model.planning_config(engine.params, engine.max_len)
    weights = weights or ("bf16" if cfg.dtype == "bfloat16" else "fp32")
    from meshwright.passes.compiler import node_groups

    nodes = len(node_groups(devices))  # the processes' devices: one node each
    plan = plan_layouts(cfg, engine.buckets(), chips=len(devices), hardware=hardware,
                        weights=weights, mesh=mesh, share_weights=share_weights,
                        nodes=nodes if nodes > 1 else None)
    engine.compile_fn = ShardedCompiler(engine.model, engine.params, devices, plan,
                                        hardware=hardware)
    engine.layout_plan = plan
    if warmup:
        engine.compile_all(progress=progress)
    return engine


# ---------------------------------------------------------------------------------------------
# A pinned build: one FFN layout and mesh forced on every bucket, for callers that place the
# weights and the KV cache themselves (the multi-process engine, `distributed_engine.py`).
# `sharded_engine` above is the per-bucket build (the demo's, bench's, README's).


@dataclass
class CompiledBucket:
    phase: str
    batch: int
    length: int
    planned: str  # the planner's own choice for this bucket: "ffn/attention mesh"
    compiled: str  # what was compiled (after the pin)
    seconds: float
    fallbacks: list[str]
    step: object  # ShardedFunction
    specs: object  # input PartitionSpecs as the argument tree
    mesh: object  # the jax Mesh it was compiled for


@dataclass
class ShardedEngine:
    """What `distributed_engine.distributed_sharded_engine` builds on `compile_buckets`."""

    engine: object  # runtime.engine.Engine, every bucket compiled through mw.shard
    buckets: dict  # (phase, Bucket) -> CompiledBucket
    weights_moved: list[str]  # buckets whose steps take the weights in another layout

    @property
    def weights_placed_once(self) -> bool:
        """Every bucket takes the weights in the layout they were placed in."""
        return not self.weights_moved


def _layout_name(ffn: str, attention: str, mesh: dict) -> str:
    return f"{ffn}/{attention} {_mesh_text(mesh)}"


def plan_for(config, *, phase: str, batch: int, context: int, devices: Sequence):
    """The analytical planner's choice on `devices` (cpu profile, fp32 weights): over several
    processes' devices each process is a node, and the plan is the best layout stretched over
    them (what mw.shard lowers across nodes)."""
    from meshwright.passes.compiler import node_groups
    from meshwright.passes.planner import plan_config

    nodes = len(node_groups(devices))
    across = {"nodes": nodes, "cross_node": "stretched"} if nodes > 1 else {}
    return plan_config(config, hardware="cpu", chips=len(devices), batch=batch,
                       context=context, phase=phase, weights="fp32", **across)


def choose_pin(plan) -> tuple[dict, str]:
    """The FFN layout and mesh to force on every bucket, from the decode plan at the largest
    bucket, and why: the planner's choice when it is weight-stationary; otherwise the
    cheapest weight-stationary candidate, since weight-gathered layouts split the batch over
    chips and cannot run the small buckets (batch 1)."""
    def runs(c) -> bool:  # across nodes: each axis over the nodes mw.make_mesh lays it over
        if ffn_layout(c.ffn_layout).splits_batch:  # a batch-1 bucket cannot run it
            return False
        return plan.nodes == 1 or c.mesh == c.mesh.over_nodes(plan.nodes)

    best = plan.best
    if runs(best):
        return ({"ffn": best.ffn_layout, "mesh": best.mesh.to_dict()},
                f"the planner's choice at batch {plan.batch}")
    for c in plan.candidates:
        if runs(c):
            why = (f"the cheapest weight-stationary candidate at batch {plan.batch}; the "
                   f"planner's {best.ffn_layout} splits the batch and cannot run batch 1")
            return {"ffn": c.ffn_layout, "mesh": c.mesh.to_dict()}, why
    raise ValueError(f"no weight-stationary layout for {plan.model} on {plan.chips} chips: "
                     "a pinned build needs one that runs every bucket")


def compile_buckets(model, params, mesh, buckets, *, pin: dict,
                    progress: bool = False) -> dict:
    """`mw.shard` every (phase, Bucket) with `pin` forced on the jax `mesh`;
    {(phase, bucket): CompiledBucket}."""
    import jax

    import meshwright as mw

    todo = list(buckets)
    bar = None
    if progress:
        from meshwright.progress import bar as progress_bar

        bar = progress_bar(todo, desc="mw.shard", unit="bucket")
    out = {}
    for phase, bucket in bar if bar is not None else todo:
        if bar is not None:
            bar.set_postfix_str(f"{phase} {bucket.batch}x{bucket.length}")
        free = plan_for(model.config, phase=phase, batch=bucket.batch, context=bucket.length,
                        devices=list(mesh.devices.flat))
        step = mw.shard(model.fn(phase), mesh=mesh, phase=phase, hardware="cpu", force=pin,
                        donate_argnums=(2,))
        args = example_args(model.config, params, phase, bucket.batch, bucket.length)
        t0 = time.perf_counter()
        c = step.compiled(*args)
        seconds = time.perf_counter() - t0
        specs = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure((args, {})),
                                             [s.partition_spec() for s in c.in_specs])[0]
        out[(phase, bucket)] = CompiledBucket(
            phase, bucket.batch, bucket.length,
            _layout_name(free.ffn_layout, free.attention_layout, free.mesh),
            _layout_name(c.ffn_layout, c.attention_layout, c.mesh_shape), seconds,
            list(c.fallbacks), step, specs, c.jax_mesh)
    if bar is not None:
        bar.close()
    return out
