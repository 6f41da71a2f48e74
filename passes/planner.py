"""The planner: choose the mesh factorisation, FFN layout and attention layout for one step.

Algorithm: cost every (X*Y*Z = chips, FFN layout, attention layout) with the analytical model
(`cost_model.evaluate`), drop the ones that cannot run or do not fit in memory, and take the
minimum step time; ties go to the earlier layout in `FFN_LAYOUTS` / `ATTENTION_LAYOUTS`, then
the smaller (x, y, z). Every candidate's cost is kept for `Plan.explain()`.

    >>> p = plan("palm-540b", hardware="tpu-v4", chips=64, batch=64, context=2048,
    ...          phase="decode", weights="int8")
    >>> p.ffn_layout, p.attention_layout, p.mesh
    ('ws-2d', 'batch', {'x': 4, 'y': 4, 'z': 4})

`plan_config` is the same planner on a `TransformerConfig` (a traced graph's blocks give one).

More chips than one node (or TPU slice) holds are `nodes` equal nodes: the planner then
decides what crosses the slow network between them -- replicas, pipeline stages, or the
layouts stretched over it -- with the two-level network model (`passes/multinode.py`), and
`explain()` says why. One node plans exactly as before.

    >>> p = plan("llama3-405b", hardware="h100", chips=16, batch=64, context=2048)
    >>> p.nodes, p.cross_node.kind in ("pipeline", "stretched")
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshwright.models.config import TransformerConfig, get_config
from meshwright.passes.cost_model import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    CandidateCost,
    CostOptions,
    LayoutNotApplicable,
    Mesh,
    StepWorkload,
    evaluate,
    factorizations,
)
from meshwright.passes.hardware import HardwareProfile, get_hardware
from meshwright.passes.multinode import (
    CROSSINGS,
    CrossNodeCost,
    NodeSplit,
    PricingContext,
    min_memory_chips,
    price_crossings,
    split_nodes,
)

DEFAULT_KV_MEMORY_FRACTION = 0.3  # Pope et al. Table 1 reserves 30% of memory for the KV cache


@dataclass
class Plan:
    """The chosen layout for one step, with the cost of every candidate.

    `to_dict()` gives the `meshwright plan --json` object; `explain()` a readable table.
    """

    model: str  # config name
    hardware: str  # profile name
    chips: int
    batch: int
    context: int
    phase: str
    weights: str
    gen_tokens: int  # decode steps counted in latency_seconds
    kv_memory_fraction: float
    best: CandidateCost  # the winner
    candidates: list[CandidateCost]  # every applicable candidate, cheapest first
    rejected: list[tuple[str, str]]  # (layout, reason) pairs that could not run at all
    blocks: list[dict]  # {"kind", "layer"} of the model the plan is for
    forced: dict  # {"ffn": ..., "attention": ...} pins given by the caller
    config: TransformerConfig = field(repr=False)
    notes: list[str] = field(default_factory=list)
    # Beyond one node: how the chips sit in nodes, the chosen way of crossing them (`best`
    # is then its layout: on one node, one pipeline stage, or the stretched mesh), every
    # other way priced, and the ways that could not run with their reasons.
    split: NodeSplit | None = None
    cross_node: CrossNodeCost | None = None
    cross_node_candidates: list[CrossNodeCost] = field(default_factory=list)
    cross_node_rejected: list[tuple[str, str]] = field(default_factory=list)
    hardware_profile: HardwareProfile | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """One line; `explain()` gives the table, `to_dict()` everything.

            Plan(palm-540b decode batch 64 context 2048 on 64 tpu-v4 chips: ws-2d/batch on
            mesh 4x4x4, 36.9 ms/step, MFU 0.11, fits; 206 candidates, 74 rejected)
        """
        b = self.best
        where = (f" ({self.split}; {self.cross_node.label})" if self.cross_node else "")
        return (f"Plan({self.model} {self.phase} batch {self.batch} context {self.context} "
                f"on {self.chips} {self.hardware} chips{where}: {b.ffn_layout}/"
                f"{b.attention_layout} on mesh {b.mesh}, {self.step_seconds * 1e3:.3g} ms/step, "
                f"MFU {self.mfu:.2f}, {'fits' if self.fits else 'does not fit'}; "
                f"{len(self.candidates)} candidates, {len(self.rejected)} rejected)")

    @property
    def nodes(self) -> int:
        """Nodes (or TPU slices) the plan spans."""
        return self.split.nodes if self.split else 1

    # ---- the plan --json surface ----------------------------------------------------------
    @property
    def ffn_layout(self) -> str:
        return self.best.ffn_layout

    @property
    def attention_layout(self) -> str:
        return self.best.attention_layout

    @property
    def mesh(self) -> dict:
        return self.best.mesh.to_dict()

    @property
    def _whole(self) -> CandidateCost | CrossNodeCost:
        """What the step's totals come from: the way of crossing nodes, else the layout."""
        return self.cross_node or self.best

    @property
    def step_seconds(self) -> float:
        return self._whole.step_s

    @property
    def latency_seconds(self) -> float:
        """Prefill: the step. Decode: `gen_tokens` steps at this context."""
        steps = self.gen_tokens if self.phase == "decode" else 1
        return self.step_seconds * steps

    @property
    def mfu(self) -> float:
        return self._whole.mfu

    @property
    def fits(self) -> bool:
        return self._whole.fits

    def to_dict(self) -> dict:
        """The `meshwright plan --json` object (the keys docs/cost_model.md documents, and more).

        Across nodes, `mesh` is the layout's mesh (one node's, a pipeline stage's, or the
        stretched mesh), `slow_axes` the axes that cross nodes (`replica`, `stage` outside
        it; x, y, z of a stretched mesh), `stages` the pipeline stages, and `breakdown` the
        whole step's, with `slow_network_s` (time on the network between nodes) and
        `bubble_s` (pipeline fill and drain)."""
        b, w = self.best, self._whole
        x = self.cross_node
        breakdown = w.breakdown() if x else {**b.breakdown(), "bubble_s": 0.0}
        return {
            "model": self.model, "hardware": self.hardware, "chips": self.chips,
            "batch": self.batch, "context": self.context, "phase": self.phase,
            "weights": self.weights, "gen_tokens": self.gen_tokens,
            "nodes": self.nodes,
            "chips_per_node": self.split.chips_per_node if self.split else self.chips,
            "slow_axes": x.slow_axes if x else {},
            "stages": x.stage_list() if x else [],
            "ffn_layout": b.ffn_layout, "attention_layout": b.attention_layout,
            "mesh": b.mesh.to_dict(),
            "step_seconds": w.step_s, "latency_seconds": self.latency_seconds, "mfu": w.mfu,
            "breakdown": breakdown,
            "weight_bytes_per_chip": w.weight_bytes_per_chip,
            "kv_cache_bytes_per_chip": w.kv_cache_bytes_per_chip,
            "max_context": w.max_context, "kv_memory_fraction": self.kv_memory_fraction,
            "fits": w.fits,
            "cost_chip_seconds_per_token": w.cost_per_token,
            "overhead_seconds": w.overhead_s,
            "memory_bytes_per_chip": w.memory_bytes_per_chip,
            "padded_heads": b.padded_heads,
            "bound": b.bound, "forced": self.forced,
            "notes": self.notes + (x.notes if x else []) + b.notes,
            "cross_node": x.to_dict() if x else None,
            "cross_node_candidates": [c.to_dict() for c in self.cross_node_candidates],
            "cross_node_rejected": [{"way": name, "reason": why}
                                    for name, why in self.cross_node_rejected],
            "candidates": [_candidate_dict(c) for c in self.candidates],
            "rejected": [{"layout": name, "reason": why} for name, why in self.rejected],
            "blocks": self.blocks,
        }

    def runners_up(self) -> list[CandidateCost]:
        """The best mesh of every other (FFN, attention) pair, cheapest first."""
        seen = {(self.best.ffn_layout, self.best.attention_layout)}
        out = []
        for c in self.candidates:
            key = (c.ffn_layout, c.attention_layout)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out

    def explain(self) -> str:
        """A table of the winner and the best of every other layout, with the reason."""
        if self.cross_node is not None:
            return self._explain_across_nodes()
        b = self.best
        head = (f"{self.model} on {self.chips} x {self.hardware}, {self.phase}, batch "
                f"{self.batch}, context {self.context}, {self.weights} weights")
        lines = [head, "=" * len(head), ""]
        lines.append(
            f"chosen: FFN {b.ffn_layout}, attention {b.attention_layout}, mesh "
            f"x={b.mesh.x} y={b.mesh.y} z={b.mesh.z}"
            + (f"  (forced: {self.forced})" if self.forced else ""))
        lat = (f"{self.latency_seconds:.4g} s for {self.gen_tokens} tokens"
               if self.phase == "decode" else f"{self.latency_seconds:.4g} s")
        lines.append(f"step {b.step_s * 1e3:.4g} ms, latency {lat}, MFU {b.mfu:.1%}, "
                     f"{b.cost_per_token:.3g} chip-s/token, {b.bound}-bound")
        lines.append(_memory_line(b, self.kv_memory_fraction))
        for note in self.notes + b.notes:
            lines.append(f"note: {note}")
        lines.append("")
        rows = [b] + self.runners_up()
        lines += _layout_table(rows, b)
        lines.append("(times in ms per step; comm = exposed communication incl. latency)")
        lines.append("")
        lines.append("why: " + self._reason(rows))
        ran = {f"{c.ffn_layout}/{c.attention_layout}" for c in self.candidates}
        never = [(name, why) for name, why in _dedupe(self.rejected) if name not in ran]
        if never:
            lines.append("")
            lines.append("not applicable on any mesh:")
            for name, why in never:
                lines.append(f"  {name}: {why}")
        return "\n".join(lines)

    def _explain_across_nodes(self) -> str:
        """The way of crossing nodes chosen, every other way priced, and the layout inside."""
        x, b, split = self.cross_node, self.best, self.split
        hw = self.hardware_profile
        head = (f"{self.model} on {self.chips} x {self.hardware} ({split.nodes} nodes of "
                f"{split.chips_per_node}), {self.phase}, batch {self.batch}, context "
                f"{self.context}, {self.weights} weights")
        lines = [head, "=" * len(head), ""]
        lines.append(f"between nodes: {hw.dcn_name or 'network'}, "
                     f"{hw.dcn_bandwidth / 1e9:.4g} GB/s per chip at {hw.dcn_efficiency:.0%}, "
                     f"{hw.dcn_latency_s * 1e6:.3g} us per exchange; inside a node "
                     + (f"{hw.ici_bandwidth / 1e9:.4g} GB/s per chip" if not
                        hw.multinode_collective_s else
                        f"{hw.multinode_collective_s * 1e3:.3g} ms per collective and "
                        f"{hw.in_multinode_job().ici_bandwidth / 1e6:.4g} MB/s per chip while "
                        "the job spans nodes"))
        lines.append(f"chosen: {_describe(x)}" + (f"  (forced: {self.forced})"
                                                   if self.forced else ""))
        lines.append(f"  layout {'in each stage' if x.stages > 1 else 'on its mesh'}: FFN "
                     f"{b.ffn_layout}, attention {b.attention_layout}, mesh {b.mesh}"
                     + (f" at microbatch {self.batch // x.replicas // x.microbatches}"
                        if x.stages > 1 else ""))
        lat = (f"{self.latency_seconds:.4g} s for {self.gen_tokens} tokens"
               if self.phase == "decode" else f"{self.latency_seconds:.4g} s")
        lines.append(f"step {x.step_s * 1e3:.4g} ms (slow network {x.slow_network_s * 1e3:.4g} "
                     f"ms, pipeline bubble {x.bubble_s * 1e3:.4g} ms), latency {lat}, MFU "
                     f"{x.mfu:.1%}, {x.cost_per_token:.3g} chip-s/token")
        lines.append(_memory_line(x, self.kv_memory_fraction))
        for note in self.notes + b.notes:
            lines.append(f"note: {note}")
        lines.append("")
        header = (f"{'':2}{'across nodes':34}{'layout':14}{'mesh':>13}{'step ms':>10}"
                  f"{'vs best':>9}{'slow net':>10}{'bubble':>9}{'GiB/chip':>10}")
        lines.append(header)
        lines.append("-" * len(header))
        for c in self.cross_node_candidates:
            mark = "* " if c is x else "  "
            lines.append(
                f"{mark}{c.label:34}{c.layout.ffn_layout + '/' + c.layout.attention_layout:14}"
                f"{c.layout.mesh!s:>13}{c.step_s * 1e3:10.4g}{c.step_s / x.step_s - 1:+9.1%}"
                f"{c.slow_network_s * 1e3:10.4g}{c.bubble_s * 1e3:9.4g}"
                f"{c.memory_bytes_per_chip / 2**30:10.2f}")
        lines.append("(ms per step; slow net = time on the network between nodes; mesh "
                     "[n*k]: an axis over n nodes of k chips)")
        if self.cross_node_rejected:
            lines.append("")
            lines.append("cannot run:")
            for name, why in self.cross_node_rejected:
                lines.append(f"  {name}: {why}")
        lines.append("")
        lines.append("why: " + self._reason_across_nodes())
        lines.append("")
        where = ("one pipeline stage at the microbatch" if x.stages > 1 else
                 "the stretched mesh" if x.kind == "stretched" else "one node")
        lines.append(f"layouts on {where}:")
        rows = [b] + self.runners_up()
        lines += _layout_table(rows, b)
        lines.append("(times in ms per " + ("microbatch through one stage" if x.stages > 1
                                             else "step") + "; comm incl. latency)")
        return "\n".join(lines)

    def _reason_across_nodes(self) -> str:
        x = self.cross_node
        if self.forced:
            return f"forced to {self.forced}; the cheapest way for it was taken."
        if x.kind == "replicas":
            what = "each node holds a whole copy of the weights, so nothing crosses the slow " \
                   "network"
        elif x.kind == "pipeline":
            what = (f"only activations cross the slow network ({x.slow_network_s * 1e3:.3g} ms "
                    f"a step), for a {x.bubble_s * 1e3:.4g} ms bubble while the {x.stages} "
                    "stages fill and drain")
        else:
            axes = ", ".join(f"{a} (across {n} nodes)"
                             for a, n in x.layout.mesh.slow_axes.items())
            what = (f"the layout's collectives over {axes} spend {x.slow_network_s * 1e3:.3g} "
                    "ms a step on the slow network")
        parts = [f"{x.label}: {what}"]
        others = [c for c in self.cross_node_candidates if c.kind != x.kind]
        if others:
            r = others[0]
            diffs = {"its pipeline bubble": (x.bubble_s, r.bubble_s),
                     "its time on the slow network": (x.slow_network_s, r.slow_network_s),
                     "its compute": (x.compute_s, r.compute_s),
                     "its weight loading": (x.weight_load_s, r.weight_load_s),
                     "its KV cache loading": (x.kv_load_s, r.kv_load_s),
                     "its communication inside nodes": (x.comm_s - x.slow_network_s,
                                                        r.comm_s - r.slow_network_s)}
            name, (mine, theirs) = max(diffs.items(), key=lambda kv: kv[1][1] - kv[1][0])
            parts.append(f"the best {r.kind} ({r.label}) is {r.step_s / x.step_s - 1:.1%} "
                         f"slower: {name} takes {theirs * 1e3:.4g} ms against "
                         f"{mine * 1e3:.4g} ms here")
        for name, why in self.cross_node_rejected:
            if name.endswith("replicas") and x.kind != "replicas":
                parts.append(f"replicas cannot run ({why})")
                break
        return "; ".join(parts) + "."

    def _reason(self, rows: list[CandidateCost]) -> str:
        b = self.best
        if self.forced:
            return f"layout forced to {self.forced}; the cheapest mesh for it was taken."
        others = [c for c in rows[1:] if c.fits]
        if not others:
            return "the only layout that fits in memory."
        r = others[0]
        parts = {"compute": (b.compute_s, r.compute_s),
                 "weight loading": (b.weight_load_s, r.weight_load_s),
                 "KV cache loading": (b.kv_load_s, r.kv_load_s),
                 "communication": (b.comm_s, r.comm_s)}
        name, (mine, theirs) = max(parts.items(), key=lambda kv: kv[1][1] - kv[1][0])
        return (f"{b.ffn_layout}/{b.attention_layout} is {r.step_s / b.step_s - 1:.1%} faster "
                f"than the runner-up {r.ffn_layout}/{r.attention_layout} ({r.mesh}): its "
                f"{name} takes {mine * 1e3:.4g} ms instead of {theirs * 1e3:.4g} ms. "
                f"The step is {b.bound}-bound "
                f"(compute {b.compute_s * 1e3:.4g} ms vs weights+KV "
                f"{(b.weight_load_s + b.kv_load_s) * 1e3:.4g} ms).")


