"""The structural analysis every pass reads: which values are weights, who uses each value,
which operand of a matmul is the weight, and the walks passes take through the program.

Computed by one walk over the graph and its region bodies, cached per graph version:
`analyze(g)` returns the same `Analysis` until g or a body below it is changed (every `Graph`
mutation bumps `graph.version`), so infer-axes, find-blocks, annotate, collective-einsum and
the compiler share one instead of each rebuilding it.

    >>> import jax.numpy as jnp, meshwright as mw
    >>> g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((2, 3)), jnp.ones((3, 4)))
    >>> a = analyze(g)
    >>> x, w = g.inputs
    >>> a.is_weight(w), a.is_weight(x)
    (True, False)
    >>> dot = a.equations[0]
    >>> a.weight_operand(dot), free_dims(dot, 1), contracted_dims(dot, 1)
    (1, [1], [0])
    >>> [u.op for u in a.users(dot.out)]
    ['tanh']
    >>> analyze(g) is a
    True

What a pass asks, and where the answer is:

| question | answer |
|---|---|
| which graph inputs are weights | `weight_inputs` (value ids) |
| is this value a weight, or a view of one (inside scan bodies too) | `is_weight(v)`, `weights` |
| is this a matmul by a weight; which operand is the weight | `is_weight_matmul(node)`, `weight_operand(dot)` |
| a matmul's free and contracted dimensions of one operand | `free_dims(dot, k)`, `contracted_dims(dot, k)` |
| who reads a value (following a scan operand into its body) | `users(v)` |
| every equation, region bodies included, in program order | `equations` |
| what is reachable forward from a value | `forward(v, max_depth)` |
| the weight matmul that made a value | `projection_of(v)` |
| the attention matmuls (score, value) | `attention` |
| the value a weight view was taken of | `view_source(v)` |
| how many times a node runs per call (scan lengths) | `trips(node)` |
| which values the program returns | `outputs` |
| the scans that slice stacked weights layer by layer | `layer_scans` |

How it is computed:

1. **Weight inputs.** A graph input is a weight when it reaches, only through view operations
   (`VIEW_OPS`: reshape, transpose, conversion, slicing, ...) or a scan's consts and per-layer
   slices (not its carries, which change every iteration), either the table of a gather or an
   operand of a dot_general that contracts something (an outer product, like RoPE's positions x
   frequencies, contracts nothing) and is floating point (positions and ids are integers). When
   both operands qualify and come from different inputs, the right one is the weight (`x @ w`).
2. **One walk** over the graph in topological order, each region body right after the node
   that owns it: every equation is listed (`equations`), every use recorded (`users`), and a
   value is a weight if it is a weight input, a view of a weight, or the body input a scan
   feeds a weight as a const or per-layer slice. A scan operand's users then also get the body
   nodes that read its body input, so walks forward continue inside the body. Bodies of cond
   and while are walked, and hold no weights.
3. **Attention** (on first use): a dot_general of two activations whose result reaches, within
   14 steps forward, an exp (a softmax) and then a second dot_general of two activations.

The analysis is immutable (tuples, frozensets); its node lists are the graph's nodes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from meshwright.ir import Graph, Node, Value

# Operations through which a weight is still "the same weight".
VIEW_OPS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze",
                      "broadcast_in_dim", "slice", "dynamic_slice", "copy", "copy_p",
                      "expand_dims", "rev", "reduce_precision"})


def free_dims(dot: Node, k: int) -> list[int]:
    """Dimensions of operand k (0: lhs, 1: rhs) of a dot_general that are neither contracted
    nor batch dimensions."""
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    c, b = (lc, lb) if k == 0 else (rc, rb)
    return [d for d in range(len(dot.inputs[k].shape)) if d not in c and d not in b]


def contracted_dims(dot: Node, k: int) -> list[int]:
    """The contracted dimensions of operand k of a dot_general, in contraction order."""
    (lc, rc), _ = dot.params["dimension_numbers"]
    return list(lc if k == 0 else rc)


def view_source(v: Value) -> Value:
    """The value v is a view of (back through `VIEW_OPS`): a weight's stored input."""
    while v.producer is not None and v.producer.op in VIEW_OPS:
        v = v.producer.inputs[0]
    return v


def value_operand(value: Node, score: Node) -> int:
    """Which operand of an attention's value matmul is V (the other descends from the score)."""
    for k, v in enumerate(value.inputs):
        if isinstance(v, Value) and not _descends_from(v, score):
            return k
    return 1


