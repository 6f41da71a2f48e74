"""Serving benchmarks: one policy on one workload, Flover's inter-arrival sweep, and the batch-1
decode roofline. Used by `meshwright bench serve` and `benchmarks/serve.py`.

    >>> m = serve_bench("palm-tiny", policy="fused", requests=16, rate=200.0, out_len=(4, 16),
    ...                 max_slots=4, max_len=64, progress=False)          # doctest: +SKIP
    >>> m["requests_completed"], sorted(m["latency_s"])                    # doctest: +SKIP
    (16, ['mean', 'p50', 'p99'])

Timing is a virtual clock by default (`Engine.serve`): requests arrive at their workload
times, the clock advances by the measured wall time of every engine iteration and jumps over
idle gaps, so the figures equal a wall-clock run without its sleeping.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.models import build, get_config, load_demo_model
from meshwright.models.demo import DEMO_CONFIG, ByteTokenizer
from meshwright.passes.mesh import Mesh
from meshwright.runtime.engine import Engine
from meshwright.runtime.scheduler import POLICIES
from meshwright.runtime.workload import make_workload


def make_engine(model: str = "palm-tiny", *, max_slots: int = 8, max_len: int | None = None,
                overrides: Sequence[str] = (), seed: int = 0, progress: bool = True,
                checkpoint: str | None = None, devices: int = 1, hardware: str = "cpu",
                share_weights: bool = True, model_fn: str | None = None,
                **engine_kwargs) -> Engine:
    """An engine for a preset (with `key=value` overrides), random weights from `seed`; or for
    the bundled demo model, `model="palm-kjv"` (its trained weights, bytes as tokens:
    `models.load_demo_model`, `models.demo.ByteTokenizer`); or for a Hugging Face
    checkpoint directory (its weights and, when present, its tokenizer); or for the user's
    own model, `model_fn="package.module:factory"` with factory() -> (model, params)
    (`models.functions.load_model_fn`).

    `devices` > 1: every bucket `mw.shard`-compiled on that many devices in the layout the
    planner (with the `hardware` profile) picks for it, weights placed once
    (`layouts.sharded_engine`; on CPU the simulated devices must exist before JAX starts:
    XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
    from meshwright import validate

    devices = validate.device_count(devices, "devices")
    max_len = validate.max_len(max_len, "max_len")
    tokenizer = None
    if model_fn is not None:
        from meshwright.models.functions import load_model_fn

        m, params = load_model_fn(model_fn)
    elif checkpoint is not None:
        from meshwright.models.hf import from_pretrained, load_tokenizer

        cfg, params = from_pretrained(checkpoint, max_len=max_len)
        tokenizer = load_tokenizer(checkpoint)
        m = build(cfg)
    elif model == DEMO_CONFIG.name:
        if overrides:
            raise ValueError(f"--set changes a preset's config; {model} is the bundled model, "
                             "whose trained weights fit only its own config")
        cfg, params = load_demo_model()
        if max_len and max_len > cfg.max_len:  # RoPE runs longer (it was trained on 256)
            cfg = cfg.replace(max_len=max_len)
        m, tokenizer = build(cfg), ByteTokenizer()
    else:
        cfg = get_config(model).with_overrides(list(overrides))
        if max_len and max_len > cfg.max_len:
            cfg = cfg.replace(max_len=max_len)
        m = build(cfg)
        params = m.init_params(jax.random.PRNGKey(seed))
    if devices > 1:
        from meshwright.runtime.layouts import sharded_engine

        available = jax.devices()
        validate.enough_devices(devices, len(available), f"devices={devices}")
        return sharded_engine(m, params, available[:devices], hardware=hardware,
                              share_weights=share_weights, max_slots=max_slots,
                              max_len=max_len or m.max_len, progress=progress,
                              tokenizer=tokenizer, **engine_kwargs)
    return Engine(m, params, max_slots=max_slots, max_len=max_len, progress=progress,
                  tokenizer=tokenizer, **engine_kwargs)


def _median_metrics(runs: list[dict]) -> dict:
    """Field-by-field median of several runs' metrics (numbers and {p50, ...} dicts)."""
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in runs if r[key] is not None]
            out[key] = statistics.median(vals) if vals else None
        elif isinstance(value, dict) and value and all(
                isinstance(v, (int, float)) or v is None for v in value.values()) \
                and key not in ("buckets_used",):
            out[key] = {k: statistics.median([r[key][k] for r in runs]) if all(
                r[key][k] is not None for r in runs) else None for k in value}
    out["repeats"] = len(runs)
    return out


