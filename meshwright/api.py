"""The public face of meshwright: thin functions over the library packages."""

from __future__ import annotations

from typing import Any, Callable

from meshwright.ir import Graph
from meshwright.ir import trace as _trace


def trace(fn: Callable, *example_args: Any, **example_kwargs: Any) -> Graph:
    """Trace `fn` into a `meshwright.ir.Graph`; `g(*args)` then equals `fn(*args)`.

        >>> import jax.numpy as jnp, meshwright as mw
        >>> g = mw.trace(lambda x: jnp.sin(x) * 2, jnp.ones(3))
        >>> print(g)
        graph(%x:f32[3]) {
          %0:f32[3] = sin %x
          %1:f32[3] = mul %0 2.0:f32[]
          return %1
        }
    """
    return _trace(fn, *example_args, **example_kwargs)


def trace_model(config, phase: str = "decode", batch: int = 2, length: int = 8,
                seed: int = 0) -> Graph:
    """Trace a bundled reference model's prefill or decode step for a config."""
    import jax

    from meshwright.models import build

    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    model = build(config)
    args = model.example_args(phase, batch=batch, length=length, key=jax.random.PRNGKey(seed))
    return _trace(model.fn(phase), *args)
