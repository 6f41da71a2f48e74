"""The graph IR: a dataflow graph of JAX equations, stored in networkx.

A `Graph` has nodes (one per equation, plus `input` and `constant` nodes) and values (the
edges). Every value is produced by exactly one node; a node's `inputs` are values (or inline
`Literal` scalars). Control flow (`scan`, `cond`, `while`) stays one node whose `regions` hold
body Graphs, so a 100-layer scan is still one node.

    >>> import jax.numpy as jnp, meshwright as mw
    >>> g = mw.trace(lambda x, w: jnp.tanh(x @ w), jnp.ones((2, 3)), jnp.ones((3, 4)))
    >>> print(g)
    graph(%x:f32[2,3], %w:f32[3,4]) {
      %0:f32[2,4] = dot_general[dimension_numbers=(([1], [0]), ([], [])), preferred_element_type=float32] %x %w
      %1:f32[2,4] = tanh %0
      return %1
    }

Annotations written by analyses live in `node.meta` (e.g. `meta["axes"]`, `meta["sharding"]`,
`meta["cost"]`) and print inline when present.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
from meshwright.ir import jax_compat as jc

_value_ids = itertools.count()

# dtype -> the short name used in printed text
_SHORT_DTYPES = {
    "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "bool",
    "float8_e4m3fn": "f8e4m3", "float8_e5m2": "f8e5m2", "int4": "i4",
}


def format_aval(aval: Any) -> str:
    """`f32[2,8,64]` for a float32 array of shape (2, 8, 64)."""
    dtype = _SHORT_DTYPES.get(str(aval.dtype), str(aval.dtype))
    return f"{dtype}[{','.join(str(d) for d in aval.shape)}]"


class GraphError(Exception):
    """A malformed graph (raised by `Graph.verify`) or a misuse of the Graph API."""


class _Typed:
    """shape and dtype of anything with an `aval`."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.aval.dtype)


class Value(_Typed):
    """An SSA value: produced once (by `producer`, output number `index`), used any number of times.

    A `Literal` scalar has no producer and is printed inline; see `Literal`.
    """

    __slots__ = ("aval", "id", "index", "producer")

    def __init__(self, aval: Any, producer: Node | None = None, index: int = 0):
        self.id = next(_value_ids)
        self.aval = aval
        self.producer = producer
        self.index = index


    def __repr__(self) -> str:
        op = self.producer.op if self.producer is not None else "?"
        return f"<Value #{self.id} {format_aval(self.aval)} from {op}>"


class Literal(_Typed):
    """An inline scalar constant operand (JAX's Literal), e.g. the 0.5 in `mul 0.5 x`."""

    __slots__ = ("aval", "value")

    def __init__(self, value: Any, aval: Any):
        self.value = value
        self.aval = aval


    def __repr__(self) -> str:
        return f"{_format_scalar(self.value)}:{format_aval(self.aval)}"


Operand = Value | Literal


def _format_scalar(v: Any) -> str:
    v = np.asarray(v)
    if v.dtype == np.bool_:
        return str(bool(v))
    if np.issubdtype(v.dtype, np.floating) or str(v.dtype) == "bfloat16":
        return repr(float(v))
    return str(int(v))


class Node:
    """One equation: `outputs = op[params](inputs)`, plus body Graphs for control flow.

    `op` is the primitive's name; `primitive` the JAX primitive (None for `input`/`constant`).
    `source` is the user's `file:line (function)`. `meta` holds analysis annotations.
    """

    __slots__ = (
        "graph",
        "id",
        "inputs",
        "meta",
        "op",
        "outputs",
        "params",
        "primitive",
        "regions",
        "source",
    )

    def __init__(self, id: int, op: str, primitive: Any, inputs: list[Operand], params: dict,
                 outputs: list[Value], regions: dict | None, source: str | None, graph: Graph):
        self.id = id
        self.op = op
        self.primitive = primitive
        self.inputs = inputs
        self.params = params
        self.outputs = outputs
        self.regions = regions or {}
        self.source = source
        self.meta: dict[str, Any] = {}
        self.graph = graph

    @property
    def out(self) -> Value:
        """The single output of a single-output node."""
        if len(self.outputs) != 1:
            raise GraphError(f"{self.op} node has {len(self.outputs)} outputs, not 1")
        return self.outputs[0]

    def region_graphs(self) -> list[Graph]:
        out = []
        for r in self.regions.values():
            out.extend(r if isinstance(r, (list, tuple)) else [r])
        return out

    def __repr__(self) -> str:
        return f"<Node #{self.id} {self.op} {[format_aval(o.aval) for o in self.outputs]}>"


