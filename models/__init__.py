"""Reference Transformers in plain JAX, their configs and presets, and checkpoint loaders.

    >>> import jax
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("llama-tiny"))
    >>> params, tokens, cache = model.example_args("prefill", batch=2, length=8)
    >>> logits, cache = jax.jit(model.prefill)(params, tokens, cache)
    >>> logits.shape
    (2, 8, 256)

Hugging Face checkpoints (see meshwright.models.hf and docs/checkpoints.md):

    config, params = meshwright.models.from_pretrained("path/to/dir", mesh=None)
    logits = meshwright.models.logits(config, params, tokens)

Your own model, served by the engine (see meshwright.models.functions and docs/serving.md):

    model = meshwright.models.from_functions(prefill=..., decode_step=..., init_cache=...,
                                             vocab_size=32000, max_len=2048)

The bundled demo model (byte-level, trained on the King James Bible; see models/demo.py):

    config, params = meshwright.models.load_demo_model()
"""

from meshwright.models.config import DEFAULT_MODEL, PRESETS, TransformerConfig, get_config
from meshwright.models.demo import load_demo_model
from meshwright.models.functions import FunctionModel, ModelContractError, from_functions
from meshwright.models.hf import (
    CheckpointError,
    from_pretrained,
    load_config,
    load_tokenizer,
    split_largest_axis,
)
from meshwright.models.registry import (
    FAMILIES,
    Model,
    build,
    logits,
    param_shapes,
    unroll_layers,
)

__all__ = ["DEFAULT_MODEL", "FAMILIES", "PRESETS", "CheckpointError", "FunctionModel", "Model",
           "ModelContractError", "TransformerConfig", "build", "from_functions",
           "from_pretrained", "get_config", "load_config",
           "load_demo_model", "load_tokenizer", "logits", "param_shapes", "split_largest_axis",
           "unroll_layers"]
