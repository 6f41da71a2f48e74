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

    `cache` is None or {"k": (n_layers, ...), "v": (n_layers, ...)}. With `scan`, `layers` is one
    dict of stacked arrays and the layers run as `jax.lax.scan` (cache slices are its xs and ys);
    otherwise `layers` is a list and the layers run as a Python loop.
    """
    if scan:
        def body(x, xs):
            layer, layer_cache = xs
            return layer_fn(layer, x, layer_cache)

        return jax.lax.scan(body, x, (layers, cache))

    new_slices = []
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else {name: c[i] for name, c in cache.items()}
        x, layer_cache = layer_fn(layer, x, layer_cache)
        new_slices.append(layer_cache)
    if cache is None:
        return x, None
    return x, {name: jnp.stack([s[name] for s in new_slices]) for name in cache}
