"""The `meshwright` command line. Thin: parse arguments, call the library, print.

Every command registers itself with `_command(name, help)`; its parser arguments are added
in `_add_<name>_arguments` and its work is in `_run_<name>`. Every command takes `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

from meshwright import validate
from meshwright.passes.layouts import ATTENTION, FFN  # imports no JAX
from meshwright.runtime.scheduler import POLICIES  # imports no JAX

_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def _command(name: str, help: str):
    """Register `_run_<name>` with its argument builder under subcommand `name`."""

    def register(run: Callable) -> Callable:
        add_arguments = globals().get(f"_add_{name.replace('-', '_')}_arguments", lambda p: None)
        _COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _checked(flag: str, check: Callable, *extra) -> Callable[[str], object]:
    """An argparse `type` that runs a `meshwright.validate` check on the flag's text, so a bad
    value is refused before the command starts, with the message the API gives."""
    def convert(text: str):
        try:
            return check(text, flag, *extra)
        except validate.InvalidArgument as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = check.__name__  # argparse names the type in some messages
    return convert


def _checked_list(flag: str, check: Callable) -> Callable[[str], tuple]:
    """Comma-separated values, each through `check`: "8,16,32"."""
    def convert(text: str) -> tuple:
        items = [v for v in text.split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: no values; give them "
                                             "separated by commas, e.g. 8,16")
        try:
            return tuple(check(v, flag) for v in items)
        except validate.InvalidArgument as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = check.__name__
    return convert


# ---------------------------------------------------------------------------------------------
# meshwright inspect MODEL


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="a bundled model preset (default: %(default)s -> the default small model)")
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--batch", type=_checked("--batch", validate.batch), default=2,
                   help="batch of the example inputs")
    p.add_argument("--length", type=_checked("--length", validate.length), default=8,
                   help="prompt length for prefill")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_layers=4 (repeatable)")
    p.add_argument("--scan", action="store_true", help="layers as a scan (--set scan_layers=true)")
    from meshwright.passes.base import STAGES

    p.add_argument("--after", metavar="PASS", default="trace",
                   help="show the graph after this pass: trace (default), "
                        + ", ".join(STAGES[1:]))
    p.add_argument("--diff", nargs=2, metavar=("PASS_A", "PASS_B"),
                   help="compare the graph text after two passes (unified diff), e.g. "
                        "--diff annotate collective-einsum")
    p.add_argument("--side-by-side", action="store_true",
                   help="--diff in two columns instead of a unified diff")
    p.add_argument("--width", type=_checked("--width", validate.positive_int), default=200,
                   help="--side-by-side: total width (default: %(default)s)")
    p.add_argument("--collective-einsum", choices=("auto", "on", "off"), default="auto",
                   help="looped collective einsums: auto (where the hardware profile says "
                        "overlap pays), on, off (default: %(default)s)")
    p.add_argument("--hardware", default=None,
                   help="hardware profile the lowering prices with (default: cpu; tpu-v4 for "
                        "a mesh of more devices than one CPU host profile covers, e.g. 4x4x4)")
    p.add_argument("--mesh", type=_checked("--mesh", validate.mesh_shape), default="2x2x2",
                   metavar="XxYxZ", help="mesh for --after annotate/lower (simulated CPU "
                   "devices, as many as it has; default: %(default)s)")
    p.add_argument("--force-ffn", metavar="LAYOUT", help="pin the FFN layout for lowering")
    p.add_argument("--force-attention", metavar="LAYOUT",
                   help="pin the attention layout for lowering")
    p.add_argument("--strict", action="store_true",
                   help="--after annotate/lower: an error instead of lowering any part "
                        "replicated that the layout splits (e.g. heads that do not divide)")
    p.add_argument("--source", action="store_true", help="append each equation's source line")
    p.add_argument("--dot", metavar="FILE", type=_checked("--dot", validate.output_file),
                   help="also write the graph as Graphviz DOT")
    p.add_argument("--summary", action="store_true", help="print op counts, FLOPs and bytes")


def _sharded_step(cfg, args):
    """(the mw.shard step, its example arguments), as mw.shard lowers the model on --mesh."""
    import jax

    from meshwright import api
    from meshwright.models import build

    sizes = args.mesh  # (x, y, z), checked by validate.mesh_shape
    mesh = api.make_mesh(dict(zip("xyz", sizes)))
    model = build(cfg)
    xs = model.example_args(args.phase, batch=args.batch, length=args.length,
                            key=jax.random.PRNGKey(0))
    force = {"mesh": sizes}
    if args.force_ffn:
        force["ffn"] = args.force_ffn
    if args.force_attention:
        force["attention"] = args.force_attention
    if "ffn" not in force or "attention" not in force:
        force = {k: v for k, v in force.items() if k != "mesh"}  # the planner picks the mesh
    hardware = args.hardware
    if hardware is None:
        from meshwright.passes.hardware import get_hardware

        hardware = "cpu" if len(mesh.devices.flat) <= get_hardware("cpu").max_chips else "tpu-v4"
    step = api.shard(model.fn(args.phase), mesh=mesh, force=force, hardware=hardware,
                     collective_einsum=args.collective_einsum, strict=args.strict)
    return step, xs


def _print_fallbacks(fallbacks: list[str] | None) -> None:
    """What ran other than planned, on stderr (stdout holds the graph or the table)."""
    if fallbacks:
        print(f"\nran replicated (correct, not sharded as planned; --strict refuses): "
              f"{len(fallbacks)}", file=sys.stderr)
        for f in fallbacks:
            print(f"  - {f}", file=sys.stderr)


@_command("inspect", "print the dataflow graph of a bundled model")
def _run_inspect(args) -> int:
    from meshwright import api
    from meshwright.models import DEFAULT_MODEL, get_config

    name = args.model or DEFAULT_MODEL
    cfg = get_config(name).with_overrides(args.set)
    if args.scan:
        cfg = cfg.replace(scan_layers=True)
    from meshwright.passes.base import STAGES

    for name in [args.after, *(args.diff or [])]:
        if name not in STAGES:
            raise ValueError(f"unknown pass {name!r}; the pipeline is: {', '.join(STAGES)}")
    if args.diff:
        step, xs = _sharded_step(cfg, args)
        text = step.diff(*xs, before=args.diff[0], after=args.diff[1],
                         side_by_side=args.side_by_side, width=args.width)
        if args.json:
            _print_json({"model": cfg.name, "phase": args.phase, "diff": args.diff,
                         "lines": text.splitlines()})
        else:
            print(text or f"(no difference between {args.diff[0]} and {args.diff[1]})")
        return 0
    text = None
    fallbacks = None  # what ran replicated where the layout splits it (lowered graphs only)
    if STAGES.index(args.after) > STAGES.index("plan"):  # these need the mesh
        step, xs = _sharded_step(cfg, args)
        if args.after == "quantize-int8" and step.weights != "int8":
            raise ValueError("quantize-int8 runs only with weights='int8'")
        texts: dict[str, str] = {}

        def keep(name, g):
            if name == args.after:
                texts[name] = g.format(source=args.source)

        c = step.compile_watched(keep, *xs)  # one compilation: every stage's graph, no XLA
        graph, fallbacks, text = c.graph, c.fallbacks, texts[args.after]
    else:
        graph = api.trace_model(cfg, phase=args.phase, batch=args.batch, length=args.length)
        graph = api.run_passes_until(graph, args.after)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(graph.to_dot())
    if args.json:
        out = {"model": cfg.name, "phase": args.phase, "after": args.after,
               "graph": graph.format(source=args.source).splitlines(),
               "summary": graph.summary()}
        if "axes" in graph.meta:
            out["axes"] = graph.meta["axes"].to_dict()
        if "blocks" in graph.meta:
            out["blocks"] = graph.meta["blocks"].to_list()
        if args.dot:
            out["dot"] = args.dot
        if fallbacks is not None:
            out["replicated_fallbacks"] = fallbacks
        _print_json(out)
        return 0
    print(text or graph.format(source=args.source))
    _print_fallbacks(fallbacks)
    if args.summary:
        print()
        print(graph.format_summary())
    if args.dot:
        print(f"\nwrote {args.dot}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright plan --model NAME --hardware HW --chips N --batch B --context L --phase P


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="palm-540b", help="model preset (default: %(default)s)")
    p.add_argument("--checkpoint", metavar="DIR", type=_checked("--checkpoint", validate.input_dir),
                   help="plan a Hugging Face checkpoint directory from its config.json "
                        "(no weights are read); replaces --model")
    p.add_argument("--hardware", default="tpu-v4", help="hardware profile (default: %(default)s)")
    p.add_argument("--chips", type=_checked("--chips", validate.positive_int), default=64,
                   help="number of chips, a slice size of --hardware (default: %(default)s)")
    p.add_argument("--batch", type=_checked("--batch", validate.batch), default=64,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--context", type=_checked("--context", validate.length), default=2048,
                   help="prompt tokens (prefill) / KV length (decode) (default: %(default)s)")
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--weights", choices=("bf16", "int8", "fp32"), default="bf16")
    p.add_argument("--gen-tokens", type=_checked("--gen-tokens", validate.positive_int),
                   default=64,
                   help="decode steps counted in latency_seconds (default: %(default)s)")
    p.add_argument("--force-ffn", metavar="LAYOUT",
                   help=f"pin the FFN layout: {', '.join(FFN)}")
    p.add_argument("--force-attention", metavar="LAYOUT",
                   help=f"pin attention: {' or '.join(ATTENTION)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_kv_heads=48 (repeatable)")
    p.add_argument("--kv-memory-fraction", default=0.3,
                   type=_checked("--kv-memory-fraction", validate.fraction),
                   help="share of memory the KV cache may use for max_context "
                        "(default: %(default)s)")
    p.add_argument("--nodes", type=_checked("--nodes", validate.positive_int), default=None,
                   help="split --chips into this many equal nodes / TPU slices (default: one "
                        "node if they fit one, else the fewest)")
    p.add_argument("--cross-node", choices=("replicas", "pipeline", "stretched"), default=None,
                   help="pin what crosses the network between nodes (default: the cheapest)")
    p.add_argument("--microbatches", type=_checked("--microbatches", validate.positive_int),
                   default=None, help="pin a pipeline's microbatches (default: the cheapest; "
                                      "with --cross-node pipeline)")


@_command("plan", "choose mesh, FFN and attention layouts with the analytical cost model")
def _run_plan(args) -> int:
    from meshwright.passes.planner import plan

    model = args.model
    if args.checkpoint:
        from meshwright.models.hf import load_config

        model = load_config(args.checkpoint)
    validate.slice_chips(args.chips, args.hardware, "--chips")
    result = plan(model, hardware=args.hardware, chips=args.chips, batch=args.batch,
                  context=args.context, phase=args.phase, weights=args.weights,
                  gen_tokens=args.gen_tokens, force_ffn=args.force_ffn,
                  force_attention=args.force_attention,
                  kv_memory_fraction=args.kv_memory_fraction, overrides=args.set,
                  nodes=args.nodes, cross_node=args.cross_node,
                  microbatches=args.microbatches)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(result.explain())
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright frontier --model NAME --hardware HW --png FILE


def _add_frontier_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="palm-540b", help="model preset (default: %(default)s)")
    p.add_argument("--hardware", default="tpu-v4", help="hardware profile (default: %(default)s)")
    p.add_argument("--chips", type=_checked_list("--chips", validate.positive_int),
                   default=None, help="comma-separated chip counts, slice sizes of --hardware "
                   "(default: 8,16,...,256 within the slice)")
    p.add_argument("--batches", type=_checked_list("--batches", validate.batch), default=None,
                   help="comma-separated batch sizes (default: 1,2,4,...,1024)")
    p.add_argument("--context", type=_checked("--context", validate.length), default=2048)
    p.add_argument("--phases", default="prefill,decode", help="default: %(default)s")
    p.add_argument("--weights", default="bf16,int8", help="weight formats (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--png", metavar="FILE", type=_checked("--png", validate.output_file),
                   help="draw the Pareto frontiers to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@_command("frontier", "sweep batch x chips x layouts x weights; latency-vs-MFU Pareto frontier")
def _run_frontier(args) -> int:
    from meshwright.passes.frontier import sweep

    for chips in args.chips or ():
        validate.slice_chips(chips, args.hardware, "--chips")
    result = sweep(args.model, hardware=args.hardware, chips=args.chips, batches=args.batches,
                   context=args.context,
                   phases=tuple(args.phases.split(",")), weights=tuple(args.weights.split(",")),
                   overrides=args.set, progress=not (args.no_progress or args.json))
    if args.png:
        result.plot(args.png)
    if args.json:
        out = result.to_dict()
        if args.png:
            out["png"] = args.png
        _print_json(out)
    else:
        print(result.format())
        if args.png:
            print(f"\nwrote {args.png}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright calibrate


def _add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=_checked("--devices", validate.device_count), default=8,
                   help="simulated devices to measure with (default: %(default)s)")
    p.add_argument("--output", metavar="FILE", type=_checked("--output", validate.output_file),
                   help="where to save the profile (default: $MESHWRIGHT_CACHE/cpu.json or "
                        "~/.cache/meshwright/cpu.json)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for tests)")
    p.add_argument("--no-save", action="store_true", help="measure and print, save nothing")


@_command("calibrate", "measure this machine's matmul, memory and collective rates; save a profile")
def _run_calibrate(args) -> int:
    from meshwright.passes.calibrate import calibrate, format_report

    report = calibrate(devices=args.devices, output=args.output, quick=args.quick,
                       save=not args.no_save)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright bench serve --model NAME --policy P --requests N --rate R --out-len A B ...


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("serve",), help="what to benchmark: serve (the runtime)")
    p.add_argument("--model", default="palm-tiny", help="model preset (default: %(default)s)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="DIR",
                        type=_checked("--checkpoint", validate.input_dir),
                        help="serve a Hugging Face checkpoint directory instead of a preset")
    source.add_argument("--model-fn", metavar="MODULE:FACTORY",
                        help="serve your own model: FACTORY() in MODULE returns (model, "
                             "params), the model from meshwright.models.from_functions "
                             "(see docs/serving.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--policy", choices=POLICIES, default="fused")
    p.add_argument("--no-shuffle", action="store_true", help="fused without the memory shuffle")
    p.add_argument("--requests", type=_checked("--requests", validate.positive_int), default=64,
                   help="default: %(default)s (with --trace: at most the trace's entries)")
    arrival = p.add_mutually_exclusive_group()
    arrival.add_argument("--rate", type=_checked("--rate", validate.positive_number),
                         help="Poisson arrivals per second")
    arrival.add_argument("--interval", type=_checked("--interval", validate.non_negative_number),
                         help="fixed seconds between arrivals")
    p.add_argument("--out-len", type=_checked("--out-len", validate.positive_int), nargs=2,
                   default=(16, 256), metavar=("A", "B"),
                   help="output lengths uniform in [A, B] (default: 16 256)")
    p.add_argument("--prompt-len", type=_checked("--prompt-len", validate.positive_int),
                   nargs=2, default=(4, 16), metavar=("A", "B"),
                   help="prompt lengths uniform in [A, B] (default: 4 16)")
    p.add_argument("--trace", metavar="FILE", type=_checked("--trace", validate.input_file),
                   help="JSON trace of output lengths")
    p.add_argument("--max-slots", type=_checked("--max-slots", validate.positive_int), default=8,
                   help="KV slots (default: %(default)s)")
    p.add_argument("--max-len", type=_checked("--max-len", validate.max_len), default=None,
                   help="KV length per slot; requests longer than it are shortened, and the "
                        "workload line says how many (default: the largest prompt + output, "
                        "rounded up to 64)")
    p.add_argument("--window", type=_checked("--window", validate.non_negative_number),
                   default=0.01, help="dynamic batching window in seconds (default: %(default)s)")
    p.add_argument("--repeats", type=_checked("--repeats", validate.positive_int), default=1,
                   help="runs; figures are medians")
    p.add_argument("--seed", type=_checked("--seed", validate.non_negative_int), default=0)
    p.add_argument("--clock", choices=("virtual", "wall"), default="virtual",
                   help="virtual: measured compute time, idle gaps skipped (default)")
    p.add_argument("--sweep", action="store_true",
                   help="Flover's sweep: every policy at several mean inter-arrival times")
    p.add_argument("--intervals", default=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
                   type=_checked_list("--intervals", validate.positive_number),
                   help="mean inter-arrival times of --sweep, seconds (default: "
                        "0.001,0.003,0.01,0.03,0.1,0.3)")
    p.add_argument("--png", metavar="FILE", type=_checked("--png", validate.output_file),
                   help="--sweep: draw the speedups to this PNG")
    p.add_argument("--output", metavar="FILE", type=_checked("--output", validate.output_file),
                   help="also write the JSON result to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--devices", type=_checked("--devices", validate.device_count), default=1,
                   help="compile every bucket with mw.shard on this many (simulated CPU) "
                        "devices, each in the planner's layout (default: 1, plain jax.jit)")
    p.add_argument("--hardware", default="cpu",
                   help="--devices: the profile the planner prices layouts with "
                        "(default: %(default)s; e.g. tpu-v4)")
    p.add_argument("--no-share-weights", action="store_true",
                   help="--devices: let each bucket run its cheapest layout even if it stores "
                        "the weights otherwise (that bucket keeps its own copy)")


@_command("bench", "benchmarks: `bench serve` replays a Poisson workload through the runtime")
def _run_bench(args) -> int:
    from meshwright.runtime import bench  # main() set the simulated device count already

    if args.model_fn and args.set:
        raise ValueError("--set overrides a preset's config; a --model-fn model is built by "
                         "its factory (change it there)")
    lo, hi = validate.int_range(args.out_len, "--out-len")
    validate.int_range(args.prompt_len, "--prompt-len")
    max_len = args.max_len or max(64, -(-(hi + args.prompt_len[1]) // 64) * 64)
    progress = not (args.no_progress or args.json)
    engine = bench.make_engine(args.model, max_slots=args.max_slots, max_len=max_len,
                               overrides=args.set, seed=args.seed, progress=progress,
                               checkpoint=args.checkpoint, model_fn=args.model_fn,
                               devices=args.devices,
                               hardware=args.hardware,
                               share_weights=not args.no_share_weights)
    if args.sweep:
        intervals = list(args.intervals)
        result = bench.sweep(engine=engine, intervals=intervals, requests=args.requests,
                             out_len=(lo, hi), prompt_len=tuple(args.prompt_len),
                             window_s=args.window, seed=args.seed, repeats=args.repeats,
                             progress=progress)
        if args.png:
            bench.plot_sweep(result, args.png)
            result["png"] = args.png
        text = bench.format_sweep(result)
    else:
        result = bench.serve_bench(
            engine=engine, policy=args.policy, requests=args.requests, rate=args.rate,
            interval=args.interval, out_len=(lo, hi), prompt_len=tuple(args.prompt_len),
            shuffle=not args.no_shuffle, window_s=args.window, seed=args.seed,
            repeats=args.repeats, trace=args.trace, clock=args.clock, progress=progress)
        text = bench.format_metrics(result)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
    if args.json:
        _print_json(result)
    else:
        print(text)
        if args.output:
            print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright serve [--model P | --checkpoint DIR | --model-fn M:F] [--host] [--port] ...


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="palm-kjv",
                        help="palm-kjv (default): the bundled byte-level model and its trained "
                             "weights; or a preset, served with random weights")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="a Hugging Face checkpoint directory (its tokenizer.json, chat "
                             "template and end-of-sequence ids too)")
    source.add_argument("--model-fn", metavar="MODULE:FACTORY",
                        help="your own model: FACTORY() in MODULE returns (model, params)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's config field (repeatable)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients send (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s; 0: any free")
    p.add_argument("--devices", type=_checked("--devices", validate.device_count), default=1,
                   help="compile every bucket with mw.shard on this many (simulated CPU) "
                        "devices, each in the planner's layout (default: 1, plain jax.jit)")
    p.add_argument("--hardware", default="cpu",
                   help="--devices: the profile the planner prices layouts with "
                        "(default: %(default)s)")
    p.add_argument("--max-slots", type=_checked("--max-slots", validate.positive_int), default=8,
                   help="KV slots: requests decoded together (default: %(default)s)")
    p.add_argument("--max-len", type=_checked("--max-len", validate.max_len), default=None,
                   help="KV length per slot, prompt + output (default: the model's)")
    p.add_argument("--policy", choices=POLICIES, default="fused")
    p.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests beyond this are answered 429 (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the most tokens one request may ask for (default: max_len - 1)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies are answered 413 (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require Authorization: Bearer KEY on every endpoint but /health "
                        "(default: $MESHWRIGHT_API_KEY; none when unset)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish "
                        "(default: %(default)s)")
    p.add_argument("--stream-interval", type=float, default=0.0, metavar="MS",
                   help="a stream sends at most one chunk per MS milliseconds, the tokens "
                        "of that time together (default: 0, a chunk per engine step)")
    p.add_argument("--engine-cpus", default="auto", metavar="auto|off|CPUS",
                   help="once compiled, pin the engine process to these CPUs (0-2,5) and the "
                        "HTTP process to the others; auto (default): the HTTP process on the "
                        "last CPU, the engine's loop on the others, XLA's threads (which run "
                        "the compiled steps) on every CPU; off: no pinning")
    p.add_argument("--seed", type=int, default=0, help="a preset's random weights")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--no-progress", action="store_true", help="no compile progress bar")


@_command("serve", "an OpenAI-compatible HTTP server on the engine (completions, chat, "
                   "streaming, /metrics)")
def _run_serve(args) -> int:
    if args.devices > 1:  # simulated CPU devices: the flag must be set before JAX starts
        from meshwright.runtime.demo import ensure_host_devices

        ensure_host_devices(args.devices)
    from meshwright.runtime.server import ServeOptions, serve

    options = ServeOptions(
        model=args.model, checkpoint=args.checkpoint, model_fn=args.model_fn,
        overrides=tuple(args.set), model_name=args.model_name, host=args.host, port=args.port,
        devices=args.devices, hardware=args.hardware, max_slots=args.max_slots,
        max_len=args.max_len, max_queue=args.max_queue, policy=args.policy,
        max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, api_key=args.api_key,
        drain_timeout_s=args.drain_timeout, stream_interval_s=args.stream_interval / 1e3,
        engine_cpus=args.engine_cpus, seed=args.seed, access_log=args.access_log,
        progress=not (args.no_progress or args.json), json=args.json)
    return serve(options)


# ---------------------------------------------------------------------------------------------
# meshwright demo [--requests N] [--rate R] [--checkpoint DIR]


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=_checked("--requests", validate.positive_int), default=24,
                   help="requests in the Poisson burst (default: %(default)s)")
    p.add_argument("--rate", type=_checked("--rate", validate.positive_number), default=40.0,
                   help="mean arrivals per second of the burst (default: %(default)s)")
    p.add_argument("--out-len", type=_checked("--out-len", validate.positive_int), nargs=2,
                   default=(16, 192), metavar=("A", "B"),
                   help="max tokens per request, uniform in [A, B] (default: 16 192)")
    p.add_argument("--max-len", type=_checked("--max-len", validate.max_len), default=256,
                   help="KV length per slot, prompt + output (default: %(default)s)")
    p.add_argument("--stream", type=_checked("--stream", validate.non_negative_int), default=3,
                   help="prompts of the streaming section, 0 for none (default: %(default)s)")
    p.add_argument("--no-check", action="store_true",
                   help="skip comparing the streamed completions with unsharded decoding")
    p.add_argument("--checkpoint", metavar="DIR", type=_checked("--checkpoint", validate.input_dir),
                   help="serve a Hugging Face checkpoint directory instead of the bundled model")
    p.add_argument("--seed", type=_checked("--seed", validate.non_negative_int), default=0)
    p.add_argument("--hardware", default="cpu",
                   help="profile the planner prices each bucket's layout with (default: "
                        "%(default)s; e.g. tpu-v4: still runs on the simulated CPU mesh)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@_command("demo", "the main job: plan, compile on a simulated 8-device mesh, serve a burst")
def _run_demo(args) -> int:
    from meshwright.runtime import demo  # imports no JAX: the device flag can still be set

    options = demo.DemoOptions(
        requests=args.requests, rate=args.rate,
        out_len=validate.int_range(args.out_len, "--out-len"),
        max_len=args.max_len, stream=args.stream, check=not args.no_check,
        checkpoint=args.checkpoint, seed=args.seed, hardware=args.hardware,
        progress=not (args.no_progress or args.json))
    result = demo.run_demo(options, out=None if args.json else sys.stdout)
    if args.json:
        _print_json(result)
    return 0


# ---------------------------------------------------------------------------------------------
# meshwright launch -n N [--devices-per-process K] -- COMMAND ...


def _add_launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--processes", type=_checked("--processes", validate.positive_int),
                   required=True, help="how many processes to start")
    p.add_argument("--devices-per-process", default=None, metavar="K",
                   type=_checked("--devices-per-process", validate.device_count),
                   help="simulated CPU devices in each process (XLA_FLAGS); default: as set")
    p.add_argument("--timeout", type=_checked("--timeout", validate.positive_number),
                   default=None, metavar="SECONDS",
                   help="a process silent this long counts as lost, and the others stop "
                        "(MESHWRIGHT_TIMEOUT_S; default 60)")
    p.add_argument("--port", type=_checked("--port", validate.positive_int), default=None,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--deadline", type=_checked("--deadline", validate.positive_number),
                   default=None, metavar="SECONDS",
                   help="stop the whole job after this long (exit code 124)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the program every process runs")


@_command("launch", "start N local processes of one multi-process job (jax.distributed)")
def _run_launch(args) -> int:
    from meshwright.runtime.launch import launch

    cmd = validate.command(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd, "COMMAND")
    result = launch(cmd, args.processes, devices_per_process=args.devices_per_process,
                    timeout_s=args.timeout, port=args.port, deadline_s=args.deadline,
                    out=None if args.json else sys.stdout, keep_output=args.json)
    if args.json:
        _print_json({"returncode": result.returncode, "returncodes": result.returncodes,
                     "failed_process": result.failed, "seconds": round(result.seconds, 3),
                     "output": {str(k): v for k, v in result.output.items()}})
    return result.returncode


# ---------------------------------------------------------------------------------------------
# meshwright export MODEL --platform tpu --mesh 4x4x4 --phase decode --batch B --out FILE


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="palm-tiny",
                   help="model preset (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set d_model=256 (repeatable)")
    p.add_argument("--platform", action="append", choices=("tpu", "cuda", "rocm", "cpu"),
                   help="platform to lower for (repeatable; default: tpu)")
    p.add_argument("--mesh", type=_checked("--mesh", validate.mesh_shape), default="4x4x4",
                   metavar="XxYxZ", help="the target mesh (default: %(default)s)")
    p.add_argument("--hardware", default=None,
                   help="hardware profile the planner prices (default: tpu-v4 for tpu, "
                        "h100 for cuda, cpu for cpu)")
    p.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    p.add_argument("--batch", type=_checked("--batch", validate.batch), default=8,
                   help="sequences per step (default: %(default)s)")
    p.add_argument("--length", type=_checked("--length", validate.length), default=128,
                   help="prompt length (prefill) (default: %(default)s)")
    p.add_argument("--max-len", type=_checked("--max-len", validate.max_len), default=None,
                   help="KV cache length (default: the config's max_len)")
    p.add_argument("--force-ffn", metavar="LAYOUT", help="pin the FFN layout")
    p.add_argument("--force-attention", metavar="LAYOUT", help="pin the attention layout")
    p.add_argument("--weights", choices=("native", "int8"), default="native",
                   help="int8: the program takes int8 weights, converted from the float "
                        "ones once when it is loaded (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="an error instead of exporting a program that runs any part "
                        "replicated that the plan splits (listed in the manifest otherwise)")
    p.add_argument("--out", required=True, metavar="FILE",
                   type=_checked("--out", validate.output_file),
                   help="the artifact; the manifest goes to FILE.json")


@_command("export", "lower the sharded program for a TPU or GPU mesh (jax.export); write it")
def _run_export(args) -> int:
    from meshwright.passes.export import export_model  # main() simulated the mesh's devices

    sizes = args.mesh

    platforms = tuple(args.platform or ("tpu",))
    program = export_model(args.model, platforms=platforms, mesh=sizes, phase=args.phase,
                           batch=args.batch, length=args.length, max_len=args.max_len,
                           hardware=args.hardware, overrides=args.set,
                           force_ffn=args.force_ffn, force_attention=args.force_attention,
                           weights=args.weights, strict=args.strict)
    manifest_path = program.save(str(args.out))
    m = program.manifest
    counted = program.collectives()
    summary = {"artifact": str(args.out), "manifest": str(manifest_path), "bytes": m["bytes"],
               "platforms": m["platforms"], "mesh": m["mesh"], "layouts": m["layouts"],
               "collectives_in_stablehlo": counted, "collectives_emitted":
               m["collectives_emitted"], "predicted": m["predicted"],
               "load_conversion": m.get("load_conversion"),
               "replicated_fallbacks": m["replicated_fallbacks"]}
    if args.json:
        _print_json(summary)
        return 0
    cfg = m["model_config"] or {}
    print(f"exported {cfg.get('name', args.model)} {args.phase} (batch {args.batch}) for "
          f"{', '.join(platforms)} on a {'x'.join(map(str, sizes))} mesh: FFN "
          f"{m['layouts']['ffn']}, attention {m['layouts']['attention']}")
    print(f"wrote {args.out} ({m['bytes']} bytes of serialized StableHLO) and {manifest_path}")
    conversion = m.get("load_conversion")
    if conversion:  # weights converted at load time: a second program, applied once
        kinds = sorted({step.split()[0] for i in m["inputs"] if "converted" in i
                        for step in i["converted"]["steps"]})  # "int8", "interleave"
        print(f"wrote {args.out}.convert ({conversion['bytes']} bytes): converts "
              f"{len(conversion['weights'])} weights ({', '.join(kinds)}) once, when the "
              "program is loaded")
    print(f"{'collective':<20}{'in StableHLO':>14}{'bytes/device':>14}{'lowering emitted':>18}")
    for kind in sorted(set(counted["count"]) | set(m["collectives_emitted"])):
        emitted = m["collectives_emitted"].get(kind, {"count": 0})
        print(f"{kind:<20}{counted['count'].get(kind, 0):>14}"
              f"{counted['bytes'].get(kind, 0):>14}{emitted['count']:>18}")
    predicted = (m["predicted"] or {}).get("comm_bytes_per_chip")
    # the ppermute steps of a looped collective einsum pass N-1 of N blocks
    looped = (f" ({counted['model_bytes']} with each collective einsum's ppermutes counted "
              "as the collective they replace)"
              if counted["model_bytes"] != counted["total_bytes"] else "")
    print(f"collective bytes per device: {counted['total_bytes']} in StableHLO{looped}, "
          f"{predicted if predicted is not None else '-'} predicted by the cost model")
    _print_fallbacks(m["replicated_fallbacks"])
    return 0


# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line argparse refused, raised instead of argparse printing usage and exiting,
    so it is reported like every other error: one line, or JSON with --json."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # "argument --batch: --batch -4: must be ..." -> "--batch -4: must be ..."
        m = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if m and any(m.group(2).startswith(f"{flag} ") for flag in m.group(1).split("/")):
            message = m.group(2)
        raise _UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshwright",
        description="Shard Transformer inference across device meshes: trace, plan, rewrite, "
                    "lower, run and serve.")
    from meshwright import __version__

    parser.add_argument("--version", action="version", version=f"meshwright {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_arguments, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON object for machines")
    return parser


DEFAULT_DEVICES = 8  # simulated CPU devices when a command needs no particular count
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def devices_needed(args: argparse.Namespace) -> int:
    """The simulated CPU devices a parsed command line needs: the mesh it lowers on, the
    devices it serves or measures with; 0 when it needs none in particular."""
    if args.command == "inspect" and (args.diff or args.after in (
            "annotate", "collective-einsum", "lower")):
        return args.mesh[0] * args.mesh[1] * args.mesh[2]
    if args.command == "export":
        return args.mesh[0] * args.mesh[1] * args.mesh[2]
    if args.command == "calibrate" and int(os.environ.get("MESHWRIGHT_NUM_PROCESSES") or 1) > 1:
        return 0  # under meshwright launch: each process keeps the devices launch gave it
    if args.command in ("bench", "serve", "calibrate"):
        return args.devices
    if args.command == "demo":
        from meshwright.runtime.demo import DEVICES  # imports no JAX

        return DEVICES
    return 0


def _simulate_devices(count: int) -> None:
    """On a CPU-only machine, simulate at least `count` devices (and 8 when the command needs
    none in particular, `count` 0). XLA reads the flag when JAX first initialises, so this
    only works before anything imports jax; afterwards a mesh too large for the devices says
    which flag to set. A count already in XLA_FLAGS is kept when it is enough. A command that
    runs on one device (`serve`, `bench serve` without --devices) keeps XLA's single CPU
    device: with 8 simulated, one device's step is slower (GPT-2 small's 8x256 decode step,
    medians of 15 calls in 3 rounds: 35.9-37.6 ms with one device, 42.2-44.6 ms with 8)."""
    if "jax" in sys.modules or count == 1:
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    have = [f for f in flags if f.startswith(_COUNT_FLAG)]
    if have:
        try:
            if int(have[-1].partition("=")[2]) >= count:
                return
        except ValueError:
            pass
    flags = [f for f in flags if not f.startswith(_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"{_COUNT_FLAG}={max(count, DEFAULT_DEVICES if not have else 1)}"])


def _error(command: str | None, message: str, as_json: bool, code: int = 2) -> int:
    """Report an error the way every command does: one line on stderr, or {"error": ...} on
    stdout with --json."""
    message = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        _print_json({"error": message})
    else:
        print(f"{command or 'meshwright'}: error: {message}", file=sys.stderr)
    return code


def _user_error(e: Exception) -> bool:
    """Errors about the user's function rather than meshwright's code (their modules import
    JAX, so they are looked up only once an error happened)."""
    kinds = [getattr(sys.modules.get(module), name, None) for module, name in (
        ("meshwright.ir.trace", "UnsupportedError"), ("meshwright.passes.base", "PassError"))]
    return any(k is not None and isinstance(e, k) for k in kinds)


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit code: 0 done, 2 a bad request (one line on
    stderr, or {"error": ...} with --json), 1 an internal error (a bug: one line, and the
    traceback with MESHWRIGHT_TRACEBACK=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:  # the top parser reports unknown flags: name the command
        prog = f"meshwright {argv[0]}" if e.prog == "meshwright" and argv and \
            argv[0] in _COMMANDS else e.prog
        return _error(prog, str(e), "--json" in argv)
    if not args.command:
        parser.print_help()
        return 0
    command = f"meshwright {args.command}"
    as_json = getattr(args, "json", False)
    _, _, run = _COMMANDS[args.command]
    try:
        _simulate_devices(devices_needed(args))
        return run(args) or 0
    except BrokenPipeError:  # `meshwright plan ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except KeyError as e:  # user errors: a clear message, no traceback
        return _error(command, e.args[0] if e.args else str(e), as_json)
    except (ValueError, ImportError) as e:
        return _error(command, str(e), as_json)
    except OSError as e:  # a file that cannot be read or written
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return _error(command, f"{e.strerror or e}:{where}" if where else str(e), as_json)
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if _user_error(e):  # a function meshwright cannot trace, a pass that refused it
            return _error(command, str(e), as_json)
        if os.environ.get("MESHWRIGHT_TRACEBACK"):
            raise
        return _error(command, f"internal error, {type(e).__name__}: {e} (a bug in "
                      "meshwright; MESHWRIGHT_TRACEBACK=1 shows where)", as_json, code=1)


if __name__ == "__main__":
    sys.exit(main())