def _memory_line(c, kv_memory_fraction: float) -> str:
    """explain()'s memory line of a candidate (or a cross-node cost)."""
    return (f"memory per chip: weights {_gib(c.weight_bytes_per_chip)}"
            + (f" + gathered layer {_gib(c.gathered_weight_bytes_per_chip)}"
               if c.gathered_weight_bytes_per_chip else "")
            + f" + KV cache {_gib(c.kv_cache_bytes_per_chip)} = {_gib(c.memory_bytes_per_chip)}"
            f" ({'fits' if c.fits else 'does NOT fit'}); max context {c.max_context} "
            f"({kv_memory_fraction:.0%} of memory for KV)")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def _describe(x: CrossNodeCost) -> str:
    """One line: what crosses the slow network."""
    reps = (f"{x.replicas} replicas of {x.nodes_per_replica} node"
            f"{'s' if x.nodes_per_replica > 1 else ''} (batch split {x.replicas} ways); "
            if x.replicas > 1 else "")
    if x.kind == "replicas":
        return f"{x.replicas} replicas, one per node (batch split {x.replicas} ways)"
    if x.kind == "pipeline":
        return (f"{reps}pipeline of {x.stages} stages ({x.layers_per_stage} layers each, one "
                f"node each), {x.microbatches} microbatch{'es' if x.microbatches > 1 else ''}")
    axes = ", ".join(f"{a} over {n} nodes" for a, n in x.layout.mesh.slow_axes.items())
    return f"{reps}layout stretched across nodes ({axes})"


