"""Reference Transformers in plain JAX, their configs and presets."""

from meshwright.models.config import DEFAULT_MODEL, PRESETS, TransformerConfig, get_config

__all__ = ["DEFAULT_MODEL", "PRESETS", "TransformerConfig", "get_config"]
