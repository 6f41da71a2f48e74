"""`meshwright demo`: the whole job on the bundled model, in about a minute on a laptop CPU.

    >>> from meshwright.runtime.demo import DemoOptions, run_demo
    >>> result = run_demo(DemoOptions(requests=6), echo=print)            # doctest: +SKIP
    >>> result["fused"]["throughput_tokens_per_s"], result["speedup"]     # doctest: +SKIP

What it does, one printed section each:

1. model: load the bundled byte-level PaLM-style model (`models.load_demo_model`), or a
   Hugging Face checkpoint (`DemoOptions.checkpoint`).
2. plan: trace its decode step at the serving batch, and let the analytical planner choose
   the mesh factorisation, FFN and attention layouts for 8 simulated CPU devices.
3. compile: every engine bucket (decode at 1, 2, 4, 8 rows; prefill at a few prompt lengths)
   through `mw.shard` on the 8-device mesh, each in the layout the planner picks for it
   (`runtime/layouts.py`): one mesh and one stored weight layout for the engine, so the
   weights are placed once and no bucket switch moves them; among the layouts that share
   those weights, each bucket runs the planner's cheapest (today: the attention layout
   follows the batch, over heads for small buckets and over batch once it covers the chips).
4. stream: a few prompts served together, one streamed as it is generated; checked against
   an unsharded single-device greedy decode.
5. serve: a Poisson burst of requests (prompts from held-out chapters) with temporal fusion
   (`fused`), then the same burst with `static` batching in the same engine; throughput and
   latency side by side.

Device count: 8 simulated CPU devices need `XLA_FLAGS=--xla_force_host_platform_device_count=8`
before JAX initialises; `ensure_host_devices` sets it (this module imports JAX lazily so it
can). Timing is the engine's virtual clock: the measured compute time of every iteration,
idle gaps between arrivals skipped.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

DEVICES = 8
STREAM_PROMPTS = ("In the beginning God", "The LORD is my shepherd;", "Blessed are the")
STREAM_TOKENS = 72  # at most, per streamed prompt
NEWLINE = 10  # the byte that ends a verse: the bundled model's stop token


@dataclass
class DemoOptions:
    """Settings of `meshwright demo` (the CLI flags of the same names)."""

    requests: int = 24  # requests in the Poisson burst
    rate: float = 40.0  # their mean arrival rate, requests per second
    out_len: tuple[int, int] = (16, 192)  # max tokens per request, uniform in [a, b]
    max_slots: int = 8  # KV slots = the largest decode bucket
    max_len: int = 256  # KV length per slot (prompt + output)
    kv_lengths: tuple[int, ...] = (128,)  # decode KV windows compiled below max_len (and it)
    prefill_rows: tuple[int, ...] = (1, 8)  # prompts per prefill call compiled
    prefill_lengths: tuple[int, ...] = (32,)  # padded prompt lengths compiled (and max_len)
    stream: int = 3  # prompts of the streaming section (0: none)
    check: bool = True  # compare the streamed completions with unsharded greedy decoding
    seed: int = 0
    checkpoint: str | None = None  # a Hugging Face checkpoint directory instead
    cache_dir: str | None = "auto"  # persistent XLA cache; "auto": ~/.cache/meshwright/xla
    hardware: str = "cpu"  # the profile the planner prices layouts with (e.g. "tpu-v4")
    progress: bool = True  # progress bars on stderr


# ---------------------------------------------------------------------------------------------
# Devices


def ensure_host_devices(n: int = DEVICES) -> None:
    """Ask XLA for `n` simulated CPU devices, if JAX has not initialised yet.

    Adds `--xla_force_host_platform_device_count=n` to XLA_FLAGS unless a count is already
    there. When JAX is already imported this can no longer change anything; `check_devices`
    then says what to do.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def check_devices(n: int = DEVICES) -> list:
    import jax

    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(
            f"the demo runs on {n} devices, JAX has {len(devices)} ({devices[0].platform}); "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX is imported "
            "(`meshwright demo` does this itself when it starts a fresh process)")
    return devices[:n]


