"""Random small Transformers on random meshes, sharded every way, against the unsharded function.

    python benchmarks/property_sweep.py --cases 500       # writes benchmarks/results/property_sweep.json

Hypothesis draws each case: a family (GPT-2, PaLM, Llama style), heads, KV heads (MHA, GQA,
MQA), head dim, d_ff, layers as a loop or a scan, a mesh of up to 8 (simulated CPU) devices,
an FFN and an attention layout (both pinned), the phase, the batch and prompt length, looped
collective einsums on or off, float or int8 weights. Each case runs `mw.shard` and compares
its outputs (logits and cache) with the unsharded function: `jax.jit(fn)` for float weights,
`mw.shard(fn, weights="int8")` on one device for int8 (the same quantization, unsplit).

Reported: mismatches (the target is 0), cases that ran some part replicated (and why: the
reasons of `report()["replicated_fallbacks"]`, grouped), and layouts refused with an error
(a pinned layout that cannot run that model on that mesh). tests/test_property_sweep.py runs
a few dozen cases of the same sweep in CI.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from meshwright.models import build, get_config
from meshwright.passes.cost_model import ATTENTION_LAYOUTS, FFN_LAYOUTS

import meshwright as mw

FAMILIES = ("gpt2-tiny", "palm-tiny", "llama-tiny")
FFNS = tuple(FFN_LAYOUTS)  # every registered layout (passes/layouts.py)
ATTENTIONS = tuple(ATTENTION_LAYOUTS)
MESHES = tuple((x, y, n // x // y) for n in (1, 2, 3, 4, 6, 8) for x in range(1, n + 1)
               if n % x == 0 for y in range(1, n // x + 1) if (n // x) % y == 0)
TOLERANCE = 1e-4  # max |sharded - unsharded| over max |unsharded| (float32 reassociation)


@dataclass(frozen=True)
class Case:
    family: str
    heads: int
    kv_heads: int
    d_head: int
    d_ff: int
    layers: int
    scan: bool
    mesh: tuple[int, int, int]
    ffn: str
    attention: str
    phase: str
    batch: int
    length: int
    collective_einsum: str
    weights: str
    seed: int

    def label(self) -> str:
        return (f"{self.family} H{self.heads}/K{self.kv_heads} D{self.d_head} F{self.d_ff} "
                f"L{self.layers}{' scan' if self.scan else ''} {self.phase} B{self.batch}"
                f"{f' T{self.length}' if self.phase == 'prefill' else ''} on "
                f"{'x'.join(map(str, self.mesh))} {self.ffn}/{self.attention}"
                f"{' ce' if self.collective_einsum == 'on' else ''}"
                f"{' int8' if self.weights == 'int8' else ''}")


@st.composite
def cases(draw) -> Case:
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    if family == "gpt2-tiny":  # multihead only
        kv = heads
    else:
        kv = draw(st.sampled_from([k for k in (1, 2, 4, heads) if heads % k == 0]))
    return Case(family=family, heads=heads, kv_heads=kv,
                d_head=draw(st.sampled_from([4, 8, 16])),
                d_ff=draw(st.sampled_from([16, 32, 48, 64])),
                layers=draw(st.sampled_from([1, 2])), scan=draw(st.booleans()),
                mesh=draw(st.sampled_from(MESHES)), ffn=draw(st.sampled_from(FFNS)),
                attention=draw(st.sampled_from(ATTENTIONS)),
                phase=draw(st.sampled_from(["prefill", "decode"])),
                batch=draw(st.sampled_from([1, 2, 3, 4, 8])),
                length=draw(st.integers(1, 8)),
                collective_einsum=draw(st.sampled_from(["off", "on"])),
                weights=draw(st.sampled_from(["native", "native", "int8"])),
                seed=draw(st.integers(0, 2**16)))


def _config(c: Case):
    return get_config(c.family).replace(
        n_heads=c.heads, n_kv_heads=c.kv_heads, d_head=c.d_head, d_model=c.heads * c.d_head,
        d_ff=c.d_ff, n_layers=c.layers, scan_layers=c.scan, max_len=16, vocab_size=64)


def run_case(c: Case) -> dict:
    """{"case", "label", "status": ok | mismatch | refused, "error", "fallbacks", ...}."""
    model = build(_config(c))
    fn = model.fn(c.phase)
    # host arrays: placing them on a mesh compiles nothing (device arrays would be resharded)
    args = jax.tree.map(np.asarray, model.example_args(c.phase, batch=c.batch,
                                                       length=c.length,
                                                       key=jax.random.PRNGKey(c.seed)))
    out = {"case": asdict(c), "label": c.label(), "fallbacks": [], "error": None}
    mesh = mw.make_mesh(dict(zip("xyz", c.mesh)))
    step = mw.shard(fn, mesh=mesh, force={"ffn": c.ffn, "attention": c.attention,
                                          "mesh": c.mesh},
                    collective_einsum=c.collective_einsum, weights=c.weights)
    try:
        got = step(*args)
    except ValueError as e:  # a pinned layout that cannot run here: refused, by name
        out.update(status="refused", error=" ".join(str(e).split())[:300])
        return out
    if c.weights == "int8":
        want = mw.shard(fn, mesh=mw.make_mesh({"x": 1}), weights="int8",
                        force={"ffn": "ws-1d", "attention": "heads", "mesh": (1, 1, 1)})(*args)
    else:
        want = jax.jit(fn)(*args)
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              / max(float(np.max(np.abs(np.asarray(b)))), 1e-6)
              for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    out["relative_error"] = err
    out["status"] = "ok" if err <= TOLERANCE else "mismatch"
    out["fallbacks"] = step.report(*args)["replicated_fallbacks"]
    return out


def sweep(n: int, seed: int = 0, progress=None) -> list[dict]:
    """`n` cases drawn by hypothesis (reproducible from `seed`), each run; their records."""
    results: list[dict] = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def one(c: Case) -> None:
        results.append(run_case(c))
        if progress:
            progress(results[-1])

    from hypothesis import seed as hypothesis_seed

    hypothesis_seed(seed)(one)()
    return results


def fallback_kind(reason: str) -> str:
    """A fallback reason without its names and sizes, to group them: "dimension (heads) is
    not split as the layout plans", "while runs replicated", ..."""
    m = re.search(r"\(([\w*/?]+), \d+\) is not split over", reason)
    if m:
        return f"{m.group(1)} not divisible by its mesh axes: input replicated"
    return re.sub(r"^\S+ at \S+ (\(\w+\))?:?\s*", "", reason).split(";")[0] or reason