def _layout_table(rows: list[CandidateCost], best: CandidateCost) -> list[str]:
    header = (f"{'':2}{'ffn/attention':16}{'mesh':>9}{'step ms':>11}{'vs best':>10}"
              f"{'MFU':>7}{'compute':>10}{'weights':>10}{'kv':>9}{'comm':>10}"
              f"{'GiB/chip':>10}  fits")
    lines = [header, "-" * len(header)]
    for c in rows:
        mark = "* " if c is best else "  "
        lines.append(
            f"{mark}{c.ffn_layout + '/' + c.attention_layout:16}{c.mesh!s:>9}"
            f"{c.step_s * 1e3:11.4g}{c.step_s / best.step_s - 1:+10.1%}{c.mfu:7.1%}"
            f"{c.compute_s * 1e3:10.4g}{c.weight_load_s * 1e3:10.4g}"
            f"{c.kv_load_s * 1e3:9.3g}{c.comm_s * 1e3:10.4g}"
            f"{c.memory_bytes_per_chip / 2**30:10.2f}  {'yes' if c.fits else 'no'}")
    return lines


def _dedupe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for name, why in pairs:
        layout = name.split(" ")[0]
        if (layout, why) not in seen:
            seen.add((layout, why))
            out.append((layout, why))
    return out


