"""Passes and the pass manager.

A pass is a small frozen dataclass: `name` (a ClassVar), options as fields, and
`__call__(graph, ctx) -> graph`. Analyses write `node.meta[...]` and `graph.meta[...]`;
rewrites read what analyses wrote. Every pass is registered in `PASSES` by name.

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
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from meshwright.ir import Graph

PASSES: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Stage:
    """One stage of `mw.shard`'s pipeline."""

    name: str
    module: str  # the module that defines its pass (trace: the tracer; lower: mw.shard)
    leaves: str  # what the program is after it (the diagram in docs/overview.md)
    when: str = ""  # the option it runs under, if not always


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
    Stage("quantize-int8", "meshwright.passes.quantize", "int8 weights", when="weights='int8'"),
    Stage("collective-einsum", "meshwright.passes.collective_einsum", "matmuls looped"),
    Stage("lower", "meshwright.passes.compiler", "shard_map program"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
# The stages mw.shard runs before planning (its `passes=` option replaces them).
ANALYSES: tuple[str, ...] = STAGES[1:STAGES.index("plan")]

# Pass name -> the module that defines it (imported on first use): every stage that is a
# pass (trace makes the graph; lower is mw.shard's compile boundary), and weights-first.
PASS_MODULES: dict[str, str] = {
    **{s.name: s.module for s in PIPELINE if s.name not in ("trace", "lower")},
    "weights-first": "meshwright.passes.weights_first",
}


def pipeline_diagram(width: int = 100) -> str:
    """The pipeline as the text diagram of docs/overview.md, wrapped at `width`."""
    pieces = ["fn"]
    for s in PIPELINE:
        arrow = f"─{s.name}{f' ({s.when})' if s.when else ''}─>"
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


@dataclass
class PassContext:
    """What passes share besides the graph: user options and results for later passes."""

    options: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


class PassError(Exception):
    """A pass failed; the message names it and the passes that ran before it."""


def get_pass(name: str, **options) -> Pass:
    if name not in PASSES and name in PASS_MODULES:
        importlib.import_module(PASS_MODULES[name])
    if name in ("trace", "lower"):
        raise KeyError(f"{name!r} is a stage of mw.shard, not a pass to run alone: "
                       + ("mw.trace(fn, *args) makes the graph" if name == "trace" else
                          "mw.shard(fn, ...).lower(*args) lowers it"))
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


class PassManager:
    """Runs passes in order; between passes it can verify, print and time.

    `print_after` names passes after which the graph text is handed to `printer`
    (default: print). A failing pass raises PassError naming it and its predecessors.
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

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        done: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                graph = p(graph, ctx)
                if self.verify:
                    graph.verify()
            except Exception as e:
                raise PassError(f"an error occurred when running the {p.name!r} pass after the "
                                f"following passes: {done}: {type(e).__name__}: {e}") from e
            self.timings[p.name] = time.perf_counter() - start
            done.append(p.name)
            if p.name in self.print_after:
                self.printer(p.name, graph)
        return graph