def summarize(results: list[dict]) -> dict:
    status = Counter(r["status"] for r in results)
    replicated = [r for r in results if r["fallbacks"]]
    kinds = Counter(k for r in replicated for k in {fallback_kind(f) for f in r["fallbacks"]})
    return {"cases": len(results), "ok": status["ok"], "mismatches": status["mismatch"],
            "refused": status["refused"], "ran_some_part_replicated": len(replicated),
            "fallback_reasons": dict(kinds.most_common()),
            "mismatch_cases": [r["label"] for r in results if r["status"] == "mismatch"],
            "max_relative_error": max((r.get("relative_error", 0.0) for r in results),
                                      default=0.0),
            "refused_reasons": dict(Counter(r["error"].split(":")[0][:80] for r in results
                                            if r["status"] == "refused").most_common(10))}


def slim(r: dict) -> dict:
    """A case's record for the JSON file: its label, outcome and its fallbacks' kinds."""
    return {"label": r["label"], "status": r["status"], "error": r["error"],
            "relative_error": r.get("relative_error"),
            "replicated": sorted({fallback_kind(f) for f in r["fallbacks"]})}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"
                                                / "property_sweep.json"))
    parser.add_argument("--cache", default=str(Path(__file__).resolve().parent.parent
                                               / ".jax_cache"),
                        help="persistent XLA compilation cache (the test suite's; '' for none)")
    args = parser.parse_args(argv)
    if args.cache:  # cases repeat shapes: their programs compile once
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    t0 = time.perf_counter()

    def show(r):
        if r["status"] != "ok" or len(done) % 25 == 0:
            print(f"{len(done):4d} {r['status']:9s} {r['label']}"
                  + (f"  ({r['error'][:100]})" if r["error"] else ""), file=sys.stderr)

    command = f"python benchmarks/property_sweep.py --cases {args.cases} --seed {args.seed}"

    def write(results: list[dict], complete: bool) -> dict:
        summary = summarize(results)
        summary.update(seconds=round(time.perf_counter() - t0, 1), command=command,
                       complete=complete)
        Path(args.output).write_text(json.dumps({"summary": summary,
                                                 "results": [slim(r) for r in results]},
                                                indent=1, default=str) + "\n")
        return summary

    done: list = []

    def progress(r: dict) -> None:
        done.append(r)
        show(r)
        if len(done) % 10 == 0:  # a long sweep leaves its results so far
            write(done, complete=False)

    results = sweep(args.cases, args.seed, progress=progress)
    summary = write(results, complete=True)
    print(f"{summary['cases']} cases in {summary['seconds']} s: {summary['ok']} equal, "
          f"{summary['mismatches']} mismatches, {summary['refused']} refused with an error; "
          f"max relative error {summary['max_relative_error']:.2e}")
    print(f"{summary['ran_some_part_replicated']} cases ran some part replicated; reasons "
          "(cases):")
    for reason, count in summary["fallback_reasons"].items():
        print(f"  {count:4d}  {reason}")
    if summary["refused_reasons"]:
        print("refused (cases):")
        for reason, count in summary["refused_reasons"].items():
            print(f"  {count:4d}  {reason}")
    for label in summary["mismatch_cases"]:
        print(f"MISMATCH {label}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if summary["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
