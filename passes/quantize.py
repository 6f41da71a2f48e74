"""Pass `quantize-int8`: weight-only int8 with per-output-channel scales, on the CPU fast path.

What it matches: the weight operand of every weight dot_general inside the `attention` and
`ffn` blocks that `find-blocks` found (and, with `unembedding=True`, the projection to the
vocabulary), traced back through layout operations (convert, transpose, reshape) and scan
boundaries to the graph input that holds it. Layers in a Python loop give one input per layer;
layers in a `scan` give one stacked input whose leading `layers` axis is kept.

What it rewrites (one weight input of shape W, contracted over dims C at its use):

    before:  %w:f32[W]                          %y = dot_general %x %w
    after:   %w.values:i8[W]  %w.scale:f32[W with C -> 1]
             %xs = max(|x|) over x's contracted dims / 127          (per token, per row)
             %xq:i8 = clamp(-127, round(x / %xs), 127)
             %acc:i32 = dot_general[preferred_element_type=int32] %xq %w.values
             %y = convert(%acc) * %xs * %w.scale                   (in the original dtype)

This is the fast path measured on XLA:CPU: int8 weights multiplied with float
activations convert the whole weight on every call (~7x slower than float32), while int8 x
int8 -> int32 runs on the integer GEMM kernels. A matrix-vector product (one activation row,
i.e. decode at batch 1) would fall onto XLA's slow integer GEMV, so a single row is padded with
a zero row (measured: 2048x8192 GEMV 43 ms unpadded, 2.2 ms padded, 4.1 ms in float32).

The weights are converted once, at load time (`quantize_params` / `quantize_args`): symmetric,
scale = max|w| / 127 over the contracted dims, one scale per output channel (every
non-contracted weight element position). The rewritten graph takes `Int8Weight(values, scale)`
where the float weight was, so `g(params_q, tokens, ...)` and `jax.jit(g.as_function())` work
with the same pytree shape as before, one level deeper at the quantized leaves. The int8
values of a weight a matmul reads directly are stored transposed, contracted dims last (faster
on XLA:CPU; `layout` option); a transpose between the weight and its matmul then only renames
dims, it moves no data.

    >>> pm = PassManager(["infer-axes", "find-blocks", "quantize-int8"])
    >>> g = pm.run(mw.trace(model.decode_step, params, tokens, cache, pos),
    ...            PassContext(example_args=((params, tokens, cache, pos), {})))
    >>> params_q = quantize_params(g, params)        # once, at load time
    >>> logits, cache = g(params_q, tokens, cache, pos)
    >>> g.meta["quantize-int8"].numerics             # max/mean |logit error|, top-1 agreement

Weight uses the fast path cannot take (another primitive reads the weight) get the weight
dequantized in place (correct, slower) and are counted in the report; the tied embedding's
gather, when the unembedding is quantized, gathers int8 rows and their scales.

The code, one job per module: this one is the pass (options, order of the work, the numerics);
`passes/quantize_match.py` finds the weights, `passes/quantize_rewrite.py` rewrites the graph,
`passes/int8_weights.py` holds the int8 format, its load-time conversion, the emitted matmul and
the report (imported here: `from meshwright.passes.quantize import quantize_params` works).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from meshwright.ir import Graph, Value
from meshwright.ir.interpreter import eval_graph
from meshwright.passes.base import Pass, PassContext, register
from meshwright.passes.int8_weights import (
    INT8_MAX,
    MAX_CONTRACTION,
    Int8Numerics,
    Int8Quantizer,
    Int8Report,
    Int8Weight,
    QuantizedInput,
    contracted_last,
    int8_dot_general,
    int8_matmul,
    quantize_args,
    quantize_params,
    quantize_rows,
    quantize_weight,
    scale_shape,
    stored_dimension_numbers,
)
from meshwright.passes.quantize_match import (
    input_path,
    select_weights,
)
from meshwright.passes.quantize_rewrite import Rewrite, dead_code, rewrite_input

# The pass, and what a caller of it uses: the int8 weight format, its conversion at load
# time and the fast-path matmul (defined in passes/int8_weights.py).
__all__ = [
    "INT8_MAX",
    "LAYOUTS",
    "MAX_CONTRACTION",
    "Int8Numerics",
    "Int8Quantizer",
    "Int8Report",
    "Int8Weight",
    "QuantizeInt8",
    "QuantizedInput",
    "contracted_last",
    "int8_dot_general",
    "int8_matmul",
    "quantize_args",
    "quantize_int8",
    "quantize_params",
    "quantize_rows",
    "quantize_weight",
    "scale_shape",
    "stored_dimension_numbers",
]


# ---- numerics -----------------------------------------------------------------------------------


def _token_inputs(graph: Graph) -> list[Value]:
    """Top-level integer inputs that index the vocabulary table (the prompt's token ids)."""
    found: list[Value] = []
    for b in graph.meta["blocks"].of_kind("embedding"):
        for node in b.nodes:
            if node.graph is not graph:
                continue
            frontier, seen = [node.inputs[1]], set()
            while frontier:
                v = frontier.pop()
                if not isinstance(v, Value) or v.id in seen:
                    continue
                seen.add(v.id)
                if v.producer.op == "input":
                    if np.issubdtype(v.dtype, np.integer) and v not in found:
                        found.append(v)
                    continue
                frontier.extend(v.producer.inputs)
    return found


def _logits_output(graph: Graph) -> int:
    for i, o in enumerate(graph.outputs):
        axes = o.producer.meta.get("axes") if isinstance(o, Value) else None
        if axes and axes[o.index] and axes[o.index][-1] == "vocab":
            return i
    return 0


def _prompts(graph: Graph, flat: list, tokens: list[int], vocab: int, calls: int, seed: int):
    key = jax.random.PRNGKey(seed)
    for c in range(calls):
        args = list(flat)
        for j, i in enumerate(tokens):
            k = jax.random.fold_in(jax.random.fold_in(key, c), j)
            args[i] = jax.random.randint(k, np.shape(flat[i]), 0, vocab, flat[i].dtype)
        yield args


def _top2_gap(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _run_all(graph: Graph, batches) -> list[np.ndarray]:
    fn = jax.jit(lambda *xs: eval_graph(graph, list(xs)))
    return [[np.asarray(o) for o in fn(*args)] for args in batches]


# ---- the pass -----------------------------------------------------------------------------------


# How the int8 values are stored. On XLA:CPU (benchmarks/int8.py, decode at batch 1), contracted
# dims last is faster for weights a matmul reads directly (Python-loop layers: 1.60x over
# float32 against 1.35x) and slower for weights a scan slices (1.20x against 2.37x); "auto"
# takes the faster one for each weight.
LAYOUTS = ("auto", "as-is", "contracted-last")


def quantize_int8(graph: Graph, *, blocks: Sequence[str] = ("attention", "ffn"),
                  unembedding: bool = False, layout: str = "auto",
                  example_args: tuple | None = None, positions: int = 256,
                  seed: int = 0) -> Graph:
    """Rewrite `graph` in place (see the module docstring); returns it. `layout`: how the
    int8 values are stored, "as-is" (the weight's dims in order), "contracted-last" (where no
    reshape lies between weight and matmul) or "auto" (contracted-last unless a scan slices
    the weight; see LAYOUTS). With `example_args` (`(args, kwargs)` as
    traced, float weights), measures the logit error on random prompts of at least
    `positions` rows into `graph.meta["quantize-int8"].numerics`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if "axes" not in graph.meta or "blocks" not in graph.meta:
        raise ValueError("quantize-int8 needs the blocks: run 'infer-axes' and 'find-blocks' "
                         "first")
    if "quantize-int8" in graph.meta:
        raise ValueError(f"graph {graph.name!r} has already been through 'quantize-int8'")
    float_in_tree = graph.in_tree
    origins, skipped = select_weights(graph, tuple(blocks), unembedding)
    n_flat = len(graph.inputs)
    index = {v.id: i for i, v in enumerate(graph.inputs)}

    measure = example_args is not None and positions > 0
    if measure:
        flat, tree = jax.tree_util.tree_flatten(example_args)
        if tree != float_in_tree or len(flat) != n_flat:
            raise ValueError(f"example_args are structured as {tree}; the graph was traced "
                             f"for {float_in_tree}")
        out_i = _logits_output(graph)
        per_call = math.prod(graph.outputs[out_i].shape[:-1]) or 1
        token_values = _token_inputs(graph)
        tokens = [index[v.id] for v in token_values]
        # fresh token ids per call; without an embedding lookup, the example inputs once
        calls = -(-positions // per_call) if tokens else 1
        vocab = graph.meta["axes"].sizes.get("vocab", 2)
        reference = _run_all(graph, _prompts(graph, flat, tokens, vocab, calls, seed))

    rw = Rewrite(selected={d for o in origins for d in o.dots})
    weights = []
    for o in sorted(origins, key=lambda o: index[o.input.id]):
        before = (rw.dots, rw.dequantized)
        weights_layout = rewrite_input(graph, o, rw, layout)
        weights.append(QuantizedInput(
            path=input_path(o.input), index=index[o.input.id], shape=o.input.shape,
            dtype=str(o.input.dtype), reduce_axes=tuple(sorted(o.reduced)),
            layout=weights_layout,
            layers_axis=o.layers, dots=rw.dots - before[0],
            dequantized_uses=rw.dequantized - before[1]))
    dead_code(graph)
    if "weight_values" in graph.meta:  # what `lower` treats as weights
        graph.meta["weight_values"] = set(graph.meta["weight_values"]) | rw.values
    if "in_specs" in graph.meta and all("target" in v.producer.meta for v in graph.inputs):
        graph.meta["in_specs"] = [v.producer.meta["target"][0] for v in graph.inputs]
    layouts = {w.index: w.layout for w in weights}
    graph.in_tree = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(
        float_in_tree, [Int8Weight(0, 0, layouts[i]) if i in layouts else 0
                        for i in range(n_flat)]))
    report = Int8Report(weights=weights, skipped=skipped, int8_dots=rw.dots,
                        float_in_tree=float_in_tree)
    graph.meta["quantize-int8"] = report

    if measure:
        args_q, kwargs_q = quantize_args(graph, *example_args[0], **example_args[1])
        flat_q = jax.tree_util.tree_leaves((args_q, kwargs_q))
        tokens_q = [graph.inputs.index(v) for v in token_values]
        got = _run_all(graph, _prompts(graph, flat_q, tokens_q, vocab, calls, seed))
        ref = np.concatenate([r[out_i].reshape(-1, r[out_i].shape[-1]) for r in reference])
        new = np.concatenate([r[out_i].reshape(-1, r[out_i].shape[-1]) for r in got])
        ref, new = ref.astype(np.float32), new.astype(np.float32)
        err = np.abs(ref - new)
        report.numerics = Int8Numerics(
            positions=int(ref.shape[0]), prompts=calls, max_abs_error=float(err.max()),
            mean_abs_error=float(err.mean()), logit_std=float(ref.std()),
            max_abs_logit=float(np.abs(ref).max()),
            top1_agreement=float(np.mean(ref.argmax(-1) == new.argmax(-1))),
            near_ties=float(np.mean(_top2_gap(ref) < 2 * err.max())))
    return graph


@register
@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """Weight-only int8 (per-output-channel scales) on the projections of attention and
    feed-forward blocks, computed as int8 x int8 -> int32 with per-token activation scales.
    Reads `ctx.example_args` (`(args, kwargs)`) to report the logit error; adds each
    weight's conversion to `ctx.results.load_transforms`."""

    name = "quantize-int8"
    unembedding: bool = False  # also the projection to the vocabulary (tied: the embedding too)
    layout: str = "auto"  # int8 values stored "auto", "as-is" or "contracted-last" (LAYOUTS)
    positions: int = 256  # logit rows compared on random prompts (0: do not measure)
    seed: int = 0  # of the random prompts

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        graph = quantize_int8(graph, unembedding=self.unembedding, layout=self.layout,
                              example_args=ctx.example_args, positions=self.positions,
                              seed=self.seed)
        for w in graph.meta["quantize-int8"].weights:  # converted once, when placed
            ctx.results.load_transforms.setdefault(w.index, []).append(
                Int8Quantizer(w.reduce_axes, w.layout))
        return graph
