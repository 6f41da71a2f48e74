"""meshwright's serving engine against Hugging Face transformers' `generate`, side by side, on
the same random-init checkpoints, in the same run.

    python benchmarks/vs_transformers.py                  # the issue's rows + GPT-2 124M shape
                                                          #   at batch 1, 8, 32 (--cases issue)
    python benchmarks/vs_transformers.py --cases sweep --batches 1,8,32
    python benchmarks/vs_transformers.py --cases gpt2-tiny --batches 1,16 --new-tokens 128
    python benchmarks/vs_transformers.py --quick          # smoke run: tiny models, batch 1 and 2,
                                                          #   8 new tokens, one repeat, no JSON

Checkpoints (random init, seed `--seed`, float32, written with `save_pretrained` to a temporary
directory; weights std 0.1 instead of 0.02 and every norm weight and bias perturbed by
0.1 * N(0, 1), so greedy decoding does not collapse into ties; no bos/eos/pad, so both engines
generate exactly the number of new tokens asked for):
- gpt2-small-shape: GPT2Config defaults (12 layers, n_embd 768, 12 heads, vocab 50257,
  n_positions 1024): the GPT-2 124M shape;
- gpt2-tiny: GPT-2 with 4 layers, n_embd 256, 4 heads, vocab 1024, n_positions 1024;
- llama-gqa: Llama with 8 layers, hidden 512, 8 heads of 64, 2 key/value heads,
  intermediate 1408, vocab 1024 (`--llama-vocab 32000` for Llama's own), 1024 positions;
- llama-tiny (for --quick): 2 layers, hidden 128, 4 heads, 2 key/value heads, intermediate 352.

Per row (case, batch, new tokens), with `--prompt-len` random prompt tokens per sequence (the
same prompts for both engines):
- transformers: `AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`, then
  `model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)` under
  `torch.inference_mode()`, torch's default thread count;
- meshwright: `models.from_pretrained(dir, max_len=M)` and `Engine(build(config), params,
  max_slots=batch, max_len=M, progress=False)`, built once per row (its compilation is the
  start-up time, never timed with generation), then `engine.generate(prompts, max_tokens=N)`.
  M (`--max-len`): "fit" (default) is prompt + N rounded up to a multiple of 64, "checkpoint"
  the checkpoint's positions (1024), or a number.
- `--warmup` untimed calls of each (the first one's time is in the JSON as `first_call_s`),
  then `--repeats` timed calls alternating meshwright, transformers, meshwright, ...; medians.
  tok/s = batch * N / wall seconds of the whole call (prefill included); mw/hf = meshwright /
  transformers tok/s, `issue` the same ratio as the issue reported it; `equal` is the share of
  generated tokens that are the same in both (float32 both, so a difference is a near-tie
  decided the other way, after which the two sequences go separate ways).
- Per-step time (call seconds / N) against a roofline measured in this run: the larger of
  (weight bytes + live KV bytes) / read bandwidth and FLOPs / matmul rate, for one decode step
  at the average context of the generated tokens (prompt + (N - 1) / 2). Weight bytes: every
  parameter a step reads in full (embedding tables only when they are the output head);
  live KV bytes = 2 * layers * kv_heads * head_dim * 4 bytes * batch * context; FLOPs =
  2 * batch * matmul weights + 4 * batch * layers * heads * head_dim * context. Bandwidth: a
  jitted sum over a `--bandwidth-mb` float32 array; matmul rate: a jitted float32
  `--matmul-n`^3 matmul; best of several each. The JSON also has the roofline of the whole
  call per token (a prefill of the prompt, then N - 1 decode steps).

Writes benchmarks/results/vs_transformers.json (`--out`) with the machine (CPUs, versions,
torch's threads). The engines run one after the other on the same cores; another process
running meanwhile skews both, so the cores other processes keep busy are sampled (from
/proc/stat) at the start and after each row (`other_cores_busy`), and a note is printed when
they are busy at the start. Expect +-10-20% run to run even on a quiet machine.
torch and transformers are the `test` extra: imported here, never by meshwright.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "vs_transformers.json"
F32 = 4  # bytes


@dataclass(frozen=True)
class Case:
    family: str  # "gpt2" or "llama"
    fields: dict  # config fields on top of the family's defaults
    new_tokens: int  # default new tokens
    label: str

    def hf_config(self, llama_vocab: int):
        import transformers

        common = {"initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None,
                  "pad_token_id": None}
        if self.family == "gpt2":
            return transformers.GPT2Config(**self.fields, **common)
        return transformers.LlamaConfig(**{"vocab_size": llama_vocab, **self.fields}, **common)


CASES = {
    "gpt2-tiny": Case("gpt2", {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 1024,
                               "n_positions": 1024}, 128, "GPT-2 E256 L4"),
    "gpt2-small-shape": Case("gpt2", {}, 32, "GPT-2 124M shape"),
    "llama-gqa": Case("llama", {"num_hidden_layers": 8, "hidden_size": 512,
                                "num_attention_heads": 8, "num_key_value_heads": 2,
                                "intermediate_size": 1408, "max_position_embeddings": 1024},
                      64, "Llama 8 heads / 2 KV heads, E512 L8"),
    "llama-tiny": Case("llama", {"num_hidden_layers": 2, "hidden_size": 128,
                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "intermediate_size": 352, "max_position_embeddings": 1024},
                       8, "Llama 4 heads / 2 KV heads, E128 L2"),
}

# The rows of the issue that motivates this benchmark: (case, batch, new tokens, meshwright
# tok/s, transformers tok/s) as reported there.
ISSUE_ROWS = [
    ("gpt2-tiny", 1, 128, 597, 583),
    ("gpt2-tiny", 16, 128, 826, 3411),
    ("gpt2-small-shape", 1, 32, 27, 41),
    ("gpt2-small-shape", 8, 32, 43, 137),
    ("llama-gqa", 16, 64, 280, 764),
]


@dataclass
class Row:
    case: str
    batch: int
    new_tokens: int
    issue: dict | None = None  # the issue's figures for this row
    out: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# This machine


def measure_read_bandwidth(megabytes: int, repeats: int) -> dict:
    """Bytes per second of a jitted sum over a float32 array (every byte read once): best."""
    n = megabytes * 2**20 // F32
    x = jnp.ones((n,), jnp.float32).block_until_ready()
    total = jax.jit(jnp.sum)
    best = _best(total, (x,), repeats)
    del x
    return {"bytes_per_s": n * F32 / best, "seconds": best, "bytes": n * F32,
            "method": f"jitted jnp.sum over {megabytes} MiB float32, best of {repeats}"}


def measure_matmul_rate(n: int, repeats: int) -> dict:
    """FLOPs per second of a jitted float32 (n, n) @ (n, n) matmul: best."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    best = _best(jax.jit(jnp.matmul), (a, b), repeats)
    return {"flops_per_s": 2 * n**3 / best, "seconds": best, "flops": 2 * n**3,
            "method": f"jitted float32 {n}x{n} @ {n}x{n}, best of {repeats}"}


