"""int8 weights (`quantize-int8`) vs float32: decode step time at batch 1, bytes, and numerics.

    python benchmarks/int8.py                  # table + benchmarks/results/int8.json
    python benchmarks/int8.py --repeats 50 --skip-numerics

1. Speed. A PaLM-style model big enough that reading the weights dominates a decode step
   (4 parallel layers, d_model 2048, d_ff 8192, 16 heads of 128, multiquery, vocabulary 32000;
   1.2 GB of float32 weights, random), one token at batch 1, layers as a scan and as a Python
   loop. Five programs: the model's own `jax.jit(decode_step)` in float32; the quantized graph
   (attention and FFN projections int8, default layout "auto"); the same with the unembedding
   int8 too; the first with its int8 values stored "as-is" and "contracted-last". Calls are
   interleaved round by round (the machine is shared); the median per program is reported.
2. Numerics. Logit error and top-1 agreement of the tiny reference models (palm, gpt2, llama)
   with random weights, and after a short training run on a synthetic Markov source (two
   likely successors per token, 0.8/0.2), where the logits mean something: a random-init
   model's logits over the vocabulary are nearly flat, so its top-1 is decided by near-ties.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.models import build, get_config
from meshwright.models.config import TransformerConfig
from meshwright.passes import PassManager, get_pass
from meshwright.passes.base import PassContext
from meshwright.passes.quantize import quantize_params

import meshwright as mw

BIG = TransformerConfig(
    name="palm-2048x4", family="palm", n_layers=4, d_model=2048, d_ff=8192, n_heads=16,
    n_kv_heads=1, d_head=128, vocab_size=32000, max_len=256, parallel_block=True,
    norm="layernorm", activation="swiglu", positions="rope", bias=False, tie_embeddings=True,
    scan_layers=True)


def tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def quantized_program(model, args, unembedding: bool, layout: str):
    g = mw.trace(model.decode_step, *args)
    t0 = time.perf_counter()
    g = PassManager(["infer-axes", "find-blocks",
                     get_pass("quantize-int8", unembedding=unembedding, layout=layout,
                              positions=0)], verify=True).run(g)
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    params_q = jax.block_until_ready(quantize_params(g, args[0]))
    convert_s = time.perf_counter() - t0
    return g, params_q, pass_s, convert_s


def logit_errors(reference: np.ndarray, other: np.ndarray) -> dict:
    err = np.abs(reference - other)
    std = float(reference.std())
    return {"max_relative_error": float(err.max()) / std,
            "mean_relative_error": float(err.mean()) / std,
            "top1_agreement": float(np.mean(reference.argmax(-1) == other.argmax(-1)))}


def speed(scan: bool, repeats: int, prompts: int) -> dict:
    config = BIG.replace(scan_layers=scan)
    model = build(config)
    args = jax.block_until_ready(model.example_args("decode", batch=1))  # init is async
    params = args[0]
    programs = {"float32": (jax.jit(model.decode_step), params)}
    info = {"float32": {"weight_bytes": tree_bytes(params)}}
    for name, unembedding, layout in (("int8", False, "auto"),
                                      ("int8+unembedding", True, "auto"),
                                      ("int8, as-is layout", False, "as-is"),
                                      ("int8, contracted-last", False, "contracted-last")):
        g, params_q, pass_s, convert_s = quantized_program(model, args, unembedding, layout)
        report = g.meta["quantize-int8"]
        wb = report.weight_bytes()
        programs[name] = (jax.jit(g.as_function()), params_q)
        info[name] = {"weight_bytes": tree_bytes(params_q), "quantized_float_bytes": wb["float"],
                      "int8_bytes": wb["int8"], "scale_bytes": wb["scales"],
                      "int8_dots": report.int8_dots, "pass_s": pass_s, "convert_s": convert_s}
    rest = args[1:]
    for fn, p in programs.values():  # compile and warm up
        jax.block_until_ready(fn(p, *rest))
    times = {name: [] for name in programs}
    for _ in range(repeats):  # interleaved rounds: a busy machine slows every program alike
        for name, (fn, p) in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, *rest))
            times[name].append(time.perf_counter() - t0)
    for name in programs:
        info[name]["step_ms_median"] = 1e3 * statistics.median(times[name])
        info[name]["step_ms_min"] = 1e3 * min(times[name])
        info[name]["step_ms_p90"] = 1e3 * float(np.percentile(times[name], 90))
    base = info["float32"]["step_ms_median"]
    for name in programs:
        info[name]["speedup_vs_float32"] = base / info[name]["step_ms_median"]
    # Logits on random one-token prompts, against float32; bf16-rounded weights for scale.
    programs["bf16-rounded weights"] = (programs["float32"][0], jax.tree.map(
        lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params))
    logits = {name: [] for name in programs}
    for i in range(prompts):
        tokens = jax.random.randint(jax.random.PRNGKey(i), (1,), 0, config.vocab_size)
        for name, (fn, p) in programs.items():
            logits[name].append(np.asarray(fn(p, tokens, *rest[1:])[0]))
    reference = np.concatenate(logits["float32"])
    errors = {name: logit_errors(reference, np.concatenate(logits[name]))
              for name in programs if name != "float32"}
    return {"layers": "scan" if scan else "loop", "programs": info, "prompts": prompts,
            "logit_errors": errors}


# ---- numerics on the tiny models -------------------------------------------------------------


def markov_batches(vocab: int, batch: int, length: int, seed: int):
    """Token sequences where each token has two likely successors (probability 0.8 / 0.2)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 2))
    while True:
        t = np.empty((batch, length + 1), np.int32)
        t[:, 0] = rng.integers(0, vocab, batch)
        for i in range(length):
            t[:, i + 1] = successors[t[:, i], (rng.random(batch) < 0.2).astype(int)]
        yield jnp.asarray(t[:, :-1]), jnp.asarray(t[:, 1:])


