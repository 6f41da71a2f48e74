"""Passes, the context they share, and the pass manager.

A pass is a small frozen dataclass: `name` (a ClassVar), options as fields, and
`__call__(graph, ctx) -> graph`. What belongs to the program (roles, blocks, specs, reports)
goes on the graph (`node.meta[...]`, `graph.meta[...]`, which the printer and the golden
tests read); what the caller asked for is in the `PassContext`, and what a pass leaves for
the passes after it that is not part of the program (the chosen layouts and mesh, the
load-time conversions, the program) in its typed `ctx.results`. Every pass is registered in
`PASSES` by name; `PIPELINE` is mw.shard's list of them.

    >>> from meshwright.passes import PassManager
    >>> pm = PassManager(["infer-axes", "find-blocks"], verify=True)
    >>> graph = pm.run(graph)
    >>> pm.timings        # seconds per pass
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from jax.sharding import Mesh as JaxMesh
    from meshwright.ir import Graph
    from meshwright.models.config import TransformerConfig
    from meshwright.passes.compiler import Program
    from meshwright.passes.plan import LayoutChoice
    from meshwright.passes.sharding import Layout, MeshInfo

PASSES: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Stage:
    """One stage of `mw.shard`'s pipeline."""

    name: str
    module: str  # the module that defines its pass (trace: the tracer, which makes the graph)
    leaves: str  # what the program is after it (the diagram in docs/overview.md)
    when: tuple[str, str] = ()  # (context field, value): runs only when ctx.<field> == value

    def runs(self, ctx: PassContext) -> bool:
        """Whether mw.shard runs this stage under `ctx`'s options."""
        return not self.when or getattr(ctx, self.when[0]) == self.when[1]