@dataclass
class InputInfo:
    """Where a graph input came from in the user's arguments (for names and error messages)."""

    path: str  # e.g. "params.layers.0.w_qkv"


class Graph:
    """A dataflow graph of JAX equations. Build with `meshwright.trace`."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self._nx = nx.MultiDiGraph()  # node id -> attr "node"; edge key = (value id, operand no.)
        self._ids = itertools.count()
        # bumped on every mutation: the methods below and assigning `inputs` or `outputs`
        # (caches of derived jaxprs, the topological order and `passes.analysis` check it)
        self.version = 0
        self._inputs: list[Value] = []
        self._outputs: list[Operand] = []
        self.in_tree = None  # pytree structure of (args, kwargs); None for region bodies
        self.out_tree = None  # pytree structure of the result; None for region bodies
        self.meta: dict[str, Any] = {}  # graph-level analysis results (axes report, blocks, plan)

    @property
    def inputs(self) -> list[Value]:
        """The graph's flat inputs in argument order. To reorder them assign a new list (that
        counts as a mutation); do not change the list in place."""
        return self._inputs

    @inputs.setter
    def inputs(self, values: Iterable[Value]) -> None:
        self._inputs = list(values)
        self.version += 1

    @property
    def outputs(self) -> list[Operand]:
        """What the graph returns (flat). Change with `set_outputs` or by assigning a list."""
        return self._outputs

    @outputs.setter
    def outputs(self, values: Iterable[Operand]) -> None:
        self._outputs = list(values)
        self.version += 1

    # ---- construction ------------------------------------------------------------------
    def _new_node(self, op, primitive, inputs, params, out_avals, regions=None, source=None):
        node = Node(next(self._ids), op, primitive, list(inputs), dict(params), [],
                    regions, source, self)
        node.outputs = [Value(a, node, i) for i, a in enumerate(out_avals)]
        self._nx.add_node(node.id, node=node)
        for k, v in enumerate(node.inputs):
            if isinstance(v, Value):
                self._nx.add_edge(v.producer.id, node.id, key=(v.id, k))
        self.version += 1
        return node

    def add_input(self, aval: Any, path: str | None = None) -> Value:
        """A new graph input (an `input` node) named by its argument path (None: numbered)."""
        node = self._new_node("input", None, [], {"path": path}, [aval])
        self.inputs.append(node.out)
        return node.out

    def add_constant(self, value: Any) -> Value:
        """An array constant (a `constant` node)."""
        arr = value
        aval = jc.shaped_array(np.shape(arr), np.asarray(arr).dtype if not hasattr(
            arr, "dtype") else arr.dtype)
        return self._new_node("constant", None, [], {"value": arr}, [aval]).out

    def add_node(self, primitive: Any, inputs: Iterable[Operand], params: dict | None = None,
                 out_avals: list[Any] | None = None, regions: dict | None = None,
                 source: str | None = None) -> Node:
        """Insert an equation. `out_avals` default to the primitive's abstract evaluation."""
        inputs = list(inputs)
        params = dict(params or {})
        for v in inputs:
            if isinstance(v, Value) and (v.producer is None or v.producer.graph is not self):
                raise GraphError(f"operand {v!r} does not belong to this graph")
        if out_avals is None:
            if regions:
                raise GraphError("out_avals are required for a node with regions")
            out_avals = jc.abstract_eval(primitive, [v.aval for v in inputs], params)
        return self._new_node(primitive.name, primitive, inputs, params, out_avals, regions,
                              source)

    def set_outputs(self, outputs: Iterable[Operand]) -> None:
        self.outputs = outputs  # the setter bumps the version

    # ---- queries -----------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """All nodes (inputs, constants, equations) in topological order."""
        return self.topo_order()

    def node(self, node_id: int) -> Node:
        return self._nx.nodes[node_id]["node"]

    def __len__(self) -> int:
        return self._nx.number_of_nodes()

    def topo_order(self) -> list[Node]:
        """Nodes in a deterministic topological order (ties broken by creation order)."""
        cached = getattr(self, "_topo", None)  # every mutation bumps `version`
        if cached is None or cached[0] != self.version:
            order = nx.lexicographical_topological_sort(self._nx, key=lambda n: n)
            cached = self._topo = (self.version, [self._nx.nodes[n]["node"] for n in order])
        return list(cached[1])

    def equations(self) -> list[Node]:
        """The nodes that compute something (not inputs or constants), in topological order."""
        return [n for n in self.topo_order() if n.op not in ("input", "constant")]

    def users(self, item: Value | Node) -> list[Node]:
        """Nodes that use `item` (a value, or any output of a node), in creation order."""
        node = item.producer if isinstance(item, Value) else item
        seen, out = set(), []
        for _, consumer, key in sorted(self._nx.out_edges(node.id, keys=True),
                                       key=lambda e: (e[1], e[2])):
            if isinstance(item, Value) and key[0] != item.id:
                continue
            if consumer not in seen:
                seen.add(consumer)
                out.append(self.node(consumer))
        return out

    def is_output(self, value: Value) -> bool:
        return any(o is value for o in self.outputs)

    def walk(self) -> Iterator[tuple[Node, int]]:
        """Every equation in this graph and its regions, with its trip count (scan length)."""
        yield from self._walk(1)

    def region_owners(self) -> dict[int, Node]:
        """id(region body) -> the node that owns it (scan, cond, while), for every region in
        this graph and below: how a pass follows a body's input out to its operand."""
        return {id(body): node for node, _ in self.walk() for body in node.region_graphs()}

    def _walk(self, trips: int) -> Iterator[tuple[Node, int]]:
        for node in self.equations():
            yield node, trips
            inner = trips * int(node.params.get("length", 1)) if node.op == "scan" else trips
            for body in node.region_graphs():
                yield from body._walk(inner)

    # ---- mutation ----------------------------------------------------------------------
    def replace_all_uses_with(self, old: Value, new: Operand) -> int:
        """Make every user of `old` (and the graph outputs) use `new`; returns the count."""
        if old is new:
            return 0
        if isinstance(new, Value) and new.aval.shape != old.aval.shape:
            raise GraphError(f"cannot replace {old!r} with {new!r}: shapes differ")
        count = 0
        for u, v, key in list(self._nx.out_edges(old.producer.id, keys=True)):
            if key[0] != old.id:
                continue
            consumer = self.node(v)
            consumer.inputs[key[1]] = new
            self._nx.remove_edge(u, v, key=key)
            if isinstance(new, Value):
                self._nx.add_edge(new.producer.id, v, key=(new.id, key[1]))
            count += 1
        for i, o in enumerate(self.outputs):
            if o is old:
                self.outputs[i] = new
                count += 1
        self.version += 1
        return count

    def set_input(self, node: Node, index: int, new: Operand) -> None:
        """Replace operand `index` of `node` with `new`."""
        old = node.inputs[index]
        if isinstance(old, Value):
            self._nx.remove_edge(old.producer.id, node.id, key=(old.id, index))
        node.inputs[index] = new
        if isinstance(new, Value):
            self._nx.add_edge(new.producer.id, node.id, key=(new.id, index))
        self.version += 1

    def remove_node(self, node: Node) -> None:
        """Remove a node none of whose outputs is used."""
        for o in node.outputs:
            if self.users(o) or self.is_output(o):
                raise GraphError(f"cannot remove {node!r}: its output {o!r} is still used")
        self._nx.remove_node(node.id)
        if node.op == "input":
            self.inputs = [v for v in self.inputs if v.producer is not node]
        self.version += 1

    def eliminate_dead_code(self, candidates: Iterable[Node] | None = None) -> int:
        """Remove equations whose outputs are unused (inputs are kept); returns the count.
        `candidates`: look only at these nodes and at what removing them frees (a rewrite
        that just orphaned them, in a graph with no other dead code); default: every node.

        1. Candidates: every node nothing uses (no edge leaves it), or those given.
        2. Take one: if it is not an input, not effectful and none of its outputs is a graph
           output, remove it; its operands' producers become candidates (they may have lost
           their last user).
        Removing never makes a node live again, so this reaches the same fixpoint as sweeping
        the topological order backwards, in time linear in the graph (a sweep per call, and a
        sort per sweep, made a pass that cleans up once per layer quadratic in depth).
        """
        returned = {o.id for o in self.outputs if isinstance(o, Value)}
        work = ([n for n in self._nx.nodes if self._nx.out_degree(n) == 0]
                if candidates is None else [n.id for n in candidates])
        removed = 0
        while work:
            node_id = work.pop()
            if node_id not in self._nx or self._nx.out_degree(node_id):
                continue
            node = self.node(node_id)
            if node.op == "input" or any(o.id in returned for o in node.outputs):
                continue
            if node.primitive is not None and getattr(node.primitive, "name", "") in _EFFECTFUL:
                continue
            work.extend({v.producer.id for v in node.inputs if isinstance(v, Value)})
            self._nx.remove_node(node_id)
            removed += 1
        if removed:
            self.version += 1
        return removed

    # ---- checking ----------------------------------------------------------------------
    def verify(self) -> None:
        """Raise GraphError listing every structural problem: cycles, multiple definitions,
        use before definition, edges out of sync with operands, inconsistent avals."""
        problems = _verify(self)
        if problems:
            raise GraphError(f"graph {self.name!r} failed verification:\n  - "
                             + "\n  - ".join(problems))

    # ---- running -----------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Interpret the graph: equals calling the traced function with the same arguments."""
        from meshwright.ir.interpreter import call_graph

        return call_graph(self, args, kwargs)

    def as_function(self):
        """A plain function of the same arguments, jittable: `jax.jit(g.as_function())`."""
        from meshwright.ir.interpreter import call_graph

        def fn(*args, **kwargs):
            return call_graph(self, args, kwargs, check=False)

        fn.__name__ = self.name
        fn.__qualname__ = self.name
        return fn

    def as_jaxpr(self):
        """The graph as a ClosedJaxpr over its flat inputs."""
        from meshwright.ir.interpreter import eval_graph

        return jc.make_closed_jaxpr(lambda *xs: eval_graph(self, list(xs)),
                                    [v.aval for v in self.inputs])

    # ---- views ---------------------------------------------------------------------------
    def __str__(self) -> str:
        from meshwright.ir.printer import format_graph

        return format_graph(self)

    def format(self, source: bool = False, meta: bool = True) -> str:
        """The text form; `source=True` appends each equation's user source line."""
        from meshwright.ir.printer import format_graph

        return format_graph(self, source=source, meta=meta)

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.equations())} equations, " \
               f"{len(self.inputs)} inputs, {len(self.outputs)} outputs>"

    def to_dot(self) -> str:
        """Graphviz DOT text (`dot -Tsvg`): equations as boxes, collectives highlighted."""
        from meshwright.ir.printer import to_dot

        return to_dot(self)

    def summary(self) -> dict:
        """Op counts, FLOPs of every dot_general, parameter and argument bytes."""
        from meshwright.ir.summary import summarize

        return summarize(self)

    def format_summary(self) -> str:
        from meshwright.ir.summary import format_summary

        return format_summary(self.summary())


