"""Serving benchmarks on the tiny models, one CPU device or a simulated mesh. Prints tables,
writes JSON.

    python benchmarks/serve.py                 # everything; results/serve.json, docs/img PNG
    python benchmarks/serve.py --only policies # one part: policies, between, shuffle,
                                               #   steps, layouts, roofline, sweep
    python benchmarks/serve.py --quick         # fewer rates and repeats (a smoke run)
    python benchmarks/serve.py --devices 8 --only policies --only between --only shuffle \
        --only steps --only layouts            # every bucket mw.shard-compiled on 8 simulated
                                               #   devices (results under "mesh8")

Parts:
- policies: fused vs static vs dynamic at several Poisson arrival rates, output lengths
  uniform in [16, 256] (max_len 320): throughput, p50/p99 latency, and fused's ratio to each.
- shuffle: fused with and without the memory shuffle on widely varying output lengths
  [2, 300] on gpt2-tiny (multi-head, so a decode step's cost grows with its bucket).
- layouts: the layout per bucket that actually ran on the mesh (`layouts.sharded_engine`,
  planned with the cpu profile and with tpu-v4's, with and without the one-stored-layout
  restriction), its steps in a fused run, and the layout switches. Needs --devices > 1.
- steps: the compiled decode step's time per bucket (1..32 rows): where batching stops
  being free on this CPU.
- roofline: batch-1 decode latency vs (weight + KV bytes per step) / measured bandwidth.
- between: rates between static's and fused's capacity, 512 requests (static's queue grows).
- sweep: Flover's sweep shape (32 requests of equal length, 32 slots, inter-arrival varied),
  speedup of fused over static and dynamic; drawn to docs/img/serve_sweep.png.
- burst: time to first token when requests arrive together (Poisson at 1000/s; 48 requests on
  8 slots, and 32 on 32 slots) on a Llama-shaped model (8 layers, E 512, 8 heads / 2 KV heads): the requests admitted in one
  iteration prefilled together (the engine's default) against one prompt per prefill call.

Timing: a virtual clock (measured compute time, idle gaps skipped); figures are medians of
`--repeats` runs. This machine is shared and has 2 cores: expect +-20% run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--devices" in sys.argv:  # simulated devices: before JAX starts
    _n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_n}").strip()

import jax
from meshwright.runtime import bench

DEVICES = 1  # set by --devices

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "serve.json"
PNG = ROOT.parent / "docs" / "img" / "serve_sweep.png"


def policies(model: str, rates, requests: int, repeats: int) -> dict:
    engine = bench.make_engine(model, max_slots=8, max_len=320, devices=DEVICES)
    rows = []
    for rate in rates:
        row = {"rate_per_s": rate}
        row.update(bench.compare(engine, {p: {"policy": p} for p in bench.POLICIES},
                                 repeats=repeats, requests=requests, rate=rate,
                                 out_len=(16, 256)))
        f = row["fused"]
        for base in ("static", "dynamic"):
            b = row[base]
            row[f"throughput_x_vs_{base}"] = (f["throughput_tokens_per_s"]
                                              / b["throughput_tokens_per_s"])
            row[f"p50_latency_x_vs_{base}"] = b["latency_s"]["p50"] / f["latency_s"]["p50"]
            row[f"p99_latency_x_vs_{base}"] = b["latency_s"]["p99"] / f["latency_s"]["p99"]
            row[f"p50_ttft_x_vs_{base}"] = b["ttft_s"]["p50"] / f["ttft_s"]["p50"]
        rows.append(row)
        print_policy_row(model, row)
    return {"model": model, "requests": requests, "out_len": [16, 256], "max_len": 320,
            "max_slots": 8, "window_s": 0.01, "repeats": repeats, "rows": rows}


def print_policy_row(model: str, row: dict) -> None:
    cells = []
    for p in bench.POLICIES:
        m = row[p]
        cells.append(f"{p} {m['throughput_tokens_per_s']:7.0f} tok/s p50 "
                     f"{m['latency_s']['p50'] * 1e3:7.1f} p99 {m['latency_s']['p99'] * 1e3:7.1f} ms")
    print(f"{model} rate {row['rate_per_s']:>6g}/s | " + " | ".join(cells)
          + f" | fused/static: tput {row['throughput_x_vs_static']:.2f}x, p50 "
          f"{row['p50_latency_x_vs_static']:.2f}x, ttft p50 {row['p50_ttft_x_vs_static']:.1f}x")


def between_capacities(model: str, rates, requests: int, repeats: int) -> dict:
    """Rates above static's capacity but below fused's: static's queue grows for the whole run,
    so its latency grows with the run's length while fused's does not."""
    engine = bench.make_engine(model, max_slots=8, max_len=320, devices=DEVICES)
    rows = []
    for rate in rates:
        row = {"rate_per_s": rate}
        row.update(bench.compare(engine, {p: {"policy": p} for p in ("fused", "static")},
                                 repeats=repeats, requests=requests, rate=rate,
                                 out_len=(16, 256)))
        f, s = row["fused"], row["static"]
        row["throughput_x_vs_static"] = (f["throughput_tokens_per_s"]
                                         / s["throughput_tokens_per_s"])
        row["p50_latency_x_vs_static"] = s["latency_s"]["p50"] / f["latency_s"]["p50"]
        row["p99_latency_x_vs_static"] = s["latency_s"]["p99"] / f["latency_s"]["p99"]
        row["p50_ttft_x_vs_static"] = s["ttft_s"]["p50"] / f["ttft_s"]["p50"]
        rows.append(row)
        print(f"{model} rate {rate:>4g}/s, {requests} requests | fused "
              f"{f['throughput_tokens_per_s']:6.0f} tok/s p50 {f['latency_s']['p50'] * 1e3:7.1f} ms"
              f" | static {s['throughput_tokens_per_s']:6.0f} tok/s p50 "
              f"{s['latency_s']['p50'] * 1e3:7.1f} ms | p50 latency {row['p50_latency_x_vs_static']:.2f}x,"
              f" p99 {row['p99_latency_x_vs_static']:.2f}x, ttft p50 {row['p50_ttft_x_vs_static']:.1f}x")
    return {"model": model, "requests": requests, "out_len": [16, 256], "max_len": 320,
            "max_slots": 8, "repeats": repeats, "rows": rows}


def shuffle(model: str, rates, requests: int, repeats: int) -> dict:
    engine = bench.make_engine(model, max_slots=8, max_len=320, devices=DEVICES)
    rows = []
    for rate in rates:
        row = {"rate_per_s": rate}
        row.update(bench.compare(engine, {"shuffle": {"policy": "fused", "shuffle": True},
                                          "no_shuffle": {"policy": "fused", "shuffle": False}},
                                 repeats=repeats, requests=requests, rate=rate,
                                 out_len=(2, 300)))
        a, b = row["shuffle"], row["no_shuffle"]
        row["throughput_x"] = a["throughput_tokens_per_s"] / b["throughput_tokens_per_s"]
        row["p50_latency_x"] = b["latency_s"]["p50"] / a["latency_s"]["p50"]
        row["mean_bucket"] = {k: _mean_bucket(row[k]["buckets_used"])
                              for k in ("shuffle", "no_shuffle")}
        # rows computed per generated token: the work the bucket choice costs, independent
        # of timing noise (1.0 = no idle rows)
        row["rows_per_token"] = {k: _rows(row[k]["buckets_used"]) / row[k]["tokens_generated"]
                                 for k in ("shuffle", "no_shuffle")}
        row["per_token_p50_x"] = (b["per_token_s"]["p50"] / a["per_token_s"]["p50"])
        rows.append(row)
        print(f"{model} rate {rate:>5g}/s | shuffle: {a['throughput_tokens_per_s']:6.0f} tok/s "
              f"p50 {a['latency_s']['p50'] * 1e3:6.1f} ms, per token "
              f"{a['per_token_s']['p50'] * 1e3:.3f} ms, mean bucket "
              f"{row['mean_bucket']['shuffle']:.2f}, rows/token "
              f"{row['rows_per_token']['shuffle']:.2f}, {a['kv_moves']} moves | no shuffle: "
              f"{b['throughput_tokens_per_s']:6.0f} tok/s p50 {b['latency_s']['p50'] * 1e3:6.1f}"
              f" ms, per token {b['per_token_s']['p50'] * 1e3:.3f} ms, mean bucket "
              f"{row['mean_bucket']['no_shuffle']:.2f}, rows/token "
              f"{row['rows_per_token']['no_shuffle']:.2f}")
    return {"model": model, "requests": requests, "out_len": [2, 300], "max_len": 320,
            "max_slots": 8, "repeats": repeats, "rows": rows}


def _rows(buckets_used: dict) -> int:
    return sum(int(b) * n for b, n in buckets_used.items())


def _mean_bucket(buckets_used: dict) -> float:
    steps = sum(buckets_used.values())
    return sum(int(b) * n for b, n in buckets_used.items()) / steps if steps else 0.0


def step_costs(models) -> dict:
    out = {}
    for model in models:
        engine = bench.make_engine(model, max_slots=32 if DEVICES == 1 else 8, max_len=320,
                                   devices=DEVICES, prefill_lengths=(320,))
        costs = bench.decode_step_times(engine)
        out[model] = {str(b): c for b, c in costs.items()}
        print(f"{model} decode step at max_len 320, best (median) per bucket: " + ", ".join(
            f"{b}: {c['best_s'] * 1e3:.2f} ({c['median_s'] * 1e3:.2f}) ms"
            for b, c in costs.items()))
    return out


def layouts(model: str) -> dict:
    """What ran per bucket on the mesh: the cpu profile's plan (weights placed once), and
    tpu-v4's with and without the one-stored-layout rule."""
    out = {}
    for label, hardware, share in (("cpu", "cpu", True), ("tpu-v4", "tpu-v4", True),
                                   ("tpu-v4-unshared", "tpu-v4", False)):
        engine = bench.make_engine(model, max_slots=8, max_len=320, devices=DEVICES,
                                   hardware=hardware, share_weights=share, progress=False,
                                   prefill_lengths=(32, 320))
        m = bench.serve_bench(engine=engine, policy="fused", requests=64, rate=40.0,
                              out_len=(16, 256), progress=False)
        print(f"\n{model}, planned for {hardware}"
              + ("" if share else " without the one-stored-layout rule") + ":")
        print(engine.layout_plan.explain())
        print(bench.format_layouts(m))
        print(f"fused run at 40 req/s: {m['layout_switches']} layout switches over "
              f"{m['decode_steps']} decode steps, {m['throughput_tokens_per_s']:.0f} tok/s, "
              f"per token p50 {m['per_token_s']['p50'] * 1e3:.2f} ms")
        out[label] = {"hardware": hardware, "share_weights": share,
                      "explain": engine.layout_plan.explain(),
                      "layout_plan": m["layout_plan"], "layouts_ran": m["layouts_ran"],
                      "weight_copies": m["weight_copies"],
                      "layout_switches": m["layout_switches"],
                      "decode_steps": m["decode_steps"], "buckets_used": m["buckets_used"],
                      "throughput_tokens_per_s": m["throughput_tokens_per_s"],
                      "per_token_p50_s": m["per_token_s"]["p50"]}
    return {"model": model, "devices": DEVICES, **out}