def use_compilation_cache(cache_dir: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in `cache_dir` ("auto":
    ~/.cache/meshwright/xla) unless the caller set one already (e.g. the
    JAX_COMPILATION_CACHE_DIR environment variable); returns the directory in use."""
    import jax

    if cache_dir is None:
        return None
    if jax.config.jax_compilation_cache_dir:  # the caller's choice wins
        return jax.config.jax_compilation_cache_dir
    if cache_dir == "auto":
        from meshwright.passes.hardware import cache_dir as mw_cache

        cache_dir = str(mw_cache() / "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache_dir


# ---------------------------------------------------------------------------------------------
# The model and its text


@dataclass
class DemoModel:
    """What the demo serves: config, params, and how text becomes tokens."""

    config: object  # TransformerConfig
    params: dict
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    stop_tokens: tuple[int, ...]
    source: str  # "bundled: ..." or the checkpoint directory
    prompts: list[str] = field(default_factory=list)  # text prompts for the burst


def load_model(options: DemoOptions) -> DemoModel:
    """The bundled model (or `options.checkpoint`) with its tokenizer and burst prompts."""
    from meshwright.models import demo as bundled

    prompts = burst_prompts(options.requests, seed=options.seed)
    if options.checkpoint is None:
        config, params = bundled.load_demo_model()
        return DemoModel(config, params, bundled.encode, bundled.decode, (NEWLINE,),
                         "bundled: byte-level, trained on the King James Bible "
                         "(models/data/README.md)", prompts)
    from meshwright.models import from_pretrained, load_config, load_tokenizer

    longest = load_config(options.checkpoint).max_len  # its position limit (config.json only)
    config, params = from_pretrained(options.checkpoint, max_len=min(options.max_len, longest),
                                     scan_layers=True)
    tok = load_tokenizer(options.checkpoint)
    if tok is None:  # no tokenizer.json: bytes, clipped to the vocabulary
        def encode(text):
            return [b % config.vocab_size for b in text.encode()]

        decode = bundled.decode
    else:
        def encode(text):
            return tok.encode(text).ids

        def decode(ids):
            return tok.decode([int(i) for i in ids])
    return DemoModel(config, params, encode, decode, (), f"checkpoint: {options.checkpoint}",
                     prompts)


def burst_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts: the first 2-6 words of verses from the held-out chapters (never trained
    on), chosen with `seed`."""
    import numpy as np
    from meshwright.models.demo import demo_text

    verses = [v for v in demo_text("heldout").splitlines()
              if len(v.split()) > 8 and not v[-1].isdigit()]  # skip "Book N" headings
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(verses), size=n, replace=n > len(verses)):
        words = verses[int(i)].split()
        out.append(" ".join(words[:int(rng.integers(2, 7))]))
    return out


# ---------------------------------------------------------------------------------------------
# Serving


def greedy_reference(model, params, prompt: Sequence[int], max_tokens: int,
                     stop_tokens: Sequence[int] = (), max_len: int | None = None) -> list[int]:
    """Greedy decoding of one prompt on one device, unsharded: jitted prefill, then
    decode_step at batch 1 -- the numerics oracle for the engine. `model`: a
    TransformerConfig, a Model, or a model served from functions (run with its own
    functions)."""
    import jax.numpy as jnp
    import numpy as np
    from meshwright.models import TransformerConfig, build

    if isinstance(model, TransformerConfig):
        model = build(model)
    max_len = max_len or model.max_len
    cache = model.init_cache(1, max_len)
    T = len(prompt)
    padded = np.zeros((1, max_len), np.int32)  # one compiled prompt shape
    padded[0, :T] = prompt
    prefill, decode = _reference_steps(model)
    logits, cache = prefill(params, padded, cache, np.array([T - 1], np.int32))  # (1, V) at T-1
    token = int(jnp.argmax(logits[0]))
    out = [token]
    while len(out) < max_tokens and token not in stop_tokens:
        logits, cache = decode(params, np.array([token], np.int32), cache,
                               np.array([T + len(out) - 1], np.int32))
        token = int(jnp.argmax(logits[0]))
        out.append(token)
    return out


