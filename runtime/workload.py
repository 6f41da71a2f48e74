"""Serving workloads (arrival times + requests) and the metrics of a served workload.

    >>> w = make_workload(requests=4, rate=10.0, out_len=(2, 8), prompt_len=(3, 5),
    ...                   vocab_size=256, max_len=64, seed=0)
    >>> len(w), [round(a, 3) for a, _ in w.arrivals][:2], w.arrivals[0][1].max_tokens
    (4, [0.0, 0.018], 6)

Arrivals are a Poisson process (exponential gaps with mean 1/rate, the first request at 0) or
a fixed interval; output lengths are uniform integers in [a, b] or taken from a JSON trace
(a list of numbers, or of objects with "output_len" and optional "prompt_len" and "arrival_s");
prompts are random token ids. Everything is seeded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from meshwright.runtime.request import Request, Result, SamplingParams


@dataclass
class Workload:
    """Requests with arrival times, sorted by arrival: a served workload. (One step's
    batch, context and phase, as the planner prices it, is `cost_model.StepWorkload`;
    docs/overview.md, "One description of each thing".)"""

    arrivals: list[tuple[float, Request]]  # (arrival_s, request)
    description: str = ""

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def output_tokens(self) -> int:
        """Tokens the workload asks for (every request running to max_tokens)."""
        return sum(r.max_tokens for _, r in self.arrivals)


def make_workload(requests: int, *, rate: float | None = None, interval: float | None = None,
                  out_len: tuple[int, int] = (16, 256), prompt_len: tuple[int, int] = (4, 16),
                  vocab_size: int = 256, max_len: int | None = None, seed: int = 0,
                  trace: str | Sequence | None = None,
                  sampling: SamplingParams | None = None,
                  stop_tokens: Sequence[int] = ()) -> Workload:
    """`requests` requests arriving at Poisson `rate` per second or every `interval` seconds
    (exactly one of them; neither: all at time 0); output lengths uniform in `out_len` (or
    from `trace`, a JSON file path or the loaded list); prompt lengths uniform in
    `prompt_len`, clipped so that prompt + output fits in `max_len`."""
    if rate is not None and interval is not None:
        raise ValueError("give rate or interval, not both")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if interval is not None and interval < 0:
        raise ValueError(f"interval must be >= 0 s, got {interval}")
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    rng = np.random.default_rng(seed)
    entries = _load_trace(trace) if trace is not None else None
    if entries is not None:
        requests = min(requests, len(entries)) if requests else len(entries)
    if rate is not None:
        gaps = rng.exponential(1.0 / rate, size=requests)
        times = np.concatenate([[0.0], np.cumsum(gaps[1:])]) if requests else np.zeros(0)
    else:
        times = np.arange(requests) * (interval or 0.0)
    from meshwright import validate

    lo, hi = validate.int_range(out_len, "out_len")
    prompt_len = validate.int_range(prompt_len, "prompt_len")
    if max_len is not None:
        max_len = validate.max_len(max_len, "max_len")
    arrivals = []
    shortened = 0  # requests whose prompt or output was cut to fit max_len
    for i in range(requests):
        n_out = int(rng.integers(lo, hi + 1))
        n_prompt = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        t = float(times[i])
        if entries is not None:
            e = entries[i]
            n_out = int(e["output_len"])
            n_prompt = int(e.get("prompt_len", n_prompt))
            t = float(e.get("arrival_s", t))
        if max_len is not None and n_prompt + n_out > max_len:
            shortened += 1
            n_out = min(n_out, max_len - 1)
            n_prompt = max(1, min(n_prompt, max_len - n_out))
        prompt = tuple(int(x) for x in rng.integers(0, vocab_size, size=n_prompt))
        arrivals.append((t, Request(prompt=prompt, max_tokens=n_out,
                                    sampling=sampling or SamplingParams(),
                                    stop_tokens=tuple(stop_tokens), name=f"req{i}")))
    arrivals.sort(key=lambda a: a[0])
    how = (f"Poisson {rate:g}/s" if rate is not None
           else f"every {interval:g} s" if interval is not None else "all at t=0")
    src = "trace" if entries is not None else f"uniform [{lo}, {hi}]"
    # the header says what ran: requests cut to fit max_len are counted, never hidden
    cut = (f", {shortened} of {requests} shortened to fit max_len {max_len}"
           if shortened else "")
    return Workload(arrivals, f"{requests} requests, {how}, output lengths {src}{cut}, "
                              f"seed {seed}")


def _load_trace(trace: str | Sequence) -> list[dict]:
    if isinstance(trace, (str, os.PathLike)):
        with open(trace) as f:
            try:
                trace = json.load(f)
            except ValueError as e:
                raise ValueError(f"trace {os.fspath(trace)!r} is not JSON ({e}); it holds a "
                                 "list of output lengths or of {\"output_len\": N, ...} "
                                 "objects") from None
    entries = []
    for e in trace:
        entries.append({"output_len": e} if isinstance(e, (int, float)) else dict(e))
        if "output_len" not in entries[-1]:
            raise ValueError(f"trace entry {e!r} has no output_len")
    return entries


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(results: Sequence[Result], *, policy: str, elapsed_s: float, stats=None,
              layouts: dict | None = None, shuffle: bool = True) -> dict:
    """The serving metrics of a finished run (keys of `meshwright bench serve --json`).

    throughput_tokens_per_s = generated tokens / (last finish - first arrival);
    latency_s = arrival -> last token; ttft_s = arrival -> first token; per_token_s =
    per-request mean gap between its tokens (requests with >= 2 tokens), then the median.
    """
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(len(r.tokens) for r in done)
    span = (max(r.finish_s for r in done) - min(r.arrival_s for r in results)) if done else 0.0
    latency = [r.latency_s for r in done]
    ttft = [r.ttft_s for r in done]
    per_token = [r.per_token_s for r in done if r.per_token_s is not None]
    out = {
        "policy": policy,
        "shuffle": shuffle,
        "requests_submitted": len(results),
        "requests_completed": len(done),
        "requests_failed": len(failed),
        "failure_reasons": sorted({r.error for r in failed}),
        "tokens_generated": tokens,
        "elapsed_s": elapsed_s,
        "throughput_tokens_per_s": tokens / span if span > 0 else None,
        "latency_s": {"p50": _pct(latency, 50), "p99": _pct(latency, 99),
                      "mean": float(np.mean(latency)) if latency else None},
        "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "per_token_s": {"p50": _pct(per_token, 50)},
    }
    if stats is not None:
        out["buckets_used"] = {str(b): n for b, n in sorted(stats.buckets_used.items())}
        out["layout_switches"] = stats.layout_switches
        out["decode_steps"] = stats.decode_steps
        out["prefills"] = stats.prefills
        out["prefill_calls"] = stats.prefill_calls  # batched: several prompts per call
        out["kv_moves"] = stats.moves
        out["kv_resizes"] = stats.resizes  # KV window (re)loads
        out["engine_seconds"] = {k: round(v, 4) for k, v in sorted(stats.seconds.items())}
    if layouts is not None:
        out["layouts"] = {f"{phase}:{b.batch}x{b.length}": layout
                          for (phase, b), layout in layouts.items()}
        if stats is not None:  # which layout ran how often: {bucket: {"layout", "steps"}}
            out["layouts_ran"] = {f"{phase}:{b.batch}x{b.length}": {
                "layout": layout, "steps": stats.runs.get((phase, b), 0)}
                for (phase, b), layout in layouts.items()}
    return out
