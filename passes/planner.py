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
    Workload,
    evaluate,
    factorizations,
)
from meshwright.passes.hardware import HardwareProfile, get_hardware

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

    def __repr__(self) -> str:
        """One line; `explain()` gives the table, `to_dict()` everything.

            Plan(palm-540b decode batch 64 context 2048 on 64 tpu-v4 chips: ws-2d/batch on
            mesh 4x4x4, 36.9 ms/step, MFU 0.11, fits; 206 candidates, 74 rejected)
        """
        b = self.best
        return (f"Plan({self.model} {self.phase} batch {self.batch} context {self.context} "
                f"on {self.chips} {self.hardware} chips: {b.ffn_layout}/{b.attention_layout} "
                f"on mesh {b.mesh}, {b.step_s * 1e3:.3g} ms/step, MFU {b.mfu:.2f}, "
                f"{'fits' if b.fits else 'does not fit'}; {len(self.candidates)} candidates, "
                f"{len(self.rejected)} rejected)")

    # ---- the DESIGN.md surface -------------------------------------------------------------
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
    def step_seconds(self) -> float:
        return self.best.step_s

    @property
    def latency_seconds(self) -> float:
        """Prefill: the step. Decode: `gen_tokens` steps at this context."""
        steps = self.gen_tokens if self.phase == "decode" else 1
        return self.best.step_s * steps

    @property
    def mfu(self) -> float:
        return self.best.mfu

    @property
    def fits(self) -> bool:
        return self.best.fits

    def to_dict(self) -> dict:
        """The `meshwright plan --json` object (DESIGN.md section 1 keys, and more)."""
        b = self.best
        return {
            "model": self.model, "hardware": self.hardware, "chips": self.chips,
            "batch": self.batch, "context": self.context, "phase": self.phase,
            "weights": self.weights, "gen_tokens": self.gen_tokens,
            "ffn_layout": b.ffn_layout, "attention_layout": b.attention_layout,
            "mesh": b.mesh.to_dict(),
            "step_seconds": b.step_s, "latency_seconds": self.latency_seconds, "mfu": b.mfu,
            "breakdown": b.breakdown(),
            "weight_bytes_per_chip": b.weight_bytes_per_chip,
            "kv_cache_bytes_per_chip": b.kv_cache_bytes_per_chip,
            "max_context": b.max_context, "kv_memory_fraction": self.kv_memory_fraction,
            "fits": b.fits,
            "cost_chip_seconds_per_token": b.cost_per_token,
            "overhead_seconds": b.overhead_s,
            "memory_bytes_per_chip": b.memory_bytes_per_chip,
            "padded_heads": b.padded_heads,
            "bound": b.bound, "forced": self.forced, "notes": self.notes + b.notes,
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
        lines.append(
            f"memory per chip: weights {_gib(b.weight_bytes_per_chip)}"
            + (f" + gathered layer {_gib(b.gathered_weight_bytes_per_chip)}"
               if b.gathered_weight_bytes_per_chip else "")
            + f" + KV cache {_gib(b.kv_cache_bytes_per_chip)} = {_gib(b.memory_bytes_per_chip)}"
            f" ({'fits' if b.fits else 'does NOT fit'}); max context {b.max_context} "
            f"({self.kv_memory_fraction:.0%} of memory for KV)")
        for note in self.notes + b.notes:
            lines.append(f"note: {note}")
        lines.append("")
        rows = [b] + self.runners_up()
        header = (f"{'':2}{'ffn/attention':16}{'mesh':>9}{'step ms':>11}{'vs best':>10}"
                  f"{'MFU':>7}{'compute':>10}{'weights':>10}{'kv':>9}{'comm':>10}"
                  f"{'GiB/chip':>10}  fits")
        lines.append(header)
        lines.append("-" * len(header))
        for c in rows:
            mark = "* " if c is b else "  "
            lines.append(
                f"{mark}{c.ffn_layout + '/' + c.attention_layout:16}{c.mesh!s:>9}"
                f"{c.step_s * 1e3:11.4g}{c.step_s / b.step_s - 1:+10.1%}{c.mfu:7.1%}"
                f"{c.compute_s * 1e3:10.4g}{c.weight_load_s * 1e3:10.4g}"
                f"{c.kv_load_s * 1e3:9.3g}{c.comm_s * 1e3:10.4g}"
                f"{c.memory_bytes_per_chip / 2**30:10.2f}  {'yes' if c.fits else 'no'}")
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


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


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


def evaluate_all(cfg: TransformerConfig, hw: HardwareProfile, chips: int, work: Workload,
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
                options: CostOptions | None = None, blocks: list[dict] | None = None) -> Plan:
    """Plan one step of `config` (see `plan`). `blocks` defaults to the preset's blocks."""
    hw = get_hardware(hardware)
    _check_request(hw, chips, gen_tokens, kv_memory_fraction, force_ffn, force_attention)
    work = Workload(batch=batch, context=context, phase=phase, weights=weights)
    ffns = (force_ffn,) if force_ffn else FFN_LAYOUTS
    atts = (force_attention,) if force_attention else ATTENTION_LAYOUTS
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


def plan(model: str | TransformerConfig, hardware: str | HardwareProfile = "tpu-v4",
         chips: int = 64, batch: int = 64, context: int = 2048, phase: str = "decode",
         weights: str = "bf16", gen_tokens: int = 64, force_ffn: str | None = None,
         force_attention: str | None = None,
         kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION, overrides=(),
         options: CostOptions | None = None) -> Plan:
    """The cheapest layout that fits, for a preset name or a config.

    `overrides` are `key=value` config changes (the CLI's `--set`). Impossible requests raise
    KeyError (unknown model/hardware) or ValueError naming the nearest feasible choice.

        >>> plan("palm-540b", chips=64, batch=512, context=2048, phase="prefill").ffn_layout
        'wg-xyz'
    """
    cfg = resolve_model(model, overrides)
    return plan_config(cfg, hardware=hardware, chips=chips, batch=batch, context=context,
                       phase=phase, weights=weights, gen_tokens=gen_tokens,
                       force_ffn=force_ffn, force_attention=force_attention,
                       kv_memory_fraction=kv_memory_fraction, options=options)


# ---------------------------------------------------------------------------------------------
# Clear errors for impossible requests


def _check_request(hw: HardwareProfile, chips: int, gen_tokens: int, kv_fraction: float,
                   force_ffn: str | None, force_attention: str | None) -> None:
    if chips < 1:
        raise ValueError(f"chips must be >= 1, got {chips}")
    if chips > hw.max_chips:
        raise ValueError(f"{hw.name} connects at most {hw.max_chips} chips in one "
                         f"slice/node; got chips={chips}")
    if gen_tokens < 1:
        raise ValueError(f"gen_tokens must be >= 1, got {gen_tokens}")
    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {kv_fraction}")
    if force_ffn is not None and force_ffn not in FFN_LAYOUTS:
        raise ValueError(f"unknown FFN layout {force_ffn!r}; known: {', '.join(FFN_LAYOUTS)}")
    if force_attention is not None and force_attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown attention layout {force_attention!r}; known: "
                         f"{', '.join(ATTENTION_LAYOUTS)}")


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
        suggestions.append(f"does not fit on any {hw.name} slice up to {hw.max_chips} chips "
                           "at this batch and context")
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


def _ctx_limit(c: CandidateCost, hw: HardwareProfile, context: int) -> int:
    """Longest context whose KV cache fits in what the weights leave free (KV is linear in it)."""
    free = hw.hbm_bytes - c.weight_bytes_per_chip - c.gathered_weight_bytes_per_chip
    per_token = c.kv_cache_bytes_per_chip / context
    return int(free // per_token) if per_token > 0 else 0


def _max_batch(cfg, hw, chips, work, options, kv_fraction, ffns, atts) -> int:
    lo, hi = 0, work.batch - 1  # largest b in [1, batch) that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        w = Workload(mid, work.context, work.phase, work.weights)
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
