"""Serve your own model: the engine takes your prefill and decode functions.

    >>> import meshwright as mw
    >>> model = mw.models.from_functions(prefill=my_prefill, decode_step=my_decode,
    ...                                  init_cache=my_init_cache, vocab_size=32000)
    >>> engine = mw.runtime.Engine(model, params, max_slots=8, max_len=1024)

The contract (the reference models follow it too):

- `init_cache(batch, length)` returns the empty KV cache for `batch` sequences of `length`
  positions: any pytree of arrays, any axis order. Every array has one axis of sequences (the
  batch) and one of positions; the engine finds which by tracing `decode_step` (`infer-axes`
  names them `batch` and `kv_length`), or takes them from `cache_axes=` when given;
- `prefill(params, tokens (B, T), cache) -> (logits (B, T, V), cache)`: the causal forward over
  the prompts, writing positions 0..T-1 of the cache it is given (the engine gives a fresh one of
  T positions and copies the rows into its own). Prompts are padded on the right: a row's
  positions past its prompt hold padding, which the engine never reads (see docs/serving.md).
  A prefill that also takes `last (B,)` and returns the logits (B, V) at those positions only
  is used so (`prefill_takes_last=True`); otherwise the engine picks the rows out of (B, T, V);
- `decode_step(params, tokens (B,), cache, positions (B,)) -> (logits (B, V), cache)`: one token
  per row, written at `positions[b]` of row b, attending to positions 0..positions[b]. The
  cache holds however many positions the engine gives (its KV window, at most max_len): the
  function must take the length from the arrays. Idle rows get a position no live request reads
  before writing it.

Both functions must return a cache of the same structure, shapes and dtypes as they got.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from meshwright.models.cache import CacheAxes
from meshwright.models.common import at_positions
from meshwright.models.config import TransformerConfig

# shapes the contract checks trace with: distinct, so no dimension passes for another
_CHECK_BATCH, _CHECK_LENGTH, _CHECK_PROMPT = 3, 20, 7


class ModelContractError(ValueError):
    """A served model's functions break the engine's contract; the message says which rule."""


@dataclass(eq=False)
class FunctionModel:
    """A model the engine serves from plain functions (`from_functions`)."""

    prefill_fn: Callable
    decode_fn: Callable
    init_cache_fn: Callable[[int, int], Any]
    vocab_size: int
    max_len: int | None = None  # the longest sequence it supports (None: say it to the engine)
    name: str = "model"
    prefill_takes_last: bool = False
    axes_override: Any = None  # a tree of CacheAxes like the cache, or None: inferred
    config: Any = None  # a TransformerConfig when known (the planner derives one otherwise)
    _axes: dict = field(default_factory=dict, repr=False)

    def fn(self, phase: str) -> Callable:
        """The function of a phase as the engine calls it: "prefill" -> self.prefill (with
        `last`), "decode" -> self.decode_step."""
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode_step

    def prefill(self, params: Any, tokens: jax.Array, cache: Any,
                last: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """The user's prefill; given `last` (B,), the logits (B, V) at position last[b] of
        each row (picked out of (B, T, V) by a one-hot contraction unless the user's prefill
        takes `last` itself)."""
        if self.prefill_takes_last:
            if last is None:
                raise ValueError(f"{self.name}: this prefill takes `last` (B,) (the position "
                                 "whose logits it returns)")
            return self.prefill_fn(params, tokens, cache, last)
        logits, cache = self.prefill_fn(params, tokens, cache)
        return (logits if last is None else at_positions(logits, last)), cache

    def decode_step(self, params: Any, tokens: jax.Array, cache: Any,
                    positions: jax.Array) -> tuple[jax.Array, Any]:
        """The user's decode step."""
        return self.decode_fn(params, tokens, cache, positions)

    def init_cache(self, batch: int, length: int | None = None):
        return self.init_cache_fn(batch, length or self._need_max_len())

    def cache_shapes(self, batch: int, length: int | None = None):
        length = length or self._need_max_len()
        return jax.eval_shape(lambda: self.init_cache_fn(batch, length))

    def cache_axes(self, params: Any = None):
        """Which axis of every cache array holds the sequences and which the positions: the
        override, or found by tracing `decode_step` with `params` (checked once per params
        structure)."""
        if self.axes_override is not None:
            return self.axes_override
        if params is None:
            raise ValueError(f"{self.name}: finding the cache's axes traces decode_step, which "
                             "needs the params (or pass cache_axes= to from_functions)")
        key = jax.tree.structure(params)
        if key not in self._axes:
            self._axes[key] = infer_cache_axes(self, params)
        return self._axes[key]

    def check(self, params: Any) -> None:
        """Refuse functions that break the contract (module docstring), naming the rule."""
        check_contract(self, params)

    def planning_config(self, params: Any, max_len: int | None = None) -> TransformerConfig:
        """The Transformer shape the planner prices, read off the traced decode step (as
        `mw.plan` does for a traced graph): layers, widths, heads, vocabulary, dtype."""
        from meshwright.ir import trace
        from meshwright.passes import PassManager
        from meshwright.passes.plan import config_from_graph

        length = min(_CHECK_LENGTH, self.max_len or _CHECK_LENGTH)
        g = trace(self.decode_step, *_decode_args(self, params, _CHECK_BATCH, length))
        g = PassManager(["infer-axes", "find-blocks"]).run(g)
        return config_from_graph(g).replace(name=self.name, vocab_size=self.vocab_size,
                                            max_len=max_len or self._need_max_len())

    def _need_max_len(self) -> int:
        if self.max_len is None:
            raise ValueError(f"{self.name}: no max_len: give it to from_functions or to the "
                             "engine")
        return self.max_len


