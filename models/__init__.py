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
from meshwright.models.registry import FAMILIES, Model, build

__all__ = ["DEFAULT_MODEL", "FAMILIES", "PRESETS", "Model", "TransformerConfig", "build",
           "get_config"]