def _candidate_dict(c: CandidateCost) -> dict:
    return {"ffn_layout": c.ffn_layout, "attention_layout": c.attention_layout,
            "mesh": c.mesh.to_dict(), "step_seconds": c.step_s, "mfu": c.mfu,
            "breakdown": c.breakdown(), "memory_bytes_per_chip": c.memory_bytes_per_chip,
            "kv_cache_bytes_per_chip": c.kv_cache_bytes_per_chip, "fits": c.fits,
            "cost_chip_seconds_per_token": c.cost_per_token, "max_context": c.max_context}


def blocks_of(cfg: TransformerConfig) -> list[dict]:
    """The blocks of a preset, as find-blocks would report them for the traced model."""
    blocks: list[dict] = [{"kind": "embedding", "layer": None}]
    for layer in range(cfg.n_layers):
        if cfg.parallel_block:
            blocks += [{"kind": "norm", "layer": layer}, {"kind": "parallel", "layer": layer}]
        else:
            blocks += [{"kind": "norm", "layer": layer}, {"kind": "attention", "layer": layer},
                       {"kind": "norm", "layer": layer}, {"kind": "ffn", "layer": layer}]
    blocks += [{"kind": "norm", "layer": None}, {"kind": "unembedding", "layer": None}]
    return blocks