ROOFLINE_MODELS = [
    ("palm-tiny", ()),
    ("palm-tiny", ("name=palm-120m", "n_layers=8", "d_model=1024", "d_ff=4096", "n_heads=8",
                   "d_head=128")),
]


def roofline() -> dict:
    bw = bench.measure_bandwidth()
    print(f"memory bandwidth (jitted copy of {bw['bytes'] / 2 ** 21:.0f} MiB read + write): "
          f"{bw['bytes_per_s'] / 1e9:.1f} GB/s")
    rows = []
    for model, overrides in ROOFLINE_MODELS:
        r = bench.decode_roofline(model, max_len=320, overrides=overrides,
                                  bandwidth=bw["bytes_per_s"])
        rows.append(r)
        print(bench.format_roofline(r))
    return {"bandwidth": bw, "rows": rows}


def sweep(model: str, intervals, repeats: int) -> dict:
    # Flover's setting: 32 requests of one length, and room for all of them in one batch.
    result = bench.sweep(model, intervals=intervals, requests=32, out_len=(256, 256),
                         max_slots=32, max_len=320, window_s=0.01, repeats=repeats)
    print(bench.format_sweep(result))
    PNG.parent.mkdir(parents=True, exist_ok=True)
    bench.plot_sweep(result, str(PNG))
    result["png"] = str(PNG.relative_to(ROOT.parent))
    print(f"wrote {PNG}")
    return result