def _descends_from(v: Value, node: Node, depth: int = 20) -> bool:
    frontier = [v]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            if x.producer is node:
                return True
            p = x.producer
            if p is None or p.op in ("input", "constant"):
                continue
            nxt.extend(w for w in p.inputs if isinstance(w, Value))
        frontier = nxt
        if not frontier:
            return False
    return False


@dataclass(frozen=True, eq=False)
class Analysis:
    """Structural facts about a graph and its region bodies (see the module docstring)."""

    graph: Graph
    equations: tuple[Node, ...]  # every equation, each region body right after its owner
    weight_inputs: frozenset[int]  # ids of the graph's inputs used as weights
    weights: frozenset[int]  # ids of weights and their views, region bodies included
    outputs: frozenset[int]  # ids of the values the graph returns
    layer_scans: tuple[Node, ...]  # per stacked weight a scan slices per layer: that scan
    _users: Mapping[int, tuple[Node, ...]]
    _trips: Mapping[int, int]  # id(graph or body) -> times it runs per call
    _stamp: tuple[tuple[Graph, int], ...]  # (graph, version) of every graph walked

    def is_weight(self, v) -> bool:
        """Whether v (a Value; a Literal never is) is a weight or a view of one."""
        return isinstance(v, Value) and v.id in self.weights

    def users(self, v: Value) -> tuple[Node, ...]:
        """The nodes that read v in program order; for a scan operand, the scan and then the
        body nodes that read the body input it feeds."""
        return self._users.get(v.id, ())

    def is_weight_matmul(self, node: Node) -> bool:
        """A dot_general with a weight operand."""
        return node.op == "dot_general" and any(self.is_weight(v) for v in node.inputs)

    def weight_operand(self, dot: Node) -> int:
        """The weight's operand number in a dot_general: 1 if the right operand is a weight
        (also when both are), else 0."""
        return 1 if self.is_weight(dot.inputs[1]) else 0

    def trips(self, node: Node) -> int:
        """How many times `node` runs per call of the graph: the product of the lengths of
        the scans around it (1 at top level)."""
        return self._trips.get(id(node.graph), 1)

    def forward(self, start: Value, max_depth: int = 16) -> Iterator[tuple[Node, int]]:
        """(node, depth) for every node reachable forward from `start`, breadth first,
        up to `max_depth` steps; a node reached along several paths is yielded each time."""
        seen = {start.id}
        frontier = [start]
        for depth in range(max_depth):
            nxt = []
            for v in frontier:
                for u in self._users.get(v.id, ()):
                    yield u, depth
                    for o in u.outputs:
                        if o.id not in seen:
                            seen.add(o.id)
                            nxt.append(o)
            frontier = nxt

    def projection_of(self, v: Value, max_depth: int = 32) -> Node | None:
        """The weight matmul that made v, walking back through anything but matmuls (a
        matmul of two activations ends that path)."""
        frontier = [v]
        for _ in range(max_depth):
            nxt = []
            for x in frontier:
                p = x.producer
                if p is None or p.op in ("input", "constant"):
                    continue
                if p.op == "dot_general":
                    if self.is_weight_matmul(p):
                        return p
                    continue
                nxt.extend(w for w in p.inputs if isinstance(w, Value) and not self.is_weight(w))
            frontier = nxt
        return None

    @functools.cached_property
    def attention(self) -> tuple[tuple[Node, Node], ...]:
        """(score matmul, value matmul) pairs: two matmuls of activations around an exp."""
        found = []
        for node in self.equations:
            if node.op != "dot_general":
                continue
            if any(not isinstance(v, Value) or v.id in self.weights for v in node.inputs):
                continue
            saw_exp = False
            for u, _ in self.forward(node.out, max_depth=14):
                if u.op == "exp":
                    saw_exp = True
                elif u.op == "dot_general" and saw_exp and u is not node and \
                        not self.is_weight_matmul(u):
                    found.append((node, u))
                    break
                elif u.op == "dot_general":
                    break
        return tuple(found)

    def is_current(self) -> bool:
        """Whether neither the graph nor any region body below it changed since."""
        return all(g.version == version for g, version in self._stamp)


def analyze(graph: Graph) -> Analysis:
    """The analysis of `graph` at its current version (cached on the graph; see the module
    docstring for what it holds)."""
    cached = graph.__dict__.get("_analysis")
    if cached is not None and cached.is_current():
        return cached
    analysis = _build(graph)
    graph.__dict__["_analysis"] = analysis
    return analysis


# ---------------------------------------------------------------------------------------------
# Building it