def resolve_model(model: str | TransformerConfig, overrides=()) -> TransformerConfig:
    cfg = get_config(model) if isinstance(model, str) else model
    return cfg.with_overrides(list(overrides)) if overrides else cfg


def evaluate_all(cfg: TransformerConfig, hw: HardwareProfile, chips: int, work: StepWorkload,
                 ffn_layouts=FFN_LAYOUTS, attention_layouts=ATTENTION_LAYOUTS,
                 options: CostOptions | None = None,
                 kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION,
                 ) -> tuple[list[CandidateCost], list[tuple[str, str]]]:
    """Every applicable candidate (sorted, cheapest first) and the rejected ones with reasons."""
    options = options or CostOptions()
    ok: list[CandidateCost] = []
    rejected: list[tuple[str, str]] = []
    for mesh in factorizations(chips):
        for ffn in ffn_layouts:
            for att in attention_layouts:
                try:
                    ok.append(evaluate(cfg, hw, mesh, work, ffn, att, options,
                                       kv_memory_fraction))
                except LayoutNotApplicable as e:
                    rejected.append((f"{ffn}/{att} {mesh}", str(e)))
    ok.sort(key=_order)
    return ok, rejected


def _order(c: CandidateCost):
    return (c.step_s, FFN_LAYOUTS.index(c.ffn_layout),
            ATTENTION_LAYOUTS.index(c.attention_layout), (c.mesh.x, c.mesh.y, c.mesh.z))