BURST_MODEL = ("llama-tiny", ("name=llama-e512", "n_layers=8", "d_model=512", "d_ff=1408",
                               "n_heads=8", "n_kv_heads=2", "d_head=64", "vocab_size=1024"))


def burst(requests: int, repeats: int) -> dict:
    """Two bursts: more requests than slots (8 slots, `requests` of them: after the first
    wave, requests join one by one as slots free, so TTFT is mostly queueing) and one that
    fits the slots (32 requests on 32 slots: every prompt waits only for the prefills).
    The two prefill settings run alternately, repeat by repeat; medians per setting."""
    from meshwright.runtime.bench import _median_metrics

    model, overrides = BURST_MODEL
    settings = (("one prompt per call", {"prefill_rows": (1,)}), ("batched (default)", {}))
    rows = []
    for slots, n in ((8, requests), (32, min(requests, 32))):
        engines = [bench.make_engine(model, overrides=overrides, max_slots=slots, max_len=320,
                                     progress=False, **kwargs) for _, kwargs in settings]
        runs: list[list[dict]] = [[] for _ in settings]
        for r in range(repeats):
            order = range(len(settings)) if r % 2 == 0 else reversed(range(len(settings)))
            for i in order:
                runs[i].append(bench.serve_bench(
                    engine=engines[i], policy="fused", requests=n, rate=1000.0,
                    out_len=(16, 64), prompt_len=(16, 64), progress=False))
        for (label, _), engine, measured in zip(settings, engines, runs):
            m = _median_metrics(measured) if len(measured) > 1 else measured[0]
            row = {"slots": slots, "requests": n, "prefill": label,
                   "prefill_rows": list(engine.prefill_rows),
                   "ttft_p50_s": m["ttft_s"]["p50"], "ttft_p99_s": m["ttft_s"]["p99"],
                   "latency_p50_s": m["latency_s"]["p50"],
                   "throughput_tokens_per_s": m["throughput_tokens_per_s"],
                   "prefill_calls": m["prefill_calls"], "prefills": m["prefills"]}
            rows.append(row)
            print(f"{n:3d} requests, {slots:2d} slots, {label:<20} rows "
                  f"{row['prefill_rows']}: TTFT p50 {1e3 * row['ttft_p50_s']:.0f} ms, p99 "
                  f"{1e3 * row['ttft_p99_s']:.0f} ms; latency p50 "
                  f"{1e3 * row['latency_p50_s']:.0f} ms; "
                  f"{row['throughput_tokens_per_s']:.0f} tok/s; {row['prefills']} prompts in "
                  f"{row['prefill_calls']} prefill calls")
        del engines
    return {"model": f"{model} {' '.join(overrides)}", "requests": requests, "rows": rows}