class _Walk:
    def __init__(self):
        self.equations: list[Node] = []
        self.weights: set[int] = set()
        self.users: dict[int, list[Node]] = {}
        self.layer_scans: list[Node] = []
        self.trips: dict[int, int] = {}
        self.stamp: list[tuple[Graph, int]] = []


def _build(graph: Graph) -> Analysis:
    weight_inputs = frozenset(_weight_inputs(graph, {v.id: v.id for v in graph.inputs}))
    walk = _Walk()
    _walk(graph, walk, weight_inputs, 1)
    return Analysis(
        graph=graph, equations=tuple(walk.equations), weight_inputs=weight_inputs,
        weights=frozenset(walk.weights),
        outputs=frozenset(v.id for v in graph.outputs if isinstance(v, Value)),
        layer_scans=tuple(walk.layer_scans),
        _users=MappingProxyType({k: tuple(v) for k, v in walk.users.items()}),
        _trips=MappingProxyType(walk.trips), _stamp=tuple(walk.stamp))


def _is_float(g: Graph, value_id: int) -> bool:
    for v in g.inputs:
        if v.id == value_id:
            return np.issubdtype(v.dtype, np.floating) or str(v.dtype) == "bfloat16"
    return True  # an input of an enclosing graph: checked where it entered


def _weight_inputs(g: Graph, origin: dict[int, int | None]) -> set[int]:
    """Step 1: ids of top-level inputs used as weights; `origin` maps a value id to the input
    it is a view of (None: not a view of an input)."""
    found: set[int] = set()
    for node in g.topo_order():
        if node.op == "input":
            continue
        ins = [origin.get(v.id) if isinstance(v, Value) else None for v in node.inputs]
        if node.op in VIEW_OPS and ins and ins[0] is not None:
            origin[node.outputs[0].id] = ins[0]
        elif node.op == "dot_general":
            (contracting, _), _ = node.params["dimension_numbers"]
            if not contracting:
                continue
            lhs, rhs = (i if i is not None and _is_float(g, i) else None for i in ins)
            if rhs is not None and (lhs is None or lhs != rhs):
                found.add(rhs)  # x @ w, or both inputs: by convention the right one
            elif lhs is not None and rhs is None:
                found.add(lhs)  # w @ x
        elif node.op == "gather" and ins and ins[0] is not None:
            found.add(ins[0])
        elif node.op == "scan":
            body: Graph = node.regions["jaxpr"]
            n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
            inner: dict[int, int | None] = {}
            for i, (outer, bv) in enumerate(zip(ins, body.inputs)):
                if not n_consts <= i < n_consts + n_carry:  # a carry is not a weight
                    inner[bv.id] = outer
            for bv in body.inputs:
                inner.setdefault(bv.id, None)
            found |= _weight_inputs(body, inner)
    return found


def _walk(g: Graph, walk: _Walk, weight_inputs: set[int] | frozenset[int], trips: int) -> None:
    """Step 2, over g and (recursively) its region bodies."""
    walk.stamp.append((g, g.version))
    walk.trips[id(g)] = trips
    for node in g.topo_order():
        if node.op == "input":
            if node.out.id in weight_inputs:
                walk.weights.add(node.out.id)
            continue
        if node.op == "constant":
            continue
        walk.equations.append(node)
        for v in node.inputs:
            if isinstance(v, Value):
                walk.users.setdefault(v.id, []).append(node)
        first = node.inputs[0] if node.inputs else None
        if node.op in VIEW_OPS and isinstance(first, Value) and first.id in walk.weights:
            walk.weights.add(node.outputs[0].id)
        if node.op == "scan":
            body: Graph = node.regions["jaxpr"]
            n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
            inner_weights = set()
            for i, (outer, inner) in enumerate(zip(node.inputs, body.inputs)):
                if isinstance(outer, Value) and outer.id in walk.weights and not (
                        n_consts <= i < n_consts + n_carry):
                    inner_weights.add(inner.id)
                    if i >= n_consts + n_carry:
                        walk.layer_scans.append(node)
            _walk(body, walk, inner_weights, trips * int(node.params["length"]))
            # walks forward from an outer operand continue inside the body
            for outer, inner in zip(node.inputs, body.inputs):
                if isinstance(outer, Value):
                    outer_users = walk.users.setdefault(outer.id, [])
                    for u in walk.users.get(inner.id, []):
                        if u not in outer_users:
                            outer_users.append(u)
        else:
            for body in node.region_graphs():
                _walk(body, walk, set(), trips)


__all__ = ["VIEW_OPS", "Analysis", "analyze", "contracted_dims", "free_dims", "value_operand",
           "view_source"]