def _best(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def others_busy(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes, from /proc/stat over `seconds` while this one
    sleeps (None where there is no /proc/stat)."""
    def busy_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = \
                map(int, f.readline().split()[1:9])
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    try:
        b0, t0 = busy_total()
        time.sleep(seconds)
        b1, t1 = busy_total()
    except (OSError, ValueError):
        return None
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def machine_info() -> dict:
    import torch
    import transformers

    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_devices": str(jax.devices()),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "other_cores_busy": others_busy()}


# ---------------------------------------------------------------------------------------------
# Checkpoints and the two engines


def save_checkpoint(case: Case, directory: Path, seed: int, llama_vocab: int) -> None:
    """A random-init float32 checkpoint of `case`, written with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        case.hf_config(llama_vocab)).float().eval()
    with torch.no_grad():  # norms and biases away from 1 and 0
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(directory)


def load_transformers(directory: Path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0  # never used: no eos, prompts of equal length
    return model


def transformers_generate(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[:, prompts.shape[1]:].numpy()


def meshwright_generate(engine, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    results = engine.generate([list(map(int, p)) for p in prompts], max_tokens=new_tokens)
    for r in results:
        if not r.ok or len(r.tokens) != new_tokens:
            raise RuntimeError(f"meshwright request {r.request_id}: {r.finish_reason} "
                               f"({r.error or len(r.tokens)} tokens)")
    return np.array([r.tokens for r in results])


def shape_of(hf_model) -> dict:
    """Layers, heads, KV heads, head size, and the weights a decode step reads in full (bytes,
    and the elements of its matrices), from the transformers model."""
    import torch

    c = hf_model.config
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    head = hf_model.get_output_embeddings().weight
    # an embedding table is only gathered from, unless it is also the output head (tied)
    gathered = {id(m.weight) for m in hf_model.modules()
                if isinstance(m, torch.nn.Embedding) and m.weight is not head}
    read = {id(p): p for p in hf_model.parameters() if id(p) not in gathered}
    read[id(head)] = head
    return {"layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "params": sum(p.numel() for p in hf_model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in read.values()),
            "matmul_weights": sum(p.numel() for p in read.values() if p.ndim == 2)}


def roofline(shape: dict, batch: int, context: float, tokens: int, bw: float, rate: float,
             kv_positions: float | None = None) -> dict:
    """The least time a step over `tokens` new tokens per row, each attending to `context`
    positions on average, can take here: max(bytes / bandwidth, FLOPs / matmul rate). The
    KV bytes are those of `kv_positions` positions per row (default `context`)."""
    kv_per_position = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * F32
    kv_bytes = kv_per_position * batch * (context if kv_positions is None else kv_positions)
    flops = (2 * batch * tokens * shape["matmul_weights"]
             + 4 * batch * tokens * shape["layers"] * shape["heads"] * shape["head_dim"]
             * context)
    byte_s, flop_s = (shape["weight_bytes"] + kv_bytes) / bw, flops / rate
    return {"seconds": max(byte_s, flop_s), "bytes_s": byte_s, "flops_s": flop_s,
            "live_kv_bytes": kv_bytes, "flops": flops,
            "bound": "memory" if byte_s >= flop_s else "compute"}


def max_len_for(spec: str, prompt_len: int, new_tokens: int, checkpoint_len: int) -> int:
    if spec == "fit":
        return min(-(-(prompt_len + new_tokens) // 64) * 64, checkpoint_len)
    if spec == "checkpoint":
        return checkpoint_len
    return int(spec)


# ---------------------------------------------------------------------------------------------
# One row


def run_row(row: Row, directory: Path, hf_model, args, bw: float, rate: float) -> dict:
    from meshwright.models import build, from_pretrained
    from meshwright.runtime import Engine

    b, n, t = row.batch, row.new_tokens, args.prompt_len
    checkpoint_len = hf_model.config.max_position_embeddings
    max_len = max_len_for(args.max_len, t, n, checkpoint_len)
    rng = np.random.default_rng([args.seed, b, t])
    prompts = rng.integers(0, hf_model.config.vocab_size, (b, t)).astype(np.int32)

    t0 = time.perf_counter()
    config, params = from_pretrained(directory, max_len=max_len, scan_layers=args.scan_layers)
    t1 = time.perf_counter()
    engine = Engine(build(config), params, max_slots=b, max_len=max_len, progress=False)
    t2 = time.perf_counter()

    runs = {"meshwright": lambda e=engine: meshwright_generate(e, prompts, n),
            "transformers": lambda: transformers_generate(hf_model, prompts, n)}
    if args.int8:  # the same checkpoint with int8 weights (the paper's decode setting)
        int8 = Engine(build(config), params, max_slots=b, max_len=max_len, progress=False,
                      weights="int8")
        runs["meshwright-int8"] = lambda e=int8: meshwright_generate(e, prompts, n)
    first: dict[str, float] = {}  # the first call's seconds: whatever compiles on first use
    for _ in range(args.warmup):
        for name, fn in runs.items():
            s = time.perf_counter()
            fn()
            first.setdefault(name, time.perf_counter() - s)
    times: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # A B A B
        for name, fn in runs.items():
            s = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - s)
    del runs, engine, params  # free this row's KV cache and weights before the next row
    if args.int8:
        del int8

    shape = shape_of(hf_model)
    step = roofline(shape, b, t + (n - 1) / 2, 1, bw, rate)
    whole = roofline(shape, b, (t + 1) / 2, t, bw, rate, kv_positions=t)["seconds"]  # prefill
    whole += sum(roofline(shape, b, t + i, 1, bw, rate)["seconds"] for i in range(1, n))
    equal = tokens["meshwright"] == tokens["transformers"]
    differs = np.flatnonzero(~equal.all(axis=0))
    out = {"case": row.case, "label": CASES[row.case].label, "batch": b, "new_tokens": n,
           "prompt_len": t, "max_len": max_len, "scan_layers": args.scan_layers,
           "params": shape["params"], "weight_bytes_per_step": shape["weight_bytes"],
           "equal_token_share": float(equal.mean()),
           "rows_identical": int(equal.all(axis=1).sum()),
           "first_difference": int(differs[0]) if differs.size else None,
           "roofline_step_s": step["seconds"], "roofline_bound": step["bound"],
           "roofline_step_bytes_s": step["bytes_s"], "roofline_step_flops_s": step["flops_s"],
           "live_kv_bytes_per_step": step["live_kv_bytes"], "flops_per_step": step["flops"],
           "roofline_per_token_incl_prefill_s": whole / n,
           "meshwright_load_s": t1 - t0, "meshwright_compile_s": t2 - t1}
    for name, seconds in times.items():
        med = statistics.median(seconds)
        out[name] = {"seconds": seconds, "median_s": med, "tokens_per_s": b * n / med,
                     "step_s": med / n, "fraction_of_roofline": step["seconds"] / (med / n),
                     "first_call_s": first.get(name)}
    out["ratio"] = out["meshwright"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    if args.int8:
        q = tokens["meshwright-int8"] == tokens["meshwright"]
        out["int8"] = {"ratio": out["meshwright-int8"]["tokens_per_s"]
                       / out["transformers"]["tokens_per_s"],
                       "vs_float32": out["meshwright-int8"]["tokens_per_s"]
                       / out["meshwright"]["tokens_per_s"],
                       "equal_token_share": float(q.mean()),
                       "rows_identical": int(q.all(axis=1).sum()),
                       # greedy rows diverge for good after their first different token
                       "equal_before_first_difference": float(np.mean(
                           [np.argmin(r) if not r.all() else len(r) for r in q]) / n)}
    if row.issue:
        out["issue"] = {**row.issue, "ratio": row.issue["meshwright_tok_s"]
                        / row.issue["transformers_tok_s"]}
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def plan_rows(args) -> list[Row]:
    batches = [int(x) for x in args.batches.split(",")]

    def n_for(case: str, default: int | None = None) -> int:
        return args.new_tokens or default or CASES[case].new_tokens

    if args.cases == "issue":
        rows = [Row(c, b, n_for(c, n), {"meshwright_tok_s": mw, "transformers_tok_s": hf})
                for c, b, n, mw, hf in ISSUE_ROWS]
        rows += [Row("gpt2-small-shape", b, n_for("gpt2-small-shape")) for b in batches
                 if not any(r.case == "gpt2-small-shape" and r.batch == b for r in rows)]
        return rows
    names = ["gpt2-tiny", "gpt2-small-shape", "llama-gqa"] if args.cases == "sweep" \
        else args.cases.split(",")
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: issue, sweep, {', '.join(CASES)}")
    return [Row(c, b, n_for(c)) for c in names for b in batches]


HEADER = (f"{'case':17} {'batch':>5} {'new':>4} {'mw tok/s':>9} {'hf tok/s':>9} {'mw/hf':>6} "
          f"{'issue':>6} {'mw ms/st':>9} {'hf ms/st':>9} {'roof ms':>8} {'bound':>6} "
          f"{'mw/roof':>7} {'hf/roof':>7} {'equal':>6} {'mw start s':>10}")


def format_row(r: dict) -> str:
    mw, hf = r["meshwright"], r["transformers"]
    issue = f"{r['issue']['ratio']:5.2f}x" if "issue" in r else f"{'-':>6}"
    return (f"{r['case']:17} {r['batch']:5d} {r['new_tokens']:4d} {mw['tokens_per_s']:9.1f} "
            f"{hf['tokens_per_s']:9.1f} {r['ratio']:5.2f}x {issue} {mw['step_s'] * 1e3:9.2f} "
            f"{hf['step_s'] * 1e3:9.2f} {r['roofline_step_s'] * 1e3:8.2f} "
            f"{r['roofline_bound'][:3]:>6} {mw['step_s'] / r['roofline_step_s']:6.1f}x "
            f"{hf['step_s'] / r['roofline_step_s']:6.1f}x {r['equal_token_share']:6.0%} "
            f"{r['meshwright_load_s'] + r['meshwright_compile_s']:10.1f}"
            + (f"   int8 {r['meshwright-int8']['tokens_per_s']:7.1f} tok/s "
               f"{r['int8']['ratio']:5.2f}x hf, {r['int8']['vs_float32']:4.2f}x fp32, "
               f"{r['int8']['equal_token_share']:4.0%} tokens as fp32 "
               f"({r['int8']['rows_identical']}/{r['batch']} rows identical)"
               if "int8" in r else ""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="issue (default: the issue's rows plus gpt2-small-shape at "
                   "every --batches), sweep (every case at every --batches), or a comma list "
                   f"of {', '.join(CASES)}")
    p.add_argument("--batches", help="comma list of batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, help="new tokens for every row (default: the "
                   "issue row's, else the case's: gpt2-tiny 128, gpt2-small-shape 32, "
                   "llama-gqa 64)")
    p.add_argument("--repeats", type=int, help="timed calls per engine (default 3)")
    p.add_argument("--warmup", type=int, help="untimed calls per engine first (default 2: "
                   "torch's first two generate calls are slow; --quick 1)")
    p.add_argument("--max-len", default="fit", help="meshwright's KV length: fit (prompt + new "
                   "rounded up to a multiple of 64), checkpoint (its positions), or a number")
    p.add_argument("--llama-vocab", type=int, default=1024, help="llama cases' vocabulary")
    p.add_argument("--scan-layers", action="store_true",
                   help="meshwright: layers stacked under one jax.lax.scan (default: a loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth-mb", type=int, help="array of the bandwidth probe (default 512)")
    p.add_argument("--matmul-n", type=int, help="size of the matmul probe (default 2048)")
    p.add_argument("--out", help=f"JSON output (default {RESULTS.parent.name}/{RESULTS.name}; "
                   "with --quick none unless given)")
    p.add_argument("--int8", action="store_true",
                   help="also meshwright with int8 weights (Engine(weights='int8')): tokens/s "
                        "and the share of greedy tokens equal to float32")
    p.add_argument("--quick", action="store_true", help="smoke run: gpt2-tiny and llama-tiny, "
                   "batch 1 and 2, 8 new tokens, one repeat, small probes, no JSON")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"cases": ("gpt2-tiny,llama-tiny", "issue"), "batches": ("1,2", "1,8,32"),
                "new_tokens": (8, None), "repeats": (1, 3), "warmup": (1, 2),
                "bandwidth_mb": (64, 512), "matmul_n": (1024, 2048),
                "out": (None, str(RESULTS))}  # (--quick, otherwise), unless given
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    return args


def run(args) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    rows = plan_rows(args)
    probes = 3 if args.quick else 10
    bandwidth = measure_read_bandwidth(args.bandwidth_mb, probes)
    matmul = measure_matmul_rate(args.matmul_n, probes)
    bw, rate = bandwidth["bytes_per_s"], matmul["flops_per_s"]
    info = machine_info()
    print(f"{info['cpus']} CPUs, jax {info['jax']}, torch {info['torch']} "
          f"({info['torch_threads']} threads), transformers {info['transformers']}; "
          f"read bandwidth {bw / 1e9:.1f} GB/s, float32 matmul {rate / 1e9:.0f} GFLOP/s; "
          f"other processes busy {info['other_cores_busy'] or 0:.1f} cores")
    if (info["other_cores_busy"] or 0) > 0.25:
        print(f"note: other processes keep {info['other_cores_busy']:.1f} cores busy; both "
              "engines' timings suffer, torch's (every op split over its threads) possibly by "
              "far more")
    print(f"prompts {args.prompt_len} tokens; medians of {args.repeats} alternating calls; "
          "mw = meshwright, hf = transformers; ms/st = call time / new tokens; roof = one "
          "decode step's roofline; mw/roof, hf/roof = ms/st over it; equal = share of the same "
          "tokens; mw start = load + compile")
    print(HEADER)
    print("-" * len(HEADER))
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in dict.fromkeys(r.case for r in rows):
            directory = Path(tmp) / case
            save_checkpoint(CASES[case], directory, args.seed, args.llama_vocab)
            t0 = time.perf_counter()
            hf_model = load_transformers(directory)
            hf_load = time.perf_counter() - t0
            for row in (r for r in rows if r.case == case):
                out = run_row(row, directory, hf_model, args, bw, rate)
                out["transformers_load_s"] = hf_load
                out["other_cores_busy_after"] = others_busy()
                done.append(out)
                print(format_row(out), flush=True)
            del hf_model
    result = {"statistic": "median", "repeats": args.repeats, "warmup": args.warmup,
              "prompt_len": args.prompt_len, "max_len": args.max_len, "seed": args.seed,
              "llama_vocab": args.llama_vocab, "quick": args.quick, "machine": info,
              "read_bandwidth": bandwidth, "matmul": matmul,
              "cases": {name: {"family": CASES[name].family, "label": CASES[name].label,
                               "config": CASES[name].fields}
                        for name in dict.fromkeys(r["case"] for r in done)},
              "rows": done}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return result


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
