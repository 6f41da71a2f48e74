"""Every import of JAX internals in meshwright lives here, and only here.

JAX moves its internals between releases (many `jax.core` names are gone in 0.10). Keeping them
in one adapter means a JAX upgrade touches one file.
Public `jax.extend.core` comes first; private modules only where no public name exists.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

# ---- public (jax.extend.core) --------------------------------------------------------------
ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Var = jex_core.Var
Literal = jex_core.Literal
DropVar = jex_core.DropVar
Primitive = jex_core.Primitive
jaxpr_as_fun = jex_core.jaxpr_as_fun
check_jaxpr = jex_core.check_jaxpr

# ---- private, with fallbacks ---------------------------------------------------------------
try:  # the user's frame of an equation's traceback (file, line, function)
    from jax._src.source_info_util import user_frame as _user_frame
except ImportError:  # pragma: no cover - older/newer JAX
    _user_frame = None

try:
    from jax._src.core import ShapedArray
except ImportError:  # pragma: no cover
    ShapedArray = type(jax.core.ShapedArray((), np.float32))  # type: ignore[attr-defined]


def is_tracer(x: Any) -> bool:
    """Whether x is an abstract value under a JAX transformation (jit, vmap, make_jaxpr)."""
    return isinstance(x, jax.core.Tracer)


def shaped_array(shape: tuple[int, ...], dtype: Any) -> Any:
    """An abstract value of this shape and dtype."""
    return ShapedArray(tuple(shape), np.dtype(dtype))


def source_line(eqn: Any) -> str | None:
    """`file.py:LINE (function)` of the user code that created this equation, or None."""
    info = getattr(eqn, "source_info", None)
    if info is None:
        return None
    frame = None
    if _user_frame is not None:
        try:
            frame = _user_frame(info.traceback)
        except Exception:  # noqa: BLE001  # pragma: no cover - a traceback JAX cannot read
            frame = None
    if frame is None:
        return None
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


def has_impl(primitive: Any) -> bool:
    """Whether `primitive.bind` can run eagerly (an evaluation rule was defined)."""
    if "impl" in vars(primitive):
        return True
    # Call-like and control-flow primitives define impl on their class.
    return type(primitive).impl is not Primitive.impl


def abstract_eval(primitive: Any, in_avals: list[Any], params: dict) -> list[Any]:
    """Output avals of `primitive` applied to `in_avals` (used by Graph.verify)."""
    try:
        out = primitive.abstract_eval(*in_avals, **params)
        avals = out[0] if isinstance(out, tuple) and len(out) == 2 and isinstance(
            out[1], (set, frozenset)) else out
    except Exception:  # noqa: BLE001 (no abstract rule of its own: evaluate the shapes)
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
        avals = jax.eval_shape(lambda *xs: primitive.bind(*xs, **params), *structs)
    if not primitive.multiple_results:
        avals = [avals]
    return [shaped_array(a.shape, a.dtype) for a in avals]


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def is_dropvar(atom: Any) -> bool:
    return isinstance(atom, DropVar)


def make_closed_jaxpr(fn, in_avals: list[Any]) -> Any:
    """Trace `fn(*flat_args)` into a ClosedJaxpr for the given avals."""
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals]
    return jax.make_jaxpr(fn)(*structs)


def jaxpr_params_of(params: dict) -> dict:
    """The params that hold sub-jaxprs (ClosedJaxpr or Jaxpr, or tuples of them)."""
    out = {}
    for key, val in params.items():
        if isinstance(val, (ClosedJaxpr, Jaxpr)) or isinstance(val, (tuple, list)) and val and all(
                isinstance(v, (ClosedJaxpr, Jaxpr)) for v in val):
            out[key] = val
    return out


def closed(jaxpr: Any) -> Any:
    """A ClosedJaxpr for a Jaxpr or ClosedJaxpr."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr
    return ClosedJaxpr(jaxpr, [])


def distributed_client() -> Any:
    """The coordination service client of `jax.distributed` (key-value store, barriers), or
    None before `jax.distributed.initialize`. JAX has no public name for it."""
    from jax._src import distributed

    return distributed.global_state.client
