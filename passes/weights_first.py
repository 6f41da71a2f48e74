"""Pass `weights-first`: the weight as the left operand of its matmul, stored contracted last.

Why: on XLA:CPU (YNNPACK kernels) a matmul of a few activation rows by a weight stored
(in, out) -- `x @ w`, how most JAX models are written -- reads the weight at about half the
memory bandwidth of the same product computed with the weight stored (out, in) as the *left*
operand, `(w_t @ x.T).T`. Measured on this project's 2-core machine, float32, 40 distinct
(768, 3072) weights: at 2 rows 10.6 against 16.1 GB/s, at 8 rows 9.5 against 12.4 GB/s, at
16 rows 7.0 against 9.7 GB/s; at one row both run at the full bandwidth. Decode steps are
exactly such products, so this is most of what batching costs.

What it rewrites: every top-level `dot_general` without batch dimensions one of whose operands
is a weight argument (one of `analyze(g).weight_inputs`) that nothing else uses, the
other operand not being a weight:

    before:  %w:f32[E,F]                      %y:f32[N,F] = dot_general[((1,),(0,))] %x %w
    after:   %w:f32[F,E]  (stored transposed: converted once, when the weights are loaded)
             %t:f32[F,N] = dot_general[((1,),(1,))] %w %x
             %y:f32[N,F] = transpose[(1,0)] (optimization_barrier %t)

Weights of any rank: the stored order is the weight's free dimensions, then its contracted
ones. The optimization barrier keeps XLA from folding the transpose back into the matmul
(which would undo the rewrite); the transpose itself moves N x F floats, not the weight.

Results: `g.meta["load_transforms"][i] = [Permute(order)]` for every converted argument i
(the same record `Compiled.place` and `convert_arguments` apply), and
`g.meta["weights-first"]` = the paths of the weights rewritten. The graph's meaning changes
(its weight arguments are stored transposed): run it on `convert_arguments(g, args)`.

    >>> g = PassManager(["weights-first"]).run(mw.trace(model.decode_step, *args))
    >>> step = jax.jit(g.as_function())
    >>> logits, cache = step(*convert_arguments(g, args))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from meshwright.ir import Graph, Value
from meshwright.ir import jax_compat as jc
from meshwright.passes.analysis import analyze
from meshwright.passes.base import Pass, PassContext, register


@dataclass(frozen=True)
class Permute:
    """Store an argument with its dimensions in `order` (a load-time conversion)."""

    order: tuple[int, ...]

    def __call__(self, x) -> list:
        return [jnp.transpose(jnp.asarray(x), self.order)]

    def input_spec(self, spec: tuple) -> tuple:
        """The argument's partition spec when it is placed permuted with `spec`."""
        return tuple(spec[self.order.index(d)] for d in range(len(self.order)))

    def describe(self) -> str:
        return f"stored with dimensions {list(self.order)} (weight first in its matmul)"


def weights_first(g: Graph, weights: set[int] | None = None) -> Graph:
    """Rewrite the graph in place (see the module docstring); returns it. `weights`: the ids
    of the inputs that are weights (default: the analysis' `weight_inputs`)."""
    from meshwright.ir.emit import emit_function

    if weights is None:
        weights = analyze(g).weight_inputs
    transforms = g.meta.setdefault("load_transforms", {})
    done = g.meta.setdefault("weights-first", [])
    for node in list(g.equations()):
        if node.op != "dot_general":
            continue
        found = _match(g, node, weights, transforms)
        if found is None:
            continue
        side, w, order, dims = found
        x = node.inputs[1 - side]
        pos = g.inputs.index(w)
        path = w.producer.params.get("path")
        stored = g.add_input(jc.shaped_array([w.shape[d] for d in order], w.dtype), path)
        (y,) = emit_function(g, lambda a, b, dims=dims: _first(a, b, *dims), [stored, x],
                             source=node.source)
        g.replace_all_uses_with(node.out, y)
        g.remove_node(node)
        g.remove_node(w.producer)
        inputs = [v for v in g.inputs if v is not stored]
        g.inputs = inputs[:pos] + [stored] + inputs[pos:]  # the caller passes it where w was
        transforms[pos] = [Permute(order)]
        done.append(path or f"argument {pos}")
    return g


def _match(g: Graph, node, weights: set[int], transforms: dict):
    """(weight side, weight input, stored order, dims for `_first`) or None."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    if lb or rb:
        return None
    for side in (1, 0):  # the weight on the right (the usual x @ w) first
        w, x = node.inputs[side], node.inputs[1 - side]
        if not isinstance(w, Value) or w.producer.op != "input" or w.id not in weights:
            continue
        if not isinstance(x, Value) or x.id in weights or g.is_output(w):
            continue
        if len(g.users(w)) != 1 or sum(v is w for v in node.inputs) != 1:
            continue
        pos = g.inputs.index(w)
        if pos in transforms:
            continue
        wc, xc = (rc, lc) if side == 1 else (lc, rc)
        free = [d for d in range(len(w.shape)) if d not in wc]
        order = (*free, *wc)
        if side == 0 and order == tuple(range(len(w.shape))):
            return None  # already first and contracted last
        # in the stored weight the contracted dims are the last len(wc), in wc's order
        stored_c = tuple(range(len(free), len(order)))
        x_free = [d for d in range(len(x.shape)) if d not in xc]
        n_wf, n_xf = len(free), len(x_free)
        # the new product is (weight free..., x free...); the old one put x's side first
        # when the weight was on the right
        out_order = (tuple(range(n_wf, n_wf + n_xf)) + tuple(range(n_wf)) if side == 1
                     else tuple(range(n_wf + n_xf)))
        return side, w, order, (stored_c, tuple(xc), out_order,
                                node.params.get("preferred_element_type"))
    return None


def _first(w_t, x, w_contract: Sequence[int], x_contract: Sequence[int],
           out_order: Sequence[int], preferred: Any):
    t = jax.lax.dot_general(w_t, x, ((tuple(w_contract), tuple(x_contract)), ((), ())),
                            preferred_element_type=preferred)
    return jnp.transpose(jax.lax.optimization_barrier(t), out_order)


def convert_arguments(g: Graph, args: Sequence[Any], kwargs: dict | None = None) -> list:
    """The caller's arguments as a graph with load transforms takes them: every converted
    leaf converted (a 1-to-1 conversion: same tree, new arrays). Returns the args list."""
    transforms = g.meta.get("load_transforms", {})
    flat, tree = jax.tree_util.tree_flatten((tuple(args), kwargs or {}))
    for i, steps in transforms.items():
        x = flat[i]
        for step in steps:
            (x,) = step(x)
        flat[i] = x
    out, _ = jax.tree_util.tree_unflatten(tree, flat)
    return list(out)


@register
@dataclass(frozen=True)
class WeightsFirst(Pass):
    """Each weight matmul with the weight on the left, stored contracted dims last (XLA:CPU's
    fast orientation for a few rows); see the module docstring."""

    name = "weights-first"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        return weights_first(graph)