# Primitives whose equations must never be removed even when their results are unused.
_EFFECTFUL = frozenset({"debug_callback", "io_callback", "debug_print"})


def _verify(g: Graph) -> list[str]:
    problems: list[str] = []
    if not nx.is_directed_acyclic_graph(g._nx):
        cycle = nx.find_cycle(g._nx)
        problems.append(f"cycle through nodes {[e[0] for e in cycle]}")
        return problems
    defined: dict[int, Node] = {}
    for node in g._nx.nodes.values():
        node = node["node"]
        if node.graph is not g:
            problems.append(f"{node!r} belongs to another graph")
        for i, o in enumerate(node.outputs):
            if o.id in defined:
                problems.append(f"value #{o.id} defined twice: by {defined[o.id]!r} and {node!r}")
            defined[o.id] = node
            if o.producer is not node or o.index != i:
                problems.append(f"value #{o.id} of {node!r} names the wrong producer")
    order = {n.id: i for i, n in enumerate(g.topo_order())}
    for node in g.topo_order():
        expected_edges = set()
        for k, v in enumerate(node.inputs):
            if isinstance(v, Literal):
                continue
            if not isinstance(v, Value):
                problems.append(f"{node!r} operand {k} is {type(v).__name__}, not a Value")
                continue
            if v.id not in defined:
                problems.append(f"{node!r} operand {k} ({v!r}) is not defined in this graph")
                continue
            if order[v.producer.id] >= order[node.id]:
                problems.append(f"{node!r} uses {v!r} before its definition")
            expected_edges.add((v.producer.id, (v.id, k)))
        actual = {(u, key) for u, _, key in g._nx.in_edges(node.id, keys=True)}
        if actual != expected_edges:
            problems.append(f"{node!r}: graph edges {sorted(actual)} do not match its operands "
                            f"{sorted(expected_edges)}")
        problems.extend(_verify_avals(node))
        for body in node.region_graphs():
            problems.extend(f"in region of {node!r}: {p}" for p in _verify(body))
    for i, o in enumerate(g.outputs):
        if isinstance(o, Value) and o.id not in defined:
            problems.append(f"output {i} ({o!r}) is not defined in this graph")
    return problems