def plan_config(config: TransformerConfig, hardware: str | HardwareProfile = "tpu-v4",
                chips: int = 64, batch: int = 64, context: int = 2048,
                phase: str = "decode", weights: str = "bf16", gen_tokens: int = 64,
                force_ffn: str | None = None, force_attention: str | None = None,
                kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION,
                options: CostOptions | None = None, blocks: list[dict] | None = None,
                nodes: int | None = None, cross_node: str | None = None,
                microbatches: int | None = None) -> Plan:
    """Plan one step of `config` (see `plan`). `blocks` defaults to the preset's blocks;
    `microbatches` pins a pipeline's (across nodes)."""
    hw = get_hardware(hardware)
    _check_request(hw, chips, gen_tokens, kv_memory_fraction, force_ffn, force_attention)
    split = split_nodes(hw, chips, nodes)
    work = StepWorkload(batch=batch, context=context, phase=phase, weights=weights)
    ffns = (force_ffn,) if force_ffn else FFN_LAYOUTS
    atts = (force_attention,) if force_attention else ATTENTION_LAYOUTS
    if cross_node is not None and cross_node not in CROSSINGS:
        raise ValueError(f"unknown way of crossing nodes {cross_node!r}; known: "
                         f"{', '.join(CROSSINGS)}")
    if split.nodes > 1:
        return _plan_across_nodes(config, hw, split, work, gen_tokens, force_ffn,
                                  force_attention, kv_memory_fraction, options, blocks,
                                  cross_node, ffns, atts, microbatches)
    if cross_node is not None:
        raise ValueError(f"cross_node={cross_node!r} needs 2 or more nodes; {chips} chips of "
                         f"{hw.name} are one node (give nodes=2 or more, or more than "
                         f"{hw.max_chips} chips)")
    cands, rejected = evaluate_all(config, hw, chips, work, ffns, atts, options,
                                   kv_memory_fraction)
    forced = {k: v for k, v in (("ffn", force_ffn), ("attention", force_attention)) if v}
    if not cands:
        raise ValueError(_no_layout_message(config, hw, chips, work, rejected, forced))
    feasible = [c for c in cands if c.fits]
    if not feasible:
        raise ValueError(_no_fit_message(config, hw, chips, work, cands, options,
                                         kv_memory_fraction, ffns, atts))
    notes = []
    if context > config.max_len:
        notes.append(f"context {context} exceeds the model's max_len {config.max_len}")
    return Plan(model=config.name, hardware=hw.name, chips=chips, batch=batch,
                context=context, phase=phase, weights=weights, gen_tokens=gen_tokens,
                kv_memory_fraction=kv_memory_fraction, best=feasible[0], candidates=cands,
                rejected=rejected, blocks=blocks if blocks is not None else blocks_of(config),
                forced=forced, config=config, notes=notes)


def _plan_across_nodes(config, hw, split, work, gen_tokens, force_ffn, force_attention,
                       kv_fraction, options, blocks, cross_node, ffns, atts,
                       microbatches=None) -> Plan:
    """Price every way of crossing the nodes (`multinode.price_crossings`); take the
    cheapest that fits."""
    kinds = (cross_node,) if cross_node else None
    costs, rejected = price_crossings(config, hw, split, work, ffns, atts, options,
                                      kv_fraction, kinds, microbatches)
    forced = {k: v for k, v in (("ffn", force_ffn), ("attention", force_attention),
                                ("cross_node", cross_node), ("microbatches", microbatches))
              if v}
    if not costs:
        raise ValueError(_no_crossing_message(config, hw, split, work, rejected, forced))
    best = costs[0]
    ctx = PricingContext(config, hw, split, work, ffns, atts, options or CostOptions(),
                         kv_fraction, microbatches)
    layouts = CROSSINGS[best.kind].layouts(ctx, best)
    notes = []
    if work.context > config.max_len:
        notes.append(f"context {work.context} exceeds the model's max_len {config.max_len}")
    return Plan(model=config.name, hardware=hw.name, chips=split.chips, batch=work.batch,
                context=work.context, phase=work.phase, weights=work.weights,
                gen_tokens=gen_tokens, kv_memory_fraction=kv_fraction, best=best.layout,
                candidates=layouts, rejected=[],
                blocks=blocks if blocks is not None else blocks_of(config), forced=forced,
                config=config, notes=notes, split=split, cross_node=best,
                cross_node_candidates=costs, cross_node_rejected=rejected,
                hardware_profile=hw)


