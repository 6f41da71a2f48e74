"""Reference Transformers in plain JAX, their configs and presets.

    >>> import jax
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("llama-tiny"))
    >>> params, tokens, cache = model.example_args("prefill", batch=2, length=8)
    >>> logits, cache = jax.jit(model.prefill)(params, tokens, cache)
    >>> logits.shape
    (2, 8, 256)
"""

from meshwright.models.config import DEFAULT_MODEL, PRESETS, TransformerConfig, get_config

# The implementations import JAX; they load on first use, so the planner (configs only)
# answers without initialising JAX.
_LAZY = {"FAMILIES": "meshwright.models.registry", "Model": "meshwright.models.registry",
         "build": "meshwright.models.registry"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meshwright.models' has no attribute {name!r}")


__all__ = ["DEFAULT_MODEL", "FAMILIES", "PRESETS", "Model", "TransformerConfig", "build",
           "get_config"]
