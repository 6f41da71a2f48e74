"""`build(config) -> Model`: one reference Transformer per family, behind one small interface.

A `Model` only holds its config; every method is a pure function of arrays, so `model.prefill`
and `model.decode_step` can be given to `jax.jit`, `jax.make_jaxpr` or `meshwright.trace` as they
are (the config is bound in the Model, never a traced argument).

    >>> import jax
    >>> from meshwright.models import build, get_config
    >>> model = build(get_config("palm-tiny"))
    >>> params, tokens, cache, positions = model.example_args("decode", batch=2)
    >>> logits, cache = jax.jit(model.decode_step)(params, tokens, cache, positions)
    >>> logits.shape
    (2, 256)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import jax
import jax.numpy as jnp
from meshwright.models import gpt2, llama, palm
from meshwright.models.cache import KVCacheShape
from meshwright.models.config import TransformerConfig, get_config

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "palm": palm, "llama": llama}
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Model:
    """A decoder-only Transformer of `config.family`, bound to `config`.

    params = model.init_params(key)
    cache = model.init_cache(batch)       # {"k", "v"}: per layer (batch, kv_heads, max_len, d_head)
    logits, cache = model.prefill(params, tokens, cache)                   # tokens (B, T)
    logits, cache = model.decode_step(params, tokens, cache, positions)    # tokens, positions (B,)
    logits = model.logits(params, tokens)                                  # (B, T, vocab)
    """

    config: TransformerConfig  # the architecture; its `family` picks the implementation

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.family not in FAMILIES:
            raise ValueError(f"config {cfg.name!r}: unknown family {cfg.family!r}; "
                             f"known families: {', '.join(FAMILIES)}")
        try:
            jnp.dtype(cfg.dtype)
        except TypeError:
            raise ValueError(f"config {cfg.name!r}: dtype {cfg.dtype!r} is not a JAX dtype "
                             "(e.g. 'float32', 'bfloat16')") from None
        FAMILIES[cfg.family].validate(cfg)

    @property
    def _impl(self) -> ModuleType:
        return FAMILIES[self.config.family]

    def init_params(self, key: jax.Array) -> dict:
        """Weights N(0, 0.02), norm scales 1, biases 0, in config.dtype; deterministic in `key`.

        params["layers"] is one dict of (n_layers, ...) arrays when config.scan_layers, else a
        list of per-layer dicts holding the same numbers.
        """
        return _init_params(self._impl.init_params, self.config, key)

    @property
    def kv_cache(self) -> KVCacheShape:
        """The KV cache's description (`meshwright.models.cache`)."""
        return KVCacheShape.of(self.config)

    def init_cache(self, batch: int, length: int | None = None) -> dict:
        """Zero K/V cache for `batch` sequences of `length` positions (default max_len):
        {"k", "v"}, one (batch, n_kv_heads, length, d_head) array per layer (stacked with
        scan_layers). See `meshwright.models.cache`."""
        return self.kv_cache.zeros(batch, length)

    def cache_shapes(self, batch: int, length: int | None = None) -> dict:
        """The cache `init_cache(batch, length)` makes, as `jax.ShapeDtypeStruct`s."""
        return self.kv_cache.shapes(batch, length)

    def cache_axes(self, params: dict | None = None) -> dict:
        """A tree like the cache whose leaves say which axis holds the sequences (slot) and
        which the positions (length): how the serving engine resizes, moves and writes it.
        Declared, not traced (`params` is unused): a test checks that infer-axes reads the
        same axes off `decode_step`, as it does for a model served from functions."""
        return self.kv_cache.axes()

    # the served-model protocol the engine reads (a `models.functions.FunctionModel` too)
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_len(self) -> int:
        return self.config.max_len

    prefill_takes_last = True  # prefill(params, tokens, cache, last) -> logits (B, V)

    def check(self, params: dict) -> None:
        """The reference models follow the engine's contract by construction."""

    def prefill(self, params: dict, tokens: jax.Array, cache: dict,
                last: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Causal forward over int32 tokens (B, T); writes K/V positions 0..T-1; logits
        (B, T, V), or (B, V) at position last[b] of each row when `last` (B,) is given (the
        serving engine's form: it samples from the prompt's last token only, and the
        unembedding of the other positions is most of a long prompt's work)."""
        return self._impl.prefill(self.config, params, tokens, cache, last)

    def decode_step(self, params: dict, tokens: jax.Array, cache: dict,
                    positions: jax.Array) -> tuple[jax.Array, dict]:
        """One token per row (B,): row b writes position positions[b] (< the cache's length)
        and attends to positions 0..positions[b]. Returns logits (B, V) and the updated
        cache."""
        return self._impl.decode_step(self.config, params, tokens, cache, positions)

    def logits(self, params: dict, tokens: jax.Array) -> jax.Array:
        """Full-sequence causal logits (B, T, V), without a cache."""
        return self._impl.logits(self.config, params, tokens)

    def fn(self, phase: str) -> Callable:
        """The plain function of a phase: "prefill" -> self.prefill, "decode" -> self.decode_step."""
        _check_phase(phase)
        return self.prefill if phase == "prefill" else self.decode_step

    def example_args(self, phase: str, batch: int = 2, length: int = 8,
                     key: jax.Array | None = None) -> tuple:
        """Example inputs for `self.fn(phase)`.

        "prefill": (params, tokens (batch, length), zero cache).
        "decode": (params, tokens (batch,), random-filled cache, positions (batch,) < max_len);
        `length` is unused for decode.
        """
        _check_phase(phase)
        cfg = self.config
        key = jax.random.PRNGKey(0) if key is None else key
        k_params, k_tokens, k_cache, k_pos = jax.random.split(key, 4)
        params = self.init_params(k_params)
        if phase == "prefill":
            tokens = jax.random.randint(k_tokens, (batch, length), 0, cfg.vocab_size, jnp.int32)
            return params, tokens, self.init_cache(batch)
        tokens = jax.random.randint(k_tokens, (batch,), 0, cfg.vocab_size, jnp.int32)
        shapes = self.cache_shapes(batch)
        leaves, tree = jax.tree.flatten(shapes)
        keys = jax.random.split(k_cache, len(leaves))
        cache = tree.unflatten([jax.random.normal(k, s.shape, jnp.float32).astype(s.dtype)
                                for k, s in zip(keys, leaves)])
        positions = jax.random.randint(k_pos, (batch,), 0, cfg.max_len, jnp.int32)
        return params, tokens, cache, positions


# One compile per config instead of dozens of small eager XLA programs.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(init: Callable, config: TransformerConfig, key: jax.Array) -> dict:
    return init(config, key)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def build(config: TransformerConfig | str) -> Model:
    """The reference model for `config` (a TransformerConfig or a preset name).

    Raises ValueError when the config does not fit its family (e.g. gpt2 with n_kv_heads !=
    n_heads, llama with tied embeddings) or names an unknown family.
    """
    if isinstance(config, str):
        config = get_config(config)
    return Model(config)


def unroll_layers(model: Model, params: dict) -> tuple[Model, dict]:
    """The same model with its layers as a Python loop: for a `scan_layers` model, the config
    without it and params["layers"] as a list of per-layer dicts (the stacked arrays sliced
    once, here); any other model as given.

    For serving on XLA:CPU: inside a scan every step copies each layer's weights and KV cache
    out of the stacked arrays before its matmuls can read them (three to five times the bytes
    of the step), while a loop passes every array as it is stored.
    """
    cfg = model.config
    if not cfg.scan_layers:
        return model, params
    layers = [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.n_layers)]
    return build(cfg.replace(scan_layers=False)), {**params, "layers": layers}


def logits(config: TransformerConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """Full-sequence causal logits (B, T, V) of the reference model of `config` for tokens (B, T).

    A plain function of arrays once `config` is bound, e.g. with a loaded checkpoint:

        config, params = meshwright.models.from_pretrained("path/to/gpt2")
        out = jax.jit(meshwright.models.logits, static_argnums=0)(config, params, tokens)
    """
    return build(config).logits(params, tokens)


def param_shapes(config: TransformerConfig) -> dict:
    """The parameter pytree of `config` as jax.ShapeDtypeStruct leaves (nothing is allocated),
    e.g. for a planner that chooses a sharding per parameter before a checkpoint is loaded."""
    return jax.eval_shape(build(config).init_params, jax.random.PRNGKey(0))