def serve_bench(model: str = "palm-tiny", *, policy: str = "fused", requests: int = 64,
                rate: float | None = None, interval: float | None = None,
                out_len: tuple[int, int] = (16, 256), prompt_len: tuple[int, int] = (4, 16),
                max_slots: int = 8, max_len: int | None = None, shuffle: bool = True,
                window_s: float = 0.01, seed: int = 0, repeats: int = 1,
                overrides: Sequence[str] = (), trace: str | None = None,
                engine: Engine | None = None, clock: str = "virtual",
                progress: bool = True) -> dict:
    """Serve one workload with one policy; the metrics of `workload.summarize` (field-wise
    median over `repeats` runs of the same workload), plus the workload's description."""
    if engine is None:
        engine = make_engine(model, max_slots=max_slots, max_len=max_len, overrides=overrides,
                             seed=seed, progress=progress)
    workload = make_workload(requests, rate=rate, interval=interval, out_len=out_len,
                             prompt_len=prompt_len, vocab_size=engine.vocab_size,
                             max_len=engine.max_len, seed=seed, trace=trace)
    engine.set_policy(policy, shuffle=shuffle, window_s=window_s)
    runs = [engine.serve(workload, clock=clock, progress=progress).metrics
            for _ in range(repeats)]
    engine.set_policy("fused")
    out = _median_metrics(runs) if repeats > 1 else runs[0]
    out.update(model=engine.name, workload=workload.description, max_slots=engine.max_slots,
               max_len=engine.max_len, window_s=window_s if policy == "dynamic" else None,
               clock=clock, **layout_info(engine))
    return out


def layout_info(engine: Engine) -> dict:
    """Devices, mesh and per-bucket layout plan of an engine (for the metrics)."""
    plan = engine.layout_plan
    if plan is None:
        return {"devices": 1 if engine.mesh is None else engine.mesh.size}
    return {"devices": plan.chips, "hardware": plan.hardware, "mesh": dict(plan.mesh),
            "layout_plan": plan.to_dict(), "weight_copies": list(engine.weight_copies)}


def compare(engine: Engine, variants: dict[str, dict], *, repeats: int = 3,
            requests: int = 64, rate: float | None = None, interval: float | None = None,
            out_len: tuple[int, int] = (16, 256), prompt_len: tuple[int, int] = (4, 16),
            seed: int = 0, clock: str = "virtual") -> dict[str, dict]:
    """Serve one workload under several engine settings, e.g. {"fused": {"policy": "fused"},
    "static": {"policy": "static"}}, with the runs interleaved (repeat 1 of every variant,
    then repeat 2, each round in a rotated order) so that load from other processes hits
    every variant alike; field-wise medians per variant."""
    workload = make_workload(requests, rate=rate, interval=interval, out_len=out_len,
                             prompt_len=prompt_len, vocab_size=engine.vocab_size,
                             max_len=engine.max_len, seed=seed)
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    labels = list(variants)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            settings = {"shuffle": True, "window_s": 0.01, **variants[label]}
            engine.set_policy(settings["policy"], shuffle=settings["shuffle"],
                              window_s=settings["window_s"])
            runs[label].append(engine.serve(workload, clock=clock).metrics)
    engine.set_policy("fused")
    out = {}
    for label, results in runs.items():
        m = _median_metrics(results) if repeats > 1 else results[0]
        m.update(model=engine.name, workload=workload.description, max_slots=engine.max_slots,
                 max_len=engine.max_len, clock=clock, **layout_info(engine))
        out[label] = m
    return out