def _reference_steps(model) -> tuple[Callable, Callable]:
    """`model`'s prefill and decode step, jitted once per model (a reference Model is equal
    to another of the same config; a model served from functions is itself only), so that
    checking many prompts compiles each shape once, not once per prompt."""
    import jax

    try:
        return _reference_steps_of(model)
    except TypeError:  # an unhashable model: jitted afresh
        return jax.jit(model.prefill), jax.jit(model.decode_step)


@functools.lru_cache(maxsize=16)
def _reference_steps_of(model) -> tuple[Callable, Callable]:
    import jax

    return jax.jit(model.prefill), jax.jit(model.decode_step)


def make_burst(dm: DemoModel, options: DemoOptions, max_len: int) -> list:
    """(arrival_s, Request) pairs: Poisson arrivals at `options.rate`, seeded."""
    import numpy as np
    from meshwright.runtime.request import Request

    rng = np.random.default_rng(options.seed + 1)
    gaps = rng.exponential(1.0 / options.rate, size=options.requests)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])]) if options.requests else []
    lo, hi = options.out_len
    arrivals = []
    for i, (t, text) in enumerate(zip(times, dm.prompts)):
        prompt = tuple(dm.encode(text))[:max_len // 2] or (0,)
        n_out = min(int(rng.integers(lo, hi + 1)), max_len - len(prompt))
        arrivals.append((float(t), Request(prompt=prompt, max_tokens=n_out,
                                           stop_tokens=dm.stop_tokens, name=f"burst{i}")))
    return arrivals


METRIC_KEYS = ("policy", "requests_submitted", "requests_completed", "requests_failed",
               "tokens_generated", "elapsed_s", "throughput_tokens_per_s", "latency_s",
               "ttft_s", "per_token_s", "buckets_used", "layout_switches", "decode_steps",
               "prefills", "kv_moves", "layouts_ran")


def stream_completions(engine, dm: DemoModel, texts: Sequence[str], max_len: int,
                       out: TextIO | None) -> list[dict]:
    """Submit every prompt at once (they decode together), stream the first one's tokens to
    `out` as they are produced (iterating its handle drives the engine), and return every
    completion: {"prompt", "completion", "tokens"}."""
    from meshwright.runtime.request import Request

    n = min(STREAM_TOKENS, max_len // 2)
    handles = [engine.submit(Request(prompt=tuple(dm.encode(text))[:max_len // 2],
                                     max_tokens=n, stop_tokens=dm.stop_tokens))
               for text in texts]
    if out is not None and handles:
        out.write(f"  > {texts[0]}")
        for token in handles[0]:
            out.write(dm.decode([token]).replace("\n", ""))
            out.flush()
        out.write("\n")
    return [{"prompt": text, "completion": dm.decode(h.result().tokens),
             "tokens": list(h.result().tokens)} for text, h in zip(texts, handles)]


def compare_policies(engine, burst: list, policies: Sequence[str] = ("fused", "static"),
                     progress: bool = False) -> tuple[dict, dict]:
    """Serve the same burst under each policy; returns ({policy: metrics}, {policy:
    results}). Nothing compiles while serving (the engine compiled its helpers at start-up
    on the steps' own outputs), so there is no warm-up run."""
    reports, results = {}, {}
    for policy in policies:
        engine.set_policy(policy)
        report = engine.serve(burst, clock="virtual", progress=progress)
        reports[policy] = {k: report.metrics.get(k) for k in METRIC_KEYS}
        results[policy] = report.results
    engine.set_policy("fused")
    return reports, results


def run_demo(options: DemoOptions | None = None, out: TextIO | None = sys.stdout) -> dict:
    """Run the demo, printing each section to `out` (None: print nothing); returns the
    figures (the `meshwright demo --json` object, keys documented in docs/demo.md)."""
    options = options or DemoOptions()
    if options.requests < 1 or options.rate <= 0 or options.max_slots < 1:
        raise ValueError(f"the demo needs requests >= 1, rate > 0 and max_slots >= 1; got "
                         f"{options.requests}, {options.rate}, {options.max_slots}")

    def echo(text: str = "") -> None:
        if out is not None:
            print(text, file=out, flush=True)

    t_start = time.perf_counter()
    ensure_host_devices(DEVICES)
    import jax
    import numpy as np
    from meshwright.models import build
    from meshwright.runtime.layouts import example_args

    import meshwright as mw

    devices = check_devices(DEVICES)
    xla_cache = use_compilation_cache(options.cache_dir)
    result: dict = {"devices": len(devices), "platform": devices[0].platform}

    # ---- 1. model ------------------------------------------------------------------------
    dm = load_model(options)
    cfg = dm.config
    max_len = min(options.max_len, cfg.max_len)
    model = build(cfg)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(dm.params))
    result["model"] = {"name": cfg.name, "family": cfg.family, "source": dm.source,
                       "params": n_params, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                       "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                       "parallel_block": cfg.parallel_block, "vocab_size": cfg.vocab_size,
                       "max_len": cfg.max_len}
    echo(_section("1. model"))
    echo(f"{cfg.name}: {n_params / 1e6:.2f}M parameters ({cfg.dtype}), {cfg.n_layers} layers, "
         f"d_model {cfg.d_model}, {cfg.n_heads} query heads / {cfg.n_kv_heads} kv head(s), "
         f"{'parallel' if cfg.parallel_block else 'serial'} blocks, {cfg.activation}, "
         f"{cfg.positions} positions, vocab {cfg.vocab_size}")
    echo(f"source: {dm.source}")

    # ---- 2. plan -------------------------------------------------------------------------
    echo(_section("2. plan"))
    slots = options.max_slots
    args = example_args(cfg, dm.params, "decode", slots, max_len)
    t0 = time.perf_counter()
    graph = mw.trace(model.decode_step, *args)
    plan = mw.plan(graph, hardware=options.hardware, chips=DEVICES, context=max_len,
                   weights="fp32")
    plan_s = time.perf_counter() - t0
    echo(f"traced decode_step at the serving batch ({slots} rows, KV length {max_len}): "
         f"{len(graph)} equations; planned for {DEVICES} simulated {devices[0].platform} "
         f"devices in {plan_s:.1f} s")
    echo(_short_explain(plan.explain()))
    result["plan"] = {k: plan.to_dict()[k] for k in (
        "ffn_layout", "attention_layout", "mesh", "step_seconds", "mfu", "batch", "context",
        "phase", "hardware")}

    # ---- 3. compile ----------------------------------------------------------------------
    echo(_section("3. compile"))
    from meshwright.runtime.layouts import sharded_engine

    t0 = time.perf_counter()
    below = sorted({n for n in options.kv_lengths if n < max_len})
    engine = sharded_engine(
        model, dm.params, devices, hardware=options.hardware, max_slots=slots,
        max_len=max_len, kv_lengths=(*below, max_len),
        prefill_rows=tuple(r for r in options.prefill_rows if r <= slots),
        prefill_lengths=(*sorted({n for n in options.prefill_lengths if n < max_len}),
                         max_len), progress=options.progress)
    compile_s = time.perf_counter() - t0
    layouts = engine.layout_plan
    echo(layouts.explain_header())
    echo(_compile_table(engine))
    weights_once = weights_placed_once(engine)
    cache_note = f" (persistent XLA cache: {_home_relative(xla_cache)})" if xla_cache else ""
    echo(f"{len(engine.layouts)} buckets compiled through mw.shard in {compile_s:.1f} s"
         f"{cache_note}; " + ("every bucket takes the weights as they were placed, so no "
                              "bucket switch moves them" if weights_once else
                              "these buckets want some weights split otherwise and keep "
                              f"their own copy of those (placed once): "
                              f"{', '.join(engine.weight_copies)}"))
    aside = layouts.set_aside_text()
    if aside:
        echo(aside)
    result["mesh"] = dict(layouts.mesh)
    result["layout_plan"] = {"hardware": layouts.hardware, "mesh": dict(layouts.mesh),
                             "stored": layouts.stored_text, "reference": layouts.reference}
    result["weights_placed_once"] = weights_once
    result["compile_s"] = compile_s
    result["buckets"] = [
        {**c, "compile_s": round(engine._steps[(c["phase"], _bucket(c))].seconds, 3),
         "replicated_fallbacks": len(engine._steps[(c["phase"], _bucket(c))].record.fallbacks)}
        for c in layouts.to_dict()]

    # ---- 4. stream -----------------------------------------------------------------------
    completions: list[dict] = []
    result["sharded_equals_unsharded"] = None  # not checked
    if options.stream:
        echo(_section("4. stream"))
        texts = list(STREAM_PROMPTS[:options.stream])
        texts += dm.prompts[:max(0, options.stream - len(texts))]
        echo(f"{len(texts)} prompts served together (fused); the first streams as it is "
             "generated:")
        completions = stream_completions(engine, dm, texts, max_len, out)
        for c in completions[1:]:
            echo(f"  > {c['prompt']}{c['completion'].rstrip(chr(10))}")
        if options.check:
            same = [c["tokens"] == greedy_reference(
                cfg, dm.params, dm.encode(c["prompt"])[:max_len // 2],
                min(STREAM_TOKENS, max_len // 2), dm.stop_tokens, max_len)
                for c in completions]
            result["sharded_equals_unsharded"] = all(same)
            echo(f"check: sharded greedy == single-device greedy for {sum(same)}/{len(same)} "
                 "prompts")
    result["completions"] = completions

    # ---- 5. serve ------------------------------------------------------------------------
    echo(_section("5. serve: a Poisson burst, temporal fusion vs static batching"))
    burst = make_burst(dm, options, max_len)
    lo, hi = options.out_len
    echo(f"{len(burst)} requests, Poisson arrivals at {options.rate:g}/s, prompts = the "
         f"first words of held-out verses, up to {lo}-{hi} tokens each"
         + (", stop at end of verse" if dm.stop_tokens else ""))
    reports, results = compare_policies(engine, burst, progress=options.progress)
    result["samples"] = [{"prompt": dm.decode(r.prompt), "completion": dm.decode(r.tokens)}
                         for r in results["fused"][:3]]
    for sample in result["samples"]:
        echo(f"  > {sample['prompt']}{sample['completion'].rstrip(chr(10))}")
    echo("")
    echo(_metrics_table(reports))
    fused, static = reports["fused"], reports["static"]
    speedup = {
        "throughput": _ratio(fused["throughput_tokens_per_s"], static["throughput_tokens_per_s"]),
        "latency_p50": _ratio(static["latency_s"]["p50"], fused["latency_s"]["p50"]),
        "latency_p99": _ratio(static["latency_s"]["p99"], fused["latency_s"]["p99"])}
    echo(f"layouts in the fused run: {_layouts_ran_text(fused['layouts_ran'])}; "
         f"{fused['layout_switches']} layout switches over {fused['decode_steps']} decode "
         "steps")
    echo(f"fused vs static: {speedup['throughput']:.2f}x throughput, "
         f"{speedup['latency_p50']:.2f}x lower p50 latency, "
         f"{speedup['latency_p99']:.2f}x lower p99 latency")
    result.update(fused=fused, static=static, speedup=speedup,
                  workload={"requests": len(burst), "rate_per_s": options.rate,
                            "out_len": list(options.out_len), "max_slots": slots,
                            "max_len": max_len, "clock": "virtual", "seed": options.seed})
    result["seconds"] = time.perf_counter() - t_start
    echo(f"\ndemo finished in {result['seconds']:.0f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Formatting


def weights_placed_once(engine) -> bool:
    """Every compiled step takes the engine's weights exactly as they were placed."""
    from meshwright.runtime.engine import _same_shardings

    return not engine.weight_copies and all(
        _same_shardings(engine.params, step.in_shardings[0]) for step in engine._steps.values())


def _bucket(c: dict):
    from meshwright.runtime.engine import Bucket

    return Bucket(c["batch"], c["length"])


def _compile_table(engine) -> str:
    plan = engine.layout_plan
    head = (f"{'bucket':<16}{'runs':<14}{'planner, free':<22}{'predicted ms':>13}"
            f"{'compile s':>11}  why")
    lines = [head, "-" * len(head)]
    for key, c in plan.choices.items():
        step = engine._steps[key]
        lines.append(f"{c.phase + ' ' + str(c.batch) + 'x' + str(c.length):<16}{c.name:<14}"
                     f"{c.free:<22}{c.predicted_s * 1e3:>13.4g}{step.seconds:>11.1f}  {c.why}")
    return "\n".join(lines)


def _layouts_ran_text(ran: dict) -> str:
    """'ws-1d/heads 144 steps (rows 1/2/4, KV 128/256), ...' for the decode buckets run."""
    by_layout: dict[str, list] = {}
    for key, r in ran.items():
        phase, shape = key.split(":")
        if phase == "decode" and r["steps"]:
            rows, length = (int(n) for n in shape.split("x"))
            by_layout.setdefault(r["layout"], []).append((rows, length, r["steps"]))
    return ", ".join(
        f"{layout} {sum(n for *_, n in runs)} steps (rows "
        f"{'/'.join(str(b) for b in sorted({b for b, _, _ in runs}))}, KV "
        f"{'/'.join(str(n) for n in sorted({n for _, n, _ in runs}))})"
        for layout, runs in by_layout.items()) or "none"


def _home_relative(path: str) -> str:
    """`path` with the home directory written as ~ (the printed output names no user's home)."""
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "/" and path.startswith(home) else path


def _section(title: str) -> str:
    return f"\n== {title} " + "=" * max(3, 76 - len(title))


def _short_explain(text: str, rows: int = 6) -> str:
    """The planner's explanation without the list of inapplicable layouts, and at most
    `rows` candidate rows."""
    out, in_table, shown = [], False, 0
    for line in text.splitlines():
        if line.startswith("not applicable"):
            break
        if line.startswith("---"):
            in_table = True
        elif in_table and line.startswith(("*", "  ")) and line.strip():
            shown += 1
            if shown > rows:
                continue
        elif in_table and not line.strip():
            in_table = False
        out.append(line)
    return "\n".join(out).rstrip()


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _metrics_table(reports: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}"

    head = (f"{'policy':<8}{'done':>6}{'tokens':>8}{'tok/s':>8}{'p50 lat ms':>12}"
            f"{'p99 lat ms':>12}{'p50 ttft ms':>13}{'ms/token':>10}{'steps':>7}  buckets used")
    lines = [head, "-" * len(head)]
    for policy, m in reports.items():
        buckets = " ".join(f"{b}:{n}" for b, n in (m["buckets_used"] or {}).items())
        lines.append(
            f"{policy:<8}{m['requests_completed']:>6}{m['tokens_generated']:>8}"
            f"{m['throughput_tokens_per_s'] or 0:>8.0f}{ms(m['latency_s']['p50']):>12}"
            f"{ms(m['latency_s']['p99']):>12}{ms(m['ttft_s']['p50']):>13}"
            f"{ms(m['per_token_s']['p50']):>10}{m['decode_steps']:>7}  {buckets}")
    return "\n".join(lines)