def plan(model: str | TransformerConfig, hardware: str | HardwareProfile = "tpu-v4",
         chips: int = 64, batch: int = 64, context: int = 2048, phase: str = "decode",
         weights: str = "bf16", gen_tokens: int = 64, force_ffn: str | None = None,
         force_attention: str | None = None,
         kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION, overrides=(),
         options: CostOptions | None = None, nodes: int | None = None,
         cross_node: str | None = None, microbatches: int | None = None) -> Plan:
    """The cheapest layout that fits, for a preset name or a config.

    `overrides` are `key=value` config changes (the CLI's `--set`). Impossible requests raise
    KeyError (unknown model/hardware) or ValueError naming the nearest feasible choice.
    `nodes` splits the chips into that many equal nodes (default: one node when they fit
    one, else the fewest); `cross_node` pins what crosses them: "replicas", "pipeline" or
    "stretched"; `microbatches` a pipeline's microbatches (default: the cheapest count).

        >>> plan("palm-540b", chips=64, batch=512, context=2048, phase="prefill").ffn_layout
        'wg-xyz'
    """
    cfg = resolve_model(model, overrides)
    return plan_config(cfg, hardware=hardware, chips=chips, batch=batch, context=context,
                       phase=phase, weights=weights, gen_tokens=gen_tokens,
                       force_ffn=force_ffn, force_attention=force_attention,
                       kv_memory_fraction=kv_memory_fraction, options=options, nodes=nodes,
                       cross_node=cross_node, microbatches=microbatches)


# ---------------------------------------------------------------------------------------------
# Clear errors for impossible requests


def _check_request(hw: HardwareProfile, chips: int, gen_tokens: int, kv_fraction: float,
                   force_ffn: str | None, force_attention: str | None) -> None:
    if chips < 1:
        raise ValueError(f"chips must be >= 1, got {chips}")
    if gen_tokens < 1:
        raise ValueError(f"gen_tokens must be >= 1, got {gen_tokens}")
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_fraction}")
    if force_ffn is not None and force_ffn not in FFN_LAYOUTS:
        raise ValueError(f"unknown FFN layout {force_ffn!r}; known: {', '.join(FFN_LAYOUTS)}")
    if force_attention is not None and force_attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown attention layout {force_attention!r}; known: "
                         f"{', '.join(ATTENTION_LAYOUTS)}")