def sweep(model: str = "palm-tiny", *, intervals: Sequence[float] = (0.001, 0.005, 0.02,
          0.1, 0.5), policies: Sequence[str] = POLICIES, requests: int = 32,
          out_len: tuple[int, int] = (64, 64), prompt_len: tuple[int, int] = (4, 16),
          max_slots: int = 8, max_len: int | None = None, window_s: float = 0.01,
          seed: int = 0, repeats: int = 1, overrides: Sequence[str] = (),
          engine: Engine | None = None, progress: bool = True) -> dict:
    """Flover's sweep: Poisson workloads at several mean inter-arrival times, served by every
    policy. Speedup of fused = other policy's workload time / fused's (workload time = first
    arrival to last token), and the same for p50 latency. With `repeats` > 1 each repeat is
    a different workload (seed + r), policies interleaved; the speedups are medians."""
    if engine is None:
        engine = make_engine(model, max_slots=max_slots, max_len=max_len, overrides=overrides,
                             seed=seed, progress=progress)
    rows = []
    for gap in intervals:
        per_seed = []
        for r in range(repeats):
            runs = compare(engine, {p: {"policy": p, "window_s": window_s} for p in policies},
                           repeats=1, requests=requests, rate=1.0 / gap, out_len=out_len,
                           prompt_len=prompt_len, seed=seed + r)
            per_seed.append({p: {"workload_s": m["tokens_generated"]
                                 / m["throughput_tokens_per_s"],
                                 "latency_p50_s": m["latency_s"]["p50"],
                                 "throughput_tokens_per_s": m["throughput_tokens_per_s"]}
                             for p, m in runs.items()})
        row = {"mean_interarrival_s": gap}
        for p in policies:
            row[p] = {k: statistics.median(run[p][k] for run in per_seed)
                      for k in per_seed[0][p]}
        for p in policies:
            if p != "fused" and "fused" in policies:
                row[f"speedup_vs_{p}"] = statistics.median(
                    run[p]["workload_s"] / run["fused"]["workload_s"] for run in per_seed)
                row[f"p50_speedup_vs_{p}"] = statistics.median(
                    run[p]["latency_p50_s"] / run["fused"]["latency_p50_s"] for run in per_seed)
        rows.append(row)
    return {"model": engine.name, "requests": requests, "out_len": list(out_len),
            "max_slots": engine.max_slots, "max_len": engine.max_len, "window_s": window_s,
            "repeats": repeats, "rows": rows}


def plot_sweep(result: dict, path: str) -> None:
    """Speedup of fused over the baselines vs mean inter-arrival time (log x), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["mean_interarrival_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, style in (("speedup_vs_static", "o-"), ("speedup_vs_dynamic", "s-"),
                       ("p50_speedup_vs_static", "o--"), ("p50_speedup_vs_dynamic", "s--")):
        if key in rows[0]:
            label = key.replace("_", " ").replace("p50 speedup", "p50-latency speedup")
            ax.plot(x, [r[key] for r in rows], style, label=label.replace("speedup vs",
                                                                          "speedup over"))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("mean inter-arrival time (s)")
    ax.set_ylabel("fused speedup (x)")
    lo, hi = result["out_len"]
    tokens = f"{lo}" if lo == hi else f"{lo}-{hi}"
    ax.set_title(f"Temporal fusion vs batching baselines: {result['model']}\n"
                 f"{result['requests']} requests x {tokens} tokens, {result['max_slots']} "
                 f"slots, median of {result['repeats']} workloads", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_metrics(m: dict) -> str:
    """The human-readable block `meshwright bench serve` prints."""
    def s(x, scale=1.0, fmt="{:.4g}"):
        return "n/a" if x is None else fmt.format(x * scale)

    lines = [
        (f"model {m.get('model')}  policy {m['policy']}{'' if m['shuffle'] else ' (no shuffle)'}"
        f"  max_slots {m.get('max_slots')}  max_len {m.get('max_len')}"),
        f"workload: {m.get('workload')}",
        (f"requests: {m['requests_submitted']} submitted, {m['requests_completed']} completed, "
        f"{m['requests_failed']} failed"),
        (f"throughput: {s(m['throughput_tokens_per_s'], fmt='{:.0f}')} tokens/s "
        f"({m['tokens_generated']} tokens)"),
        (f"latency: p50 {s(m['latency_s']['p50'], 1e3)} ms, p99 {s(m['latency_s']['p99'], 1e3)}"
        f" ms, mean {s(m['latency_s']['mean'], 1e3)} ms"),
        (f"time to first token: p50 {s(m['ttft_s']['p50'], 1e3)} ms, "
        f"p99 {s(m['ttft_s']['p99'], 1e3)} ms"),
        f"per token: p50 {s(m['per_token_s']['p50'], 1e3)} ms",
        (f"decode steps per bucket: {m.get('buckets_used')}; kv moves {m.get('kv_moves')}; "
        f"layout switches {m.get('layout_switches')}"),
    ]
    if m.get("layout_plan"):
        lines.append(format_layouts(m))
    return "\n".join(lines)


def format_layouts(m: dict) -> str:
    """Per bucket: the layout that ran, how many steps, the planner's free choice and why."""
    ran = m.get("layouts_ran") or {}
    head = (f"layout per bucket ({m['devices']} devices, mesh {Mesh.parse(m['mesh']).text}, "
            f"planned for {m['hardware']}"
            + (f"; own weight copies: {', '.join(m['weight_copies'])}"
               if m.get("weight_copies") else "; weights placed once") + "):")
    lines = [head, f"  {'bucket':<15}{'ran':<14}{'steps':>7}  {'planner, free':<22}why"]
    for c in m["layout_plan"]:
        key = f"{c['phase']}:{c['batch']}x{c['length']}"
        steps = ran.get(key, {}).get("steps", 0)
        lines.append(f"  {c['phase'] + ' ' + str(c['batch']) + 'x' + str(c['length']):<15}"
                     f"{c['layout']:<14}{steps:>7}  {c['free']:<22}{c['why']}")
    return "\n".join(lines)