def train(model, steps: int = 300, lr: float = 3e-3, seed: int = 0) -> tuple[dict, float]:
    """Adam on next-token cross-entropy; returns (params, last loss). Floor: 0.50 nats."""
    params = model.init_params(jax.random.PRNGKey(seed))

    def loss(p, x, y):
        logp = jax.nn.log_softmax(model.logits(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    @jax.jit
    def step(p, m, v, i, x, y):
        value, g = jax.value_and_grad(loss)(p, x, y)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
        c1, c2 = 1 - 0.9 ** i, 1 - 0.999 ** i
        p = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), p, m, v)
        return p, m, v, value

    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    data = markov_batches(model.config.vocab_size, 16, 32, seed)
    value = jnp.nan
    for i in range(1, steps + 1):
        params, m, v, value = step(params, m, v, i, *next(data))
    return params, float(value)


def numerics(positions: int, steps: int) -> list[dict]:
    rows = []
    for name in ("palm-tiny", "gpt2-tiny", "llama-tiny"):
        model = build(get_config(name).replace(scan_layers=True))
        trained, final_loss = train(model, steps=steps)
        for weights, params in (("random init", None), (f"trained {steps} steps", trained)):
            for phase in ("decode", "prefill"):
                args = model.example_args(phase, batch=256 if phase == "decode" else 16,
                                          length=16)
                if params is not None:
                    args = (params,) + args[1:]
                for unembedding in (False, True):
                    g = mw.trace(model.fn(phase), *args)
                    g = PassManager(["infer-axes", "find-blocks", get_pass(
                        "quantize-int8", unembedding=unembedding, positions=positions)]).run(
                        g, PassContext(example_args=(args, {})))
                    n = g.meta["quantize-int8"].numerics
                    rows.append({"model": name, "weights": weights, "phase": phase,
                                 "unembedding": unembedding, "positions": n.positions,
                                 "logit_std": n.logit_std,
                                 "max_relative_error": n.max_relative_error,
                                 "mean_relative_error": n.mean_relative_error,
                                 "top1_agreement": n.top1_agreement, "near_ties": n.near_ties,
                                 "train_loss": final_loss if params is not None else None})
                    print(f"  {name:10s} {weights:17s} {phase:7s} unembed={unembedding!s:5s} "
                          f"max {n.max_relative_error:.3f} mean {n.mean_relative_error:.4f} "
                          f"(x logit std {n.logit_std:.2f})  top-1 {100 * n.top1_agreement:.2f}%"
                          f"  near-ties {100 * n.near_ties:.1f}%", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=32, help="one-token prompts, big model")
    ap.add_argument("--positions", type=int, default=2048, help="logit rows per numerics row")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--skip-numerics", action="store_true")
    args = ap.parse_args()

    print(f"decode step, batch 1, {BIG.name}: {BIG.n_layers} layers, d_model {BIG.d_model}, "
          f"d_ff {BIG.d_ff}, vocab {BIG.vocab_size}; {jax.device_count()} CPU device(s), "
          f"median of {args.repeats} interleaved rounds")
    result = {"config": {k: getattr(BIG, k) for k in (
        "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head", "vocab_size")},
        "batch": 1, "repeats": args.repeats, "speed": []}
    print(f"{'layers':6s} {'program':22s} {'weights MB':>10s} {'median ms':>10s} {'min ms':>8s} "
          f"{'p90 ms':>8s} {'vs f32':>7s}")
    for scan in (True, False):
        r = speed(scan, args.repeats, prompts=args.prompts)
        result["speed"].append(r)
        for name, p in r["programs"].items():
            print(f"{r['layers']:6s} {name:22s} {p['weight_bytes'] / 1e6:10.1f} "
                  f"{p['step_ms_median']:10.1f} {p['step_ms_min']:8.1f} {p['step_ms_p90']:8.1f} "
                  f"{p['speedup_vs_float32']:6.2f}x", flush=True)
    r = result["speed"][0]
    for name in ("int8", "int8+unembedding"):
        p = r["programs"][name]
        print(f"{name}: quantized weights {p['quantized_float_bytes'] / 1e6:.1f} MB float32 -> "
              f"{p['int8_bytes'] / 1e6:.1f} MB int8 + {p['scale_bytes'] / 1e6:.2f} MB scales; "
              f"pass {p['pass_s']:.2f} s, load-time conversion {p['convert_s']:.1f} s")
    print(f"logits vs float32 on {r['prompts']} random one-token prompts (random weights; "
          "errors relative to the float32 logits' std):")
    for name, e in r["logit_errors"].items():
        print(f"  {name:22s} max {e['max_relative_error']:.3f}  mean "
              f"{e['mean_relative_error']:.4f}  top-1 {100 * e['top1_agreement']:.1f}%")
    if not args.skip_numerics:
        print(f"\nnumerics, tiny models, {args.positions} logit rows each "
              "(errors relative to the float32 logits' std)")
        result["numerics"] = numerics(args.positions, args.train_steps)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int8.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