# mw.shard's pipeline, in the order it runs: the one list the CLI, `step.graph`, the docs'
# diagram (tests/test_pipeline_list.py) and the pass registry read.
PIPELINE: tuple[Stage, ...] = (
    Stage("trace", "meshwright.ir.trace", "Graph"),
    Stage("infer-axes", "meshwright.passes.infer_axes", "axes labelled"),
    Stage("find-blocks", "meshwright.passes.find_blocks", "blocks"),
    Stage("fuse-parallel-block", "meshwright.passes.fuse", "one reduction per parallel block"),
    Stage("plan", "meshwright.passes.plan", "layouts"),
    Stage("annotate", "meshwright.passes.annotate", "shardings"),
    Stage("interleave-fused", "meshwright.passes.interleave", "fused weights interleaved"),
    Stage("quantize-int8", "meshwright.passes.quantize", "int8 weights", when=("weights", "int8")),
    Stage("collective-einsum", "meshwright.passes.collective_einsum", "matmuls looped"),
    Stage("lower", "meshwright.passes.compiler", "shard_map program"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
# The stages mw.shard runs before planning (its `passes=` option replaces them).
ANALYSES: tuple[str, ...] = STAGES[1:STAGES.index("plan")]

# Pass name -> the module that defines it (imported on first use): every stage but trace
# (which makes the graph), and weights-first.
PASS_MODULES: dict[str, str] = {
    **{s.name: s.module for s in PIPELINE if s.name != "trace"},
    "weights-first": "meshwright.passes.weights_first",
}


def pipeline_diagram(width: int = 100) -> str:
    """The pipeline as the text diagram of docs/overview.md, wrapped at `width`."""
    pieces = ["fn"]
    for s in PIPELINE:
        arrow = f"─{s.name}{f' ({s.when[0]}={s.when[1]!r})' if s.when else ''}─>"
        pieces.append(f"{arrow} {s.leaves}")
    pieces.append("─jit─> run")
    lines, line = [], ""
    for p in pieces:
        if line and len(line) + 1 + len(p) > width:
            lines.append(line)
            line = "   " + p
        else:
            line = f"{line} {p}" if line else p
    return "\n".join([*lines, line])


def rule_registry(table: dict) -> Callable:
    """A decorator factory filling a per-primitive rule table: `@rule("add", "sub")`."""

    def rule(*names: str) -> Callable:
        def register_rule(fn: Callable) -> Callable:
            for n in names:
                table[n] = fn
            return fn

        return register_rule

    return rule


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its `name`."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}")
    PASSES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Force:
    """What the caller pins instead of the planner's choice (`mw.shard(force=...)`)."""

    ffn: str | None = None  # an FFN layout name (LAYOUT_NAMES_FFN)
    attention: str | None = None  # an attention layout name (LAYOUT_NAMES_ATTENTION)
    mesh: tuple[int, int, int] | None = None  # (x, y, z); None: the planner's factorisation
    cross_node: str | None = None  # across nodes: "replicas", "pipeline" or "stretched"
    microbatches: int | None = None  # a pipeline's microbatches (None: the planner's)


@dataclass
class Results:
    """What passes leave for the passes after them that is not part of the program text.
    Each slot is written by the pass named in its comment, and read after it."""

    config: TransformerConfig | None = None  # plan: the Transformer the graph describes
    choice: LayoutChoice | None = None  # plan: the layouts, mesh and predicted cost chosen
    mesh: MeshInfo | None = None  # plan: the mesh's axis sizes the specs are written for
    jax_mesh: JaxMesh | None = None  # plan: the devices laid out as that mesh (None: none)
    layout: Layout | None = None  # annotate: the layout it annotated (attention's batch order)
    # interleave-fused, quantize-int8: caller's flat argument index -> the conversions applied
    # to it once when placed (each maps one array to a list of arrays; int8: values, scale)
    load_transforms: dict[int, list] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # annotate, lower: ran replicated, why
    program: Program | None = None  # lower: the jitted and lowered shard_map program


@dataclass(frozen=True)
class PassContext:
    """What passes share besides the graph: the caller's options, fixed for the run, and the
    typed `results` later passes read. mw.shard fills every field; a pass run alone needs
    only those it reads (plan without devices plans for `chips`; annotate and after need a
    mesh, which plan chooses)."""

    devices: tuple = ()  # the devices to shard over (mw.shard: its mesh's); () none
    hardware: str = "tpu-v4"  # the profile plan prices with and collective-einsum decides by
    phase: str = "auto"  # "prefill", "decode", or "auto": from the traced shapes
    weights: str = "bf16"  # weight format planned for ("native": the traced dtype's); "int8"
    force: Force = Force()  # layouts and mesh the caller pins
    strict: bool = False  # NotAsPlanned instead of running any part replicated
    arguments: tuple[str, ...] = ()  # the caller's flat arguments' paths, as traced
    donated: tuple[int, ...] = ()  # of those, the ones whose buffers the program may reuse
    example_args: tuple | None = None  # (args, kwargs) as traced: quantize-int8's error check
    results: Results = field(default_factory=Results)


class PassError(Exception):
    """A pass failed unexpectedly (a bug, or a graph it cannot handle); the message names it
    and the passes that ran before it. A ValueError (bad input: PlanError, NotAsPlanned, ...)
    keeps its type and carries the same words as a note."""


def get_pass(name: str, **options) -> Pass:
    """The pass registered as `name`, with `options` as its fields."""
    if name == "trace":
        raise KeyError("'trace' is a stage of mw.shard, not a pass: it makes the graph "
                       "(mw.trace(fn, *args))")
    if name not in PASSES and name in PASS_MODULES:
        importlib.import_module(PASS_MODULES[name])
    try:
        cls = PASSES[name]
    except KeyError:
        known = ", ".join(dict.fromkeys([*PASS_MODULES, *PASSES]))
        raise KeyError(f"unknown pass {name!r}; known passes: {known}") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise KeyError(f"pass {name!r} has no option(s) {sorted(unknown)}; "
                       f"its options: {sorted(known) or 'none'}")
    return cls(**options)


def pipeline_passes(ctx: PassContext, configured: dict[str, Pass] | None = None,
                    analyses: list[str | Pass] | None = None) -> list[str | Pass]:
    """mw.shard's passes after trace, in `PIPELINE` order: every stage that runs under `ctx`
    (`Stage.when`), as `configured[name]` where given, else by name; `analyses` replaces
    the stages before plan (mw.shard's `passes=`)."""
    configured = configured or {}
    passes: list[str | Pass] = list(analyses) if analyses is not None else []
    for stage in PIPELINE[1:]:
        if analyses is not None and stage.name in ANALYSES or not stage.runs(ctx):
            continue
        passes.append(configured.get(stage.name, stage.name))
    return passes


class PassManager:
    """Runs passes in order; between passes it can verify, print and time.

    `print_after` names passes after which the graph is handed to `printer(name, graph)`
    (default: print its text). A pass that fails with a ValueError (bad input) raises it
    as it is, with a note naming the pass and its predecessors; any other error becomes a
    PassError saying the same.
    """

    def __init__(self, passes: list[str | Pass], verify: bool = False,
                 print_after: list[str] | tuple[str, ...] = (),
                 printer: Callable[[str, Graph], None] | None = None):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        unknown = set(print_after) - {p.name for p in self.passes}
        if unknown:
            raise KeyError(f"--print-after names pass(es) not in the pipeline: {sorted(unknown)}")
        self.verify = verify
        self.print_after = set(print_after)
        self.printer = printer or (lambda name, g: print(f"// after {name}\n{g}"))
        self.timings: dict[str, float] = {}

    def run(self, graph: Graph, ctx: PassContext | None = None, start: int = 0,
            stop: int | None = None) -> Graph:
        """Run `passes[start:stop]` over `graph` (a run in pieces: the same `ctx` each time)."""
        ctx = ctx or PassContext()
        done = [p.name for p in self.passes[:start]]
        for p in self.passes[start:stop]:
            start = time.perf_counter()
            try:
                graph = p(graph, ctx)
                if self.verify:
                    graph.verify()
            except Exception as e:
                where = (f"an error occurred when running the {p.name!r} pass after the "
                         f"following passes: {done}")
                if isinstance(e, ValueError):  # the user's input: keep what they catch
                    e.add_note(where)
                    raise
                raise PassError(f"{where}: {type(e).__name__}: {e}") from e
            self.timings[p.name] = time.perf_counter() - start
            done.append(p.name)
            if p.name in self.print_after:
                self.printer(p.name, graph)
        return graph
