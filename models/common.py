"""Pieces shared by the reference models: config checks, weight init, the loop/scan over layers.

The three model files differ in style on purpose (matmul, einsum, dot + reshapes); only what has
nothing to do with style lives here.

    >>> import jax, jax.numpy as jnp
    >>> from meshwright.models.common import run_layers
    >>> layers = [{"w": jnp.float32(2.0)}, {"w": jnp.float32(3.0)}]
    >>> x, _ = run_layers(layers, jnp.ones(2), None, lambda p, x, c: (x * p["w"], c), scan=False)
    >>> x.tolist()
    [6.0, 6.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from meshwright.models.config import TransformerConfig

INIT_STD = 0.02  # standard deviation of every weight matrix and embedding at init

# layer_fn(layer_params, x, layer_cache) -> (x, layer_cache); layer_cache is {"k", "v"} or None
LayerFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def check_family(config: TransformerConfig, family: str, **required: Any) -> None:
    """Raise a ValueError naming every config field that this family's implementation ignores."""
    wrong = [f"{name}={getattr(config, name)!r} (needs {value!r})"
             for name, value in required.items() if getattr(config, name) != value]
    if wrong:
        raise ValueError(
            f"config {config.name!r} does not fit the {family!r} reference model: "
            + "; ".join(wrong) + ". Change those fields or pick another family "
            "(gpt2: serial/layernorm/gelu/learned; palm: parallel/layernorm/swiglu/rope/tied; "
            "llama: serial/rmsnorm/swiglu/rope/untied, no biases).")


def check_prompt(config: TransformerConfig, tokens: jax.Array) -> None:
    """Prompts are int (B, T) with 1 <= T <= max_len (shapes are static, so this runs at trace)."""
    if tokens.ndim != 2:
        raise ValueError(f"prompt tokens must be (batch, length), got shape {tokens.shape}")
    if not 1 <= tokens.shape[1] <= config.max_len:
        raise ValueError(
            f"prompt length {tokens.shape[1]} must be between 1 and max_len={config.max_len}")


def check_decode(tokens: jax.Array, positions: jax.Array) -> None:
    """Decode takes one token and one position per row: both (B,)."""
    if tokens.ndim != 1 or positions.shape != tokens.shape:
        raise ValueError(f"decode_step takes tokens (B,) and positions (B,), got "
                         f"{tokens.shape} and {positions.shape}")


def normals(key: jax.Array, shapes: dict[str, tuple[int, ...]], dtype: Any) -> dict[str, jax.Array]:
    """N(0, INIT_STD) arrays of the given shapes, cut in order from ONE float32 draw, then cast.

    One draw is one PRNG program: with one `jax.random.normal` per weight, compiling the
    initialiser took seconds on CPU (each call site inlines its own threefry).
    """
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = INIT_STD * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes, strict=True):
        out[name] = flat[start:start + size].reshape(shape).astype(dtype)
        start += size
    return out


def rope_inv_freq(config: TransformerConfig, d_head: int) -> jax.Array:
    """RoPE inverse frequencies (d_head/2,) float32, scaled as `config.rope_scaling` says.

    The same numbers as Hugging Face's `ROPE_INIT_FUNCTIONS` for rope_type default, "linear"
    and "llama3" (Llama 3.1: low frequencies / factor, high ones kept, a linear ramp between).
    """
    inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, d_head, 2, dtype=jnp.float32) / d_head)
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":
        return inv_freq / factor
    if config.rope_scaling == "llama3":
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq  # (d_head/2,)
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)  # 0 at the ramp's low end, 1 at its top
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def layers_for(config: TransformerConfig, stacked: dict) -> dict | list[dict]:
    """Stacked per-layer params for `scan_layers`, else the same numbers as a list of dicts."""
    if config.scan_layers:
        return stacked
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(config.n_layers)]


def run_layers(layers: dict | list[dict], x: jax.Array, cache: dict | None, layer_fn: LayerFn,
               *, scan: bool) -> tuple[jax.Array, dict | None]:
    """Run every layer over the residual stream `x`, threading each layer's slice of the cache.

    `cache` is None or laid out as `models.cache` says: {"k": [one array per layer], "v": [...]}
    for a Python loop over `layers` (a list), stacked (n_layers, ...) arrays for a scan (then
    `layers` is one dict of stacked arrays, and the cache slices are the scan's xs and ys).
    """
    if scan:
        def body(x, xs):
            layer, layer_cache = xs
            return layer_fn(layer, x, layer_cache)

        return jax.lax.scan(body, x, (layers, cache))

    new = None if cache is None else {name: [] for name in cache}
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else {name: c[i] for name, c in cache.items()}
        x, layer_cache = layer_fn(layer, x, layer_cache)
        if new is not None:
            for name in new:
                new[name].append(layer_cache[name])
    return x, new


def at_positions(x: jax.Array, last: jax.Array) -> jax.Array:
    """x[b, last[b]] for x (B, T, E) -> (B, E), as a one-hot contraction: a matmul with the row
    as batch dimension, which the compiler shards like any other (an indexed gather over the
    batch would run replicated). Exact: every other term is a product with 0."""
    hot = (jnp.arange(x.shape[1])[None, :] == last[:, None]).astype(x.dtype)  # (B, T)
    return jnp.einsum("bt,bte->be", hot, x)  # (B, E)


def logits_from_table(x: jax.Array, table: jax.Array) -> jax.Array:
    """x (N, E) against a (V, E) table (a tied embedding: vocabulary rows) -> logits (N, V).

    Computed as table @ x.T, (V, N), then transposed: XLA's CPU matmul reads a (V, E) table
    twice as fast as the left operand as it reads it transposed on the right for small N (the
    decode batch), and the optimization barrier keeps XLA from folding the transpose back
    into the matmul. The transpose itself moves N x V floats, not the table.
    """
    out = jnp.einsum("ve,ne->vn", table, x)  # (V, N)
    return jax.lax.optimization_barrier(out).T  # (N, V)