def format_sweep(result: dict) -> str:
    rows = result["rows"]
    keys = [k for k in rows[0] if k.startswith(("speedup", "p50_speedup"))]
    head = f"{'inter-arrival':>13} " + " ".join(f"{k:>24}" for k in keys)
    lines = [(f"{result['model']}: {result['requests']} requests, output "
             f"{result['out_len'][0]}-{result['out_len'][1]} tokens, max_slots "
             f"{result['max_slots']}"), head]
    for r in rows:
        lines.append(f"{r['mean_interarrival_s']:>12g}s "
                     + " ".join(f"{r[k]:>23.2f}x" for k in keys))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Batch-1 decode against the memory-bandwidth roofline


def measure_bandwidth(megabytes: int = 256, repeats: int = 30) -> dict:
    """This machine's memory bandwidth from a large jitted copy, x = x + 1 on a donated buffer
    (every byte read and written once, in place): bytes moved / best time. Without donation
    each call writes a fresh buffer and first-touch page faults halve the figure."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    x = copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return {"bytes": 2 * n * 4, "seconds": best, "bytes_per_s": 2 * n * 4 / best,
            "method": f"jitted in-place x + 1 on {megabytes} MiB float32, best of {repeats}"}


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 10) -> dict:
    """Read-only memory bandwidth: a jitted sum over a float32 array larger than any cache,
    bytes / best time. What streaming weights and a KV cache through a decode step costs."""
    n = megabytes * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(_seconds(lambda: total(x).block_until_ready()) for _ in range(repeats))
    return {"bytes": 4 * n, "seconds": best, "bytes_per_s": 4 * n / best,
            "method": f"jitted sum over {megabytes} MiB float32, best of {repeats}"}


def measure_matmul_rate(n: int = 2048, repeats: int = 10) -> dict:
    """float32 matmul rate: a jitted (n, n) @ (n, n), 2 n^3 / best time."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    best = min(_seconds(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))
    return {"flops": 2 * n ** 3, "seconds": best, "flops_per_s": 2 * n ** 3 / best,
            "method": f"jitted float32 ({n}, {n}) @ ({n}, {n}), best of {repeats}"}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weights_read_per_step(model, params) -> int:
    """Bytes of the weights one decode step reads: every array but the tables it only
    looks rows up in (an untied input embedding, learned positions)."""
    cfg = model.config
    skip = set()
    if not cfg.tie_embeddings:
        skip.add(next(k for k in ("tok_embeddings", "embedding", "wte") if k in params))
    if cfg.positions == "learned":
        skip.add("wpe")
    return sum(x.size * x.dtype.itemsize for k, v in params.items() if k not in skip
               for x in jax.tree.leaves(v))