PARTS = ("policies", "between", "shuffle", "steps", "layouts", "roofline", "sweep", "burst")


def main() -> dict:
    global DEVICES
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--devices", type=int, default=1,
                        help="every bucket mw.shard-compiled on N simulated devices")
    parser.add_argument("--rates", help="comma-separated arrival rates of `policies`")
    parser.add_argument("--between-rates", help="comma-separated rates of `between`")
    parser.add_argument("--shuffle-rates", help="comma-separated rates of `shuffle`")
    args = parser.parse_args()
    DEVICES = args.devices
    parts = args.only or (PARTS if DEVICES == 1 else
                          ("policies", "between", "shuffle", "steps", "layouts"))
    repeats = args.repeats or (1 if args.quick else 3)
    mesh = DEVICES > 1
    # the mesh's capacity is ~6x lower here (8 simulated devices share 2 cores)
    rates = ((20, 60, 1000) if not mesh else (3, 10, 1000)) if args.quick else \
        ((10, 25, 40, 55, 70, 100, 200, 1000) if not mesh else (3, 6, 9, 12, 1000))
    if args.rates:
        rates = tuple(float(r) for r in args.rates.split(","))
    between = ((50, 60, 65) if not mesh else (8, 9.5)) if not args.quick else \
        ((60,) if not mesh else (10,))
    if args.between_rates:
        between = tuple(float(r) for r in args.between_rates.split(","))
    shuffle_rates = (15, 25, 35) if not mesh else (4, 7, 10)
    if args.shuffle_rates:
        shuffle_rates = tuple(float(r) for r in args.shuffle_rates.split(","))
    whole = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out = whole if not mesh else whole.setdefault(f"mesh{DEVICES}", {})
    out.update({"python": platform.python_version(), "jax": jax.__version__,
                "machine": platform.machine(), "devices": str(jax.devices()[:DEVICES]),
                "date": time.strftime("%Y-%m-%d %H:%M")})
    t0 = time.perf_counter()

    def save() -> None:  # after every part, so a long run interrupted keeps what it measured
        out["seconds"] = time.perf_counter() - t0
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(whole, indent=2, sort_keys=True, default=str))

    if "policies" in parts:
        print("== fused vs static vs dynamic, output lengths [16, 256] ==")
        out["policies"] = [policies("palm-tiny", rates, 128, repeats)]
        if not mesh:
            out["policies"].append(policies("gpt2-tiny", rates[::2], 128, repeats))
        save()
    if "between" in parts:
        print("\n== between static's and fused's capacity: longer runs ==")
        out["between"] = between_capacities("palm-tiny", between,
                                            512 if not args.quick else 128,
                                            max(1, repeats - 1))
        save()
    if "shuffle" in parts:
        print("\n== memory shuffle on / off, output lengths [2, 300] ==")
        # on the mesh: palm-tiny (gpt2-tiny's sharded step is 5-12 ms here, too slow to repeat)
        out["shuffle"] = shuffle("gpt2-tiny" if not mesh else "palm-tiny",
                                 shuffle_rates if not args.quick else shuffle_rates[1:2], 128,
                                 repeats + 2 if not mesh else repeats)
        save()
    if "steps" in parts:
        print("\n== decode step time per bucket ==")
        out["steps"] = step_costs(("palm-tiny", "gpt2-tiny"))
        save()
    if "burst" in parts and not mesh:
        print("\n== time to first token under a burst: batched prefill vs one per call ==")
        out["burst"] = burst(48 if not args.quick else 16, repeats)
        save()
    if "layouts" in parts:
        if not mesh:
            raise SystemExit("the layouts part needs --devices N (N > 1)")
        print("\n== layout per bucket ==")
        out["layouts"] = layouts("palm-tiny")
        save()
    if "roofline" in parts:
        print("\n== batch-1 decode vs the memory-bandwidth roofline ==")
        out["roofline"] = roofline()
        save()
    if "sweep" in parts:
        print("\n== Flover sweep: 32 requests x 256 tokens ==")
        intervals = ((0.001, 0.01, 0.1) if args.quick
                     else (0.0005, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0))
        out["sweep"] = sweep("palm-tiny", intervals, max(repeats, 5))
    save()
    print(f"\nwrote {RESULTS} ({out['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