def _same_aval(a: Any, b: Any) -> bool:
    return tuple(a.shape) == tuple(b.shape) and np.dtype(a.dtype) == np.dtype(b.dtype)


def _verify_avals(node: Node) -> list[str]:
    if node.op in ("input", "constant"):
        if node.op == "constant" and tuple(np.shape(node.params["value"])) != node.out.shape:
            return [f"{node!r}: constant shape differs from its value"]
        return []
    in_avals = [v.aval for v in node.inputs]
    if node.op == "scan":
        return _verify_scan(node, in_avals)
    if node.regions:
        return []  # cond/while bodies are checked structurally above
    try:
        expected = jc.abstract_eval(node.primitive, in_avals, node.params)
    except Exception as e:  # noqa: BLE001 (whatever the primitive raises is the finding)
        return [f"{node!r}: operands do not type-check: {type(e).__name__}: {e}"]
    got = [o.aval for o in node.outputs]
    if len(expected) != len(got) or not all(_same_aval(a, b) for a, b in zip(expected, got)):
        return [(f"{node!r}: output avals {[format_aval(a) for a in got]} but the primitive "
                 f"gives {[format_aval(a) for a in expected]}")]
    return []


def _verify_scan(node: Node, in_avals: list[Any]) -> list[str]:
    body: Graph = node.regions["jaxpr"]
    n_consts, n_carry = node.params["num_consts"], node.params["num_carry"]
    length = node.params["length"]
    want_in = list(in_avals[:n_consts + n_carry]) + [
        jc.shaped_array(a.shape[1:], a.dtype) for a in in_avals[n_consts + n_carry:]]
    got_in = [v.aval for v in body.inputs]
    problems = []
    if len(want_in) != len(got_in) or not all(_same_aval(a, b) for a, b in zip(want_in, got_in)):
        problems.append(f"{node!r}: body inputs {[format_aval(a) for a in got_in]} do not match "
                        f"operands {[format_aval(a) for a in want_in]}")
    body_out = [o.aval for o in body.outputs]
    want_out = body_out[:n_carry] + [
        jc.shaped_array((length,) + tuple(a.shape), a.dtype) for a in body_out[n_carry:]]
    got_out = [o.aval for o in node.outputs]
    if len(want_out) != len(got_out) or not all(
            _same_aval(a, b) for a, b in zip(want_out, got_out)):
        problems.append(f"{node!r}: outputs {[format_aval(a) for a in got_out]} do not match "
                        f"the body's {[format_aval(a) for a in want_out]}")
    return problems


def flops_of_dot_general(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """2 x batch x lhs-free x rhs-free x contracted."""
    (lc, rc), (lb, rb) = dimension_numbers
    batch = math.prod(lhs_shape[d] for d in lb)
    contract = math.prod(lhs_shape[d] for d in lc)
    lhs_free = math.prod(s for d, s in enumerate(lhs_shape) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs_shape) if d not in rc and d not in rb)
    return 2 * batch * contract * lhs_free * rhs_free