def decode_roofline(model: str = "palm-tiny", *, max_len: int = 128,
                    overrides: Sequence[str] = (), bandwidth: float | None = None,
                    steps: int = 50, engine_tokens: int = 32, progress: bool = False) -> dict:
    """Per-token decode latency at batch 1 vs (bytes read per step) / read bandwidth.

    Bytes per step: the weights the step reads (`weights_read_per_step`) and the slot's K
    and V at max_len positions, each once. Measured two ways: the compiled decode_step alone
    (median of `steps` calls, dispatch included) and the engine's end-to-end per-token time
    for one request (sampling, host transfer, scheduling). `fraction_of_roofline` uses the
    best step time."""
    cfg = get_config(model).with_overrides(list(overrides))
    if max_len > cfg.max_len:
        cfg = cfg.replace(max_len=max_len)
    m = build(cfg)
    params = m.init_params(jax.random.PRNGKey(0))
    weight_bytes = weights_read_per_step(m, params)
    cache = m.init_cache(1, max_len)
    kv_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    step_bytes = weight_bytes + kv_bytes
    bw = bandwidth or measure_read_bandwidth()["bytes_per_s"]

    step = jax.jit(m.decode_step, donate_argnums=(2,))
    tokens, positions = np.zeros(1, np.int32), np.full(1, max_len // 2, np.int32)
    logits, cache = step(params, tokens, cache, positions)
    logits.block_until_ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = step(params, tokens, cache, positions)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    step_s, step_median_s = min(times), statistics.median(times)

    engine = Engine(m, params, max_slots=1, max_len=max_len, progress=progress,
                    kv_lengths=(max_len,), prefill_lengths=(max_len,))
    engine.generate([[1, 2, 3]], max_tokens=4)  # warm
    result = engine.generate([[1, 2, 3]], max_tokens=min(engine_tokens, max_len - 3))[0]
    roofline_s = step_bytes / bw
    return {
        "model": cfg.name, "overrides": list(overrides), "n_params": cfg.n_params(),
        "max_len": max_len, "dtype": cfg.dtype,
        "weight_bytes": weight_bytes, "kv_bytes_read": kv_bytes, "step_bytes": step_bytes,
        "bandwidth_bytes_per_s": bw,
        "roofline_s": roofline_s,
        "decode_step_s": step_s,  # best of `steps` calls (least disturbed by other load)
        "decode_step_median_s": step_median_s,
        "engine_per_token_s": result.per_token_s,
        "fraction_of_roofline": roofline_s / step_s,
    }


def decode_step_times(engine: Engine, repeats: int = 40) -> dict[int, dict]:
    """Best and median time of the engine's compiled decode step per batch bucket, at its
    longest KV window (positions at half of it): what one iteration costs as the fused batch
    grows."""
    out = {}
    length = engine.kv_lengths[-1]
    for phase, bucket in engine.buckets():
        if phase != "decode" or bucket.length != length:
            continue
        fn = engine._step_fn(phase, bucket)
        cache = engine.kv.window(bucket.batch, bucket.length)  # placed as the step takes it
        tokens = np.zeros(bucket.batch, np.int32)
        positions = np.full(bucket.batch, length // 2, np.int32)
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            logits, cache = fn(engine.params, tokens, cache, positions)
            logits.block_until_ready()
            times.append(time.perf_counter() - t0)
        engine.kv.set_window(cache)
        times = times[2:]
        out[bucket.batch] = {"best_s": min(times), "median_s": statistics.median(times),
                             "best_per_row_s": min(times) / bucket.batch}
    return out


def format_roofline(r: dict) -> str:
    return (f"{r['model']} {' '.join(r['overrides'])} ({r['n_params'] / 1e6:.1f}M params, "
            f"max_len {r['max_len']}): {r['step_bytes'] / 2**20:.2f} MiB per step / "
            f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s = roofline "
            f"{r['roofline_s'] * 1e3:.3f} ms; decode_step best {r['decode_step_s'] * 1e3:.3f} ms "
            f"(median {r['decode_step_median_s'] * 1e3:.3f}) "
            f"({100 * r['fraction_of_roofline']:.0f}% of roofline); engine per token "
            f"{r['engine_per_token_s'] * 1e3:.3f} ms")
