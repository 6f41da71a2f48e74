"""Sweep batch x chips x layouts x weight format and find the Pareto frontiers of Pope et al.
Figure 1: latency against MFU, and latency against cost (chip-seconds per token).

A point is one (phase, weights, chips, batch, FFN layout, attention layout) at its best mesh,
kept only if it fits in memory. Latency is the step time: the whole prompt batch for prefill,
one token (per sequence) for decode.

    >>> r = sweep("palm-8b", hardware="tpu-v4", chips=(8,), batches=(1, 64),
    ...           phases=("decode",), weights=("bf16",), progress=False)
    >>> len(r.frontier("decode", "mfu")) >= 1
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshwright.passes.cost_model import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    CostOptions,
    LayoutNotApplicable,
    StepWorkload,
    evaluate,
    factorizations,
)
from meshwright.passes.hardware import get_hardware
from meshwright.passes.planner import resolve_model

DEFAULT_CHIPS = (8, 16, 32, 64, 128, 256)
DEFAULT_BATCHES = tuple(2**i for i in range(11))  # 1 ... 1024


@dataclass(frozen=True)
class Point:
    phase: str
    weights: str
    chips: int
    batch: int
    ffn_layout: str
    attention_layout: str
    mesh: str
    step_seconds: float  # prefill: the prompt batch; decode: one token per sequence
    mfu: float
    cost_per_token: float  # chip-seconds per token

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pareto(points: list[Point], better: str) -> list[Point]:
    """Points not dominated in (lower step time, `better`): higher MFU or lower cost.

        >>> a = Point("decode", "bf16", 8, 1, "ws-2d", "heads", "2x2x2", 1.0, 0.1, 8.0)
        >>> b = Point("decode", "bf16", 8, 2, "ws-2d", "heads", "2x2x2", 2.0, 0.05, 8.0)
        >>> pareto([a, b], "mfu") == [a]
        True
    """
    if better == "mfu":
        key = lambda p: -p.mfu
    elif better == "cost":
        key = lambda p: p.cost_per_token
    else:
        raise ValueError(f"better must be 'mfu' or 'cost', got {better!r}")
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.step_seconds, key(p))):
        if key(p) < best:
            front.append(p)
            best = key(p)
    return front


@dataclass
class FrontierResult:
    model: str
    hardware: str
    context: int
    points: list[Point]  # every feasible (layout at its best mesh)
    evaluated: int  # candidates costed, including meshes and non-fitting ones
    seconds: float = 0.0  # wall time of the sweep
    phases: tuple[str, ...] = ("prefill", "decode")
    notes: list[str] = field(default_factory=list)

    def frontier(self, phase: str, better: str = "mfu") -> list[Point]:
        return pareto([p for p in self.points if p.phase == phase], better)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "hardware": self.hardware, "context": self.context,
            "evaluated": self.evaluated, "seconds": self.seconds,
            "points": len(self.points),
            "frontier": {ph: {b: [p.to_dict() for p in self.frontier(ph, b)]
                              for b in ("mfu", "cost")} for ph in self.phases},
        }

    def format(self) -> str:
        head = (f"{self.model} on {self.hardware}, context {self.context}: {len(self.points)} "
                f"feasible points of {self.evaluated} candidates in {self.seconds:.2f} s")
        lines = [head]
        for ph in self.phases:
            front = self.frontier(ph, "mfu")
            unit = "ms/token" if ph == "decode" else "s/batch"
            scale = 1e3 if ph == "decode" else 1.0
            lines.append("")
            lines.append(f"{ph}: latency-vs-MFU Pareto frontier ({len(front)} points)")
            lines.append(f"  {unit:>10} {'MFU':>6} {'chips':>6} {'batch':>6} {'weights':>8}"
                         f"  layout")
            for p in front:
                lines.append(f"  {p.step_seconds * scale:10.4g} {p.mfu:6.1%} {p.chips:6d} "
                             f"{p.batch:6d} {p.weights:>8}  {p.ffn_layout}/"
                             f"{p.attention_layout} {p.mesh}")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Draw latency-vs-MFU and latency-vs-cost frontiers per phase (matplotlib PNG)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("drawing needs matplotlib: pip install 'meshwright[plot]'") from e
        fig, axes = plt.subplots(2, len(self.phases), figsize=(6 * len(self.phases), 8.5),
                                 squeeze=False)
        colors = {"bf16": "tab:blue", "int8": "tab:orange", "fp32": "tab:green"}
        for col, ph in enumerate(self.phases):
            pts = [p for p in self.points if p.phase == ph]
            scale, unit = (1e3, "latency per token (ms)") if ph == "decode" else \
                (1.0, "latency of the prompt batch (s)")
            for row, (better, label) in enumerate((("mfu", "MFU"),
                                                   ("cost", "chip-seconds per token"))):
                ax = axes[row][col]
                for w in sorted({p.weights for p in pts}):
                    sub = [p for p in pts if p.weights == w]
                    ys = [p.mfu if better == "mfu" else p.cost_per_token for p in sub]
                    ax.scatter([p.step_seconds * scale for p in sub], ys, s=6, alpha=0.25,
                               color=colors.get(w, "gray"), label=f"{w} layouts")
                    front = pareto(sub, better)
                    ax.plot([p.step_seconds * scale for p in front],
                            [p.mfu if better == "mfu" else p.cost_per_token for p in front],
                            "-o", ms=3, color=colors.get(w, "gray"), label=f"{w} frontier")
                ax.set_xscale("log")
                if better == "cost":
                    ax.set_yscale("log")
                ax.set_xlabel(unit)
                ax.set_ylabel(label)
                ax.set_title(f"{self.model} {ph} on {self.hardware}, context {self.context}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def sweep(model, hardware="tpu-v4", chips=None, batches=None, context: int = 2048,
          phases=("prefill", "decode"), weights=("bf16", "int8"),
          overrides=(), options: CostOptions | None = None,
          progress: bool = True) -> FrontierResult:
    """Cost every (phase, weights, chips, batch, layout, mesh); keep each layout's best mesh."""
    import time

    t0 = time.perf_counter()
    cfg = resolve_model(model, overrides)
    hw = get_hardware(hardware)
    chips = tuple(chips or [c for c in DEFAULT_CHIPS if c <= hw.max_chips])
    batches = tuple(batches or DEFAULT_BATCHES)
    for c in chips:
        if not 1 <= c <= hw.max_chips:
            raise ValueError(f"chips must be in 1..{hw.max_chips} for {hw.name}, got {c}")
    options = options or CostOptions()
    jobs = [(ph, w, n, b) for ph in phases for w in weights for n in chips for b in batches]
    for ph, w, _, b in jobs[:1]:
        StepWorkload(b, context, ph, w)  # validate names early, with a clear error
    bar = None
    if progress:
        from meshwright.progress import bar as progress_bar

        bar = progress_bar(total=len(jobs), desc=f"frontier {cfg.name}", unit="config")
    points: list[Point] = []
    evaluated = 0
    meshes = {n: factorizations(n) for n in chips}
    for ph, w, n, b in jobs:
        work = StepWorkload(b, context, ph, w)
        best: dict[tuple[str, str], object] = {}
        for mesh in meshes[n]:
            for ffn in FFN_LAYOUTS:
                for att in ATTENTION_LAYOUTS:
                    try:
                        c = evaluate(cfg, hw, mesh, work, ffn, att, options)
                    except LayoutNotApplicable:
                        continue
                    evaluated += 1
                    if c.fits and ((ffn, att) not in best or c.step_s < best[ffn, att].step_s):
                        best[ffn, att] = c
        for (ffn, att), c in best.items():
            points.append(Point(ph, w, n, b, ffn, att, str(c.mesh), c.step_s, c.mfu,
                                c.cost_per_token))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return FrontierResult(model=cfg.name, hardware=hw.name, context=context, points=points,
                          evaluated=evaluated, seconds=time.perf_counter() - t0,
                          phases=tuple(phases))