def _no_crossing_message(cfg, hw, split, work, rejected, forced) -> str:
    """Nothing runs across these nodes: the reasons, and the largest job of this hardware
    when even that cannot hold the model."""
    head = (f"{cfg.name} at batch {work.batch}, context {work.context} cannot run on "
            f"{split} x {hw.name}" + (f" with {forced}" if forced else "") + ": ")
    reasons = "; ".join(f"{name}: {why}" for name, why in rejected[:4])
    need = min_memory_chips(cfg, work)
    most_nodes, per_node = hw.max_nodes, hw.max_chips
    largest = most_nodes * per_node * hw.hbm_bytes
    if need > largest:
        return (head + reasons + f". It needs at least {need / 1e12:.3g} TB of weights and KV "
                f"cache, more than the largest {hw.name} job holds ({most_nodes} nodes x "
                f"{per_node} x {hw.hbm_bytes / 1e9:.0f} GB = {largest / 1e12:.3g} TB): lower "
                "the batch or context, or use int8 weights.")
    more = -(-need // (split.chips_per_node * hw.hbm_bytes))
    hint = (f" Weights and KV cache alone need {need / 1e9:.4g} GB: at least {int(more)} "
            f"nodes of {split.chips_per_node}" if more > split.nodes else "")
    return head + reasons + "." + (hint + "." if hint else "")


def _no_layout_message(cfg, hw, chips, work, rejected, forced) -> str:
    head = (f"no layout can run {cfg.name} on {chips} chips at batch {work.batch}"
            + (f" with {forced}" if forced else "") + ": ")
    reasons = "; ".join(f"{name}: {why}" for name, why in _dedupe(rejected)[:4])
    usable = max(_max_head_chips(cfg), work.batch)
    hint = (f" At most {usable} chips are usable here (heads {cfg.n_heads}, padded at most "
            f"2x, or batch {work.batch}); use chips <= {usable} or batch >= {chips}.")
    return head + reasons + "." + ("" if forced else hint)


def _max_head_chips(cfg: TransformerConfig) -> int:
    """Largest power-of-two chip count the heads layout accepts (padding at most 2x)."""
    best, n = 1, 1
    while n <= 2 * cfg.n_heads:
        if -(-cfg.n_heads // n) * n <= 2 * cfg.n_heads:
            best = n
        n *= 2
    return best


def _fits_anywhere(cfg, hw, chips, work, options, kv_fraction, ffns, atts) -> bool:
    cands, _ = evaluate_all(cfg, hw, chips, work, ffns, atts, options, kv_fraction)
    return any(c.fits for c in cands)


def _no_fit_message(cfg, hw, chips, work, cands, options, kv_fraction, ffns, atts) -> str:
    smallest = min(cands, key=lambda c: c.memory_bytes_per_chip)
    msg = (f"{cfg.name} does not fit on {chips} x {hw.name} ({hw.hbm_bytes / 2**30:.0f} GiB "
           f"each) at batch {work.batch}, context {work.context}: the smallest layout "
           f"({smallest.name}) needs {smallest.memory_bytes_per_chip / 2**30:.1f} GiB per chip "
           f"(weights {smallest.weight_bytes_per_chip / 2**30:.1f}, KV cache "
           f"{smallest.kv_cache_bytes_per_chip / 2**30:.1f}).")
    suggestions = []
    # More chips: the smallest power of two (or multiple of `chips`) that fits.
    n = chips * 2
    while n <= hw.max_chips:
        if _fits_anywhere(cfg, hw, n, work, options, kv_fraction, ffns, atts):
            suggestions.append(f"needs at least {n} chips at this batch and context")
            break
        n *= 2
    else:
        nodes = _nodes_that_fit(cfg, hw, work, options, kv_fraction, ffns, atts)
        if nodes:
            suggestions.append(f"needs more than one {hw.name} node: it fits {nodes} nodes of "
                               f"{hw.max_chips} (--chips {nodes * hw.max_chips})")
        else:
            suggestions.append(f"does not fit on any {hw.name} slice up to {hw.max_chips} "
                               "chips at this batch and context")
    weights_fit = [c for c in cands
                   if c.weight_bytes_per_chip + c.gathered_weight_bytes_per_chip < hw.hbm_bytes]
    if weights_fit:
        best_ctx = max(_ctx_limit(c, hw, work.context) for c in weights_fit)
        if best_ctx >= 1:
            suggestions.append(f"max context at batch {work.batch} is {best_ctx}")
        max_b = _max_batch(cfg, hw, chips, work, options, kv_fraction, ffns, atts)
        if max_b:
            suggestions.append(f"max batch at context {work.context} is {max_b}")
        else:
            suggestions.append(f"even batch 1 does not fit at context {work.context}")
    else:
        suggestions.append("the weights alone do not fit")
    return msg + " " + "; ".join(suggestions) + "."


def _nodes_that_fit(cfg, hw, work, options, kv_fraction, ffns, atts, tries: int = 4) -> int:
    """The fewest full nodes (tried from the memory lower bound, doubling) on which some way
    of crossing them fits, or 0 (none within `tries` or `max_nodes`)."""
    if not hw.spans_nodes:
        return 0
    need = min_memory_chips(cfg, work)  # weights and KV cache once: a lower bound
    nodes = max(2, -(-int(need) // int(hw.max_chips * hw.hbm_bytes)))
    for _ in range(tries):
        if nodes > hw.max_nodes:
            return 0
        costs, _ = price_crossings(cfg, hw, NodeSplit(nodes, hw.max_chips), work, ffns, atts,
                                   options, kv_fraction)
        if costs:
            return nodes
        nodes *= 2
    return 0


def _ctx_limit(c: CandidateCost, hw: HardwareProfile, context: int) -> int:
    """Longest context whose KV cache fits in what the weights leave free (KV is linear in it)."""
    free = hw.hbm_bytes - c.weight_bytes_per_chip - c.gathered_weight_bytes_per_chip
    per_token = c.kv_cache_bytes_per_chip / context
    return int(free // per_token) if per_token > 0 else 0


def _max_batch(cfg, hw, chips, work, options, kv_fraction, ffns, atts) -> int:
    lo, hi = 0, work.batch - 1  # largest b in [1, batch) that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        w = StepWorkload(mid, work.context, work.phase, work.weights)
        if _fits_anywhere(cfg, hw, chips, w, options, kv_fraction, ffns, atts):
            lo = mid
        else:
            hi = mid - 1
    return lo


__all__ = [
    "DEFAULT_KV_MEMORY_FRACTION",
    "Mesh",
    "Plan",
    "blocks_of",
    "evaluate_all",
    "plan",
    "plan_config",
]