def from_functions(prefill: Callable, decode_step: Callable, init_cache: Callable[[int, int], Any],
                   vocab_size: int, *, max_len: int | None = None, name: str = "model",
                   prefill_takes_last: bool = False, cache_axes: Any = None) -> FunctionModel:
    """A model the engine serves, from functions that follow its contract (module docstring).

    `cache_axes`: a tree like the cache of `CacheAxes(slot=..., length=...)`, for a cache whose
    axes tracing cannot find; by default they are found when the engine first sees the params.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for what, f in (("prefill", prefill), ("decode_step", decode_step),
                    ("init_cache", init_cache)):
        if not callable(f):
            raise TypeError(f"{what} must be a function, got {type(f).__name__}")
    return FunctionModel(prefill, decode_step, init_cache, vocab_size, max_len, name,
                         prefill_takes_last, cache_axes)


# ---- finding the axes --------------------------------------------------------------------------


def infer_cache_axes(model, params: Any):
    """Trace `decode_step` at a small batch and length and read, for every cache array, the
    dimensions infer-axes names `batch` and `kv_length`. A ModelContractError names an array
    where either is missing or ambiguous."""
    from meshwright.ir import trace
    from meshwright.passes import PassManager
    from meshwright.passes.infer_axes import axes_of

    batch, length = _CHECK_BATCH, min(_CHECK_LENGTH, model.max_len or _CHECK_LENGTH)
    args = _decode_args(model, params, batch, length)
    try:
        g = trace(model.decode_step, *args)
    except Exception as e:
        raise ModelContractError(f"{model.name}: decode_step(params, tokens ({batch},), cache, "
                                 f"positions ({batch},)) does not trace: "
                                 f"{type(e).__name__}: {e}") from e
    g = PassManager(["infer-axes"]).run(g)
    n_before = len(jax.tree.leaves(args[:2]))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args[2])[0]]
    cache_inputs = g.inputs[n_before:n_before + len(paths)]
    found = []
    for path, v in zip(paths, cache_inputs):
        roles = axes_of(v)
        slots = [i for i, r in enumerate(roles) if r == "batch"]
        lengths = [i for i, r in enumerate(roles) if r == "kv_length"]
        if len(slots) != 1 or len(lengths) != 1:
            raise ModelContractError(
                f"{model.name}: cache array cache{path} {tuple(v.shape)} has roles "
                f"{tuple(roles)}: the engine needs exactly one 'batch' (the sequences) and "
                "one 'kv_length' (the positions) axis, as decode_step uses them; pass "
                "cache_axes=... (a tree of CacheAxes(slot=, length=)) to from_functions")
        found.append(CacheAxes(slot=slots[0], length=lengths[0]))
    return jax.tree.unflatten(jax.tree.structure(args[2]), found)


# ---- the contract ------------------------------------------------------------------------------


def _rows(batch: int):
    return jax.ShapeDtypeStruct((batch,), jnp.int32)


def _structs(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), tree)


def _decode_args(model, params, batch: int, length: int) -> tuple:
    return (_structs(params), _rows(batch), model.cache_shapes(batch, length), _rows(batch))


def check_contract(model, params: Any) -> None:
    """Trace prefill and decode_step (shapes only) and refuse what breaks the contract."""
    name = model.name
    batch, length, prompt = _CHECK_BATCH, min(_CHECK_LENGTH, model.max_len or _CHECK_LENGTH), \
        _CHECK_PROMPT
    cache = model.cache_shapes(batch, length)
    leaves = jax.tree.leaves(cache)
    if not leaves:
        raise ModelContractError(f"{name}: init_cache({batch}, {length}) returned no arrays")
    logits = _traced(name, "decode_step", f"decode_step(params, tokens ({batch},), cache, "
                     f"positions ({batch},))", model.decode_fn,
                     _decode_args(model, params, batch, length), cache)
    if tuple(getattr(logits, "shape", ())) != (batch, model.vocab_size):
        raise ModelContractError(f"{name}: decode_step returns logits "
                                 f"{tuple(getattr(logits, 'shape', ()))}; the contract is "
                                 f"(batch, vocab_size) = ({batch}, {model.vocab_size})")
    axes = model.cache_axes(params)
    if jax.tree.structure(axes) != jax.tree.structure(cache):
        raise ModelContractError(f"{name}: cache_axes is structured as "
                                 f"{jax.tree.structure(axes)}, the cache as "
                                 f"{jax.tree.structure(cache)}: give one CacheAxes per array")
    for (path, a), ax in zip(jax.tree_util.tree_flatten_with_path(cache)[0],
                             jax.tree.leaves(axes)):
        if max(ax.slot, ax.length) >= a.ndim or a.shape[ax.slot] != batch \
                or a.shape[ax.length] != length:
            raise ModelContractError(
                f"{name}: init_cache({batch}, {length}) gives cache{jax.tree_util.keystr(path)} "
                f"the shape {tuple(a.shape)}: its axis {ax.slot} (sequences) must be the batch "
                f"and its axis {ax.length} (positions) the length")
    fresh = model.cache_shapes(batch, prompt)
    args = (_structs(params), jax.ShapeDtypeStruct((batch, prompt), jnp.int32), fresh)
    if model.prefill_takes_last:
        args = (*args, _rows(batch))
    logits = _traced(name, "prefill", f"prefill(params, tokens ({batch}, {prompt}), cache"
                     f"{', last' if model.prefill_takes_last else ''})", model.prefill_fn,
                     args, fresh)
    want = (batch, model.vocab_size) if model.prefill_takes_last else \
        (batch, prompt, model.vocab_size)
    if tuple(getattr(logits, "shape", ())) != want:
        raise ModelContractError(f"{name}: prefill returns logits {tuple(logits.shape)}; the "
                                 f"contract is {want}")


def _traced(name: str, what: str, call: str, fn, args, cache):
    """`fn`'s (logits, cache) traced on `args` (shapes only), the cache checked against the
    one it was given; the logits. A function that does not trace is a ModelContractError
    naming the call."""
    try:
        result = jax.eval_shape(fn, *args)
    except Exception as e:
        raise ModelContractError(f"{name}: {call} does not trace: {type(e).__name__}: "
                                 f"{e}") from e
    logits, out = _pair(name, what, result)
    _same_cache(name, what, cache, out)
    return logits


def _pair(name: str, what: str, result) -> tuple:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ModelContractError(f"{name}: {what} returns {type(result).__name__}; the "
                                 "contract is a pair (logits, cache)")
    return tuple(result)


def _same_cache(name: str, what: str, given, returned) -> None:
    if jax.tree.structure(given) != jax.tree.structure(returned):
        raise ModelContractError(f"{name}: {what} returns a cache structured as "
                                 f"{jax.tree.structure(returned)}; it was given "
                                 f"{jax.tree.structure(given)} and must return the same")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(given)[0],
                            jax.tree.leaves(returned)):
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise ModelContractError(
                f"{name}: {what} returns cache{jax.tree_util.keystr(path)} as "
                f"{b.dtype}{list(b.shape)}; it was given {a.dtype}{list(a.shape)} and must "
                "return it so (written in place)")


# ---- a factory named on the command line ---------------------------------------------------


def load_model_fn(spec: str) -> tuple[Any, Any]:
    """`package.module:factory` -> (model, params), what `factory()` returns: a model the
    engine serves (`from_functions(...)`, or a reference Model) and its params. The current
    directory is importable, as under `python -m`. Errors name what is wrong and how to fix it
    (ValueError)."""
    import importlib
    import os
    import sys

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model-fn {spec!r}: expected package.module:factory, e.g. "
                         "my_models.tiny:make (a function returning (model, params))")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model-fn {spec!r}: cannot import {module_name!r} ({e}); run "
                         "from the directory that holds it or put it on PYTHONPATH") from e
    factory = getattr(module, attr, None)
    # ValueError, not TypeError, below: a bad command-line value, which the CLI prints plainly
    if not callable(factory):
        raise ValueError(  # noqa: TRY004
            f"--model-fn {spec!r}: {module_name} has no function {attr!r}")
    try:
        out = factory()
    except Exception as e:
        raise ValueError(f"--model-fn {spec!r}: {attr}() failed: {type(e).__name__}: "
                         f"{e}") from e
    if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "cache_shapes")):
        raise ValueError(
            f"--model-fn {spec!r}: {attr}() must return (model, params) with the model from "
            f"meshwright.models.from_functions(...); it returned {type(out).__name__}")
    return out
