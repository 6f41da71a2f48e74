"""Train the bundled demo model (`meshwright.models.load_demo_model`) from scratch.

    python models/train_demo.py        # 2000 steps: 25-35 minutes on 2 CPU cores; writes the weights
    python models/train_demo.py --steps 400 --out m.safetensors  # a shorter, weaker run

A byte-level PaLM-style decoder (`models/demo.py: DEMO_CONFIG`: 4 parallel blocks,
multiquery attention, SwiGLU, RoPE, tied embeddings) learns next-byte prediction on the
King James Bible excerpt in `models/data/kjv_excerpt.txt` (public domain; see
`models/data/README.md`). Every 25th chapter is held out for evaluation.

Plain JAX, no optimiser library: AdamW written out below (bias-corrected moments,
decoupled weight decay on matrices), global-norm gradient clipping, linear warm-up then
cosine decay. Seeded: the same seed, steps and JAX version give the same weights on CPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.models.demo import DEMO_CONFIG, WEIGHTS_PATH, demo_text, save_demo_model
from meshwright.models.registry import build


def batches(data: np.ndarray, batch: int, length: int, seed: int):
    """Endless random windows: (tokens (B, T), targets (B, T)) cut from `data` (uint8)."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, len(data) - length - 1, size=batch)
        window = np.stack([data[s:s + length + 1] for s in start]).astype(np.int32)  # (B, T+1)
        yield window[:, :-1], window[:, 1:]


def loss_fn(model, params, tokens, targets):
    """Mean next-byte cross-entropy (nats) and accuracy over (B, T)."""
    logits = model.logits(params, tokens)  # (B, T, V)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, T, V)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
    return jnp.mean(nll), acc


def adamw_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "t": jnp.zeros((), jnp.int32)}


def adamw_update(params, grads, state, lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1):
    """One AdamW step. Weight decay only on matrices (ndim >= 2), not on norm scales."""
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections

    def step(p, m, v):
        decay = weight_decay * p if p.ndim >= 2 else 0.0
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + decay)

    return jax.tree.map(step, params, m, v), {"m": m, "v": v, "t": t}


def clip_by_global_norm(grads, max_norm: float):
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, params, data: np.ndarray, length: int, batch: int = 16) -> tuple[float, float]:
    """Loss and next-byte accuracy over consecutive windows covering `data`."""
    n = (len(data) - 1) // length
    tokens = data[:n * length].reshape(n, length).astype(np.int32)
    targets = data[1:n * length + 1].reshape(n, length).astype(np.int32)
    fn = jax.jit(functools.partial(loss_fn, model))
    losses, accs = [], []
    for i in range(0, n - batch + 1, batch):  # whole batches: one compiled shape
        loss, acc = fn(params, tokens[i:i + batch], targets[i:i + batch])
        losses.append(float(loss))
        accs.append(float(acc))
    return float(np.mean(losses)), float(np.mean(accs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=DEMO_CONFIG.max_len, help="window, bytes")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--out", default=WEIGHTS_PATH, help="where to write the weights")
    args = p.parse_args(argv)

    config = DEMO_CONFIG
    model = build(config)
    train = np.frombuffer(demo_text("train").encode(), np.uint8)
    heldout = np.frombuffer(demo_text("heldout").encode(), np.uint8)
    print(f"{config.name}: {config.n_params() / 1e6:.2f}M params; train {len(train):,} bytes, "
          f"held out {len(heldout):,} bytes; {args.steps} steps of {args.batch}x{args.length}")

    params = model.init_params(jax.random.PRNGKey(args.seed))
    opt = adamw_init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt, tokens, targets, lr):
        (loss, acc), grads = jax.value_and_grad(
            lambda p: loss_fn(model, p, tokens, targets), has_aux=True)(params)
        grads, norm = clip_by_global_norm(grads, 1.0)
        params, opt = adamw_update(params, grads, opt, lr)
        return params, opt, loss, acc, norm

    data = batches(train, args.batch, args.length, args.seed)
    t0 = time.perf_counter()
    history = []
    for step in range(args.steps):
        tokens, targets = next(data)
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        params, opt, loss, acc, norm = train_step(params, opt, tokens, targets, lr)
        if step % 50 == 0 or step == args.steps - 1:
            loss = float(loss)
            history.append((step, loss))
            print(f"step {step:5d}  loss {loss:.3f}  acc {float(acc):.3f}  "
                  f"grad-norm {float(norm):.2f}  lr {lr:.2e}  {time.perf_counter() - t0:6.1f}s",
                  flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            h_loss, h_acc = evaluate(model, params, heldout, args.length)
            print(f"          held-out loss {h_loss:.3f}  acc {h_acc:.3f}", flush=True)
    seconds = time.perf_counter() - t0
    train_loss, train_acc = evaluate(model, params, train[:len(heldout)], args.length)
    h_loss, h_acc = evaluate(model, params, heldout, args.length)
    print(f"done in {seconds:.0f}s: train loss {train_loss:.3f} acc {train_acc:.3f}; "
          f"held-out loss {h_loss:.3f} acc {h_acc:.3f} "
          f"({h_loss / math.log(2):.2f} bits/byte)")
    save_demo_model(config, params, args.out, metadata={
        "trained_by": "models/train_demo.py", "steps": str(args.steps),
        "batch": str(args.batch), "length": str(args.length), "lr": str(args.lr),
        "seed": str(args.seed), "seconds": f"{seconds:.0f}", "jax": jax.__version__,
        "final_train_loss": f"{history[-1][1]:.4f}", "heldout_loss": f"{h_loss:.4f}",
        "heldout_accuracy": f"{h_acc:.4f}"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
