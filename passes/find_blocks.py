"""Pass `find-blocks`: the Transformer's blocks, found in the labelled graph.

Needs `infer-axes`. Recognises, by structure and axis roles (never by names):

- **attention**: a dot_general of two activations (scores), a softmax (exp), a second
  dot_general with the values; with the Q/K/V projections that feed it, the output
  projection it feeds, and the KV cache writes on the way;
- **ffn**: projections out of `embed` into `mlp` (one, or gate and up), a nonlinearity, the
  projection back to `embed`;
- **norm**: reductions over `embed` followed by a reciprocal square root (LayerNorm, RMSNorm);
- **embedding** (a gather from the vocabulary table) and **unembedding** (the projection to
  `vocab`);
- **parallel**: an attention and an ffn block that read the same normalised input.

Each block has a layer index; a block inside a scan over layers stands for every layer
(`layers` = the scan length). Weight matmuls no block explains are listed in `unclassified`.
Results: `graph.meta["blocks"]` (a `BlockReport`) and `node.meta["block"]` ("attention.0").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshwright.ir import Graph, Node, Value
from meshwright.passes import infer_axes as ia
from meshwright.passes.base import Pass, PassContext, register


@dataclass
class Block:
    kind: str  # attention | ffn | norm | embedding | unembedding | parallel
    layer: int | None  # position among blocks of its kind at top level; None inside a scan
    repeats: int = 1  # >1: inside a scan over this many layers
    nodes: list[Node] = field(default_factory=list, repr=False)
    detail: dict = field(default_factory=dict)  # e.g. {"activation": "swiglu", "projections": 3}

    def layers(self) -> list[int | None]:
        if self.repeats > 1:
            return list(range(self.repeats))
        return [self.layer]


@dataclass
class BlockReport:
    blocks: list[Block]
    unclassified: list[str]  # weight matmuls that belong to no block: "shape at file:line"

    def of_kind(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]

    def count(self, kind: str) -> int:
        """Blocks of a kind, counting every layer of a scanned block."""
        return sum(b.repeats for b in self.of_kind(kind))

    def to_list(self) -> list[dict]:
        """`[{"kind": ..., "layer": ...}, ...]`, one entry per layer of scanned blocks."""
        out = []
        for b in self.blocks:
            for layer in b.layers():
                out.append({"kind": b.kind, "layer": layer, **b.detail})
        return out


def _prog(g: Graph) -> ia._Program:
    prog = ia._Program()
    ia._collect(g, prog, ia._parameter_inputs(g))
    prog.outputs = {v.id for v in g.outputs if isinstance(v, Value)}
    return prog


def _role(v: Value, d: int) -> str | None:
    axes = v.producer.meta.get("axes")
    return axes[v.index][d] if axes else None


def _is_weight_dot(prog: ia._Program, node: Node) -> bool:
    return node.op == "dot_general" and any(
        isinstance(v, Value) and v.id in prog.weight for v in node.inputs)


def _weight_free_roles(prog: ia._Program, node: Node) -> list[str | None]:
    w = ia._weight_side(prog, node)
    return [_role(node.inputs[w], d) for d in ia._free_dims(node, w)]


def _activation_operand(prog: ia._Program, node: Node) -> Value:
    return node.inputs[1 - ia._weight_side(prog, node)]


def _repeats(node: Node, scan_lengths: dict[int, int]) -> int:
    return scan_lengths.get(id(node.graph), 1)


def _scan_lengths(g: Graph, factor: int = 1, out: dict | None = None) -> dict[int, int]:
    out = {} if out is None else out
    out[id(g)] = factor
    for node in g.equations():
        inner = factor * node.params.get("length", 1) if node.op == "scan" else factor
        for body in node.region_graphs():
            _scan_lengths(body, inner, out)
    return out


def _upstream(v: Value, stop, max_depth: int = 32) -> list[Node]:
    """Nodes producing v, walking back until `stop(node)` (included) or inputs."""
    seen, out, frontier = set(), [], [v]
    for _ in range(max_depth):
        nxt = []
        for x in frontier:
            p = x.producer
            if p is None or p.op in ("input", "constant") or p.id in seen:
                continue
            seen.add(p.id)
            out.append(p)
            if stop(p):
                continue
            nxt.extend(w for w in p.inputs if isinstance(w, Value))
        frontier = nxt
    return out


_NONLINEAR = {"tanh": "gelu", "erf": "gelu", "erfc": "gelu", "logistic": "silu", "max": "relu"}


def find_blocks(g: Graph) -> BlockReport:
    if "axes" not in g.meta:
        raise ValueError("find-blocks needs the axis roles: run the 'infer-axes' pass first")
    prog = _prog(g)
    scans = _scan_lengths(g)
    blocks: list[Block] = []
    claimed: set[int] = set()
    counters: dict[str, int] = {}

    def add(kind: str, anchor: Node, nodes: list[Node], **detail) -> Block:
        repeats = _repeats(anchor, scans)
        layer = None
        if repeats == 1:
            layer = counters.get(kind, 0)
            counters[kind] = layer + 1
        b = Block(kind, layer, repeats, nodes, detail)
        for nd in nodes:
            claimed.add(nd.id)
            nd.meta.setdefault("block", f"{kind}.{layer if layer is not None else 'scan'}")
        blocks.append(b)
        return b

    # Embedding: gathers from a weight table whose rows are the vocabulary.
    for node in prog.nodes:
        if node.op == "gather" and node.inputs[0].id in prog.weight and \
                _role(node.inputs[0], 0) == "vocab":
            add("embedding", node, [node])

    # Attention.
    attention_inputs: dict[int, Block] = {}
    for score, value in ia._find_attention(prog):
        def is_dot(p):
            return _is_weight_dot(prog, p)

        up = _upstream(score.inputs[0], is_dot) + _upstream(score.inputs[1], is_dot) + \
            _upstream(value.inputs[ia._value_operand(value, score)], is_dot)
        projections = [p for p in up if _is_weight_dot(prog, p)]
        cache_writes = [p for p in up if p.op == "dynamic_update_slice"
                        or p.op.startswith("scatter")]
        out_proj = None
        for u, _ in ia._forward(prog, value.out, max_depth=12):
            if _is_weight_dot(prog, u):
                out_proj = u
                break
        nodes = [score, value] + projections + ([out_proj] if out_proj else [])
        b = add("attention", score, nodes, projections=len(projections) + (1 if out_proj else 0),
                cache_writes=len(cache_writes))
        for p in projections:
            attention_inputs[_activation_operand(prog, p).id] = b

    # Feed-forward: a projection back to embed that contracts mlp, and what feeds it.
    for node in prog.nodes:
        if not _is_weight_dot(prog, node) or node.id in claimed:
            continue
        act = _activation_operand(prog, node)
        contracted = [_role(act, d) for d in
                      ia._contracted_dims(node, 1 - ia._weight_side(prog, node))]
        if "mlp" not in contracted:
            continue
        up = [p for p in _upstream(act, lambda p: _is_weight_dot(prog, p))
              if _is_weight_dot(prog, p) and "mlp" in _weight_free_roles(prog, p)]
        between = _upstream(act, lambda p: _is_weight_dot(prog, p))
        kinds = {_NONLINEAR[p.op] for p in between if p.op in _NONLINEAR}
        activation = "+".join(sorted(kinds)) or "none"
        if len(up) >= 2:
            activation = {"silu": "swiglu", "gelu": "geglu"}.get(activation, f"gated {activation}")
        b = add("ffn", node, up + [node], activation=activation, projections=len(up) + 1)
        # parallel: the ffn reads the same normalised input as an attention block
        for p in up:
            partner = attention_inputs.get(_activation_operand(prog, p).id)
            if partner is not None and not partner.detail.get("parallel"):
                partner.detail["parallel"] = True
                b.detail["parallel"] = True
                add("parallel", node, [], attention=partner.layer, ffn=b.layer)
                break

    # Unembedding: a weight projection to vocab.
    for node in prog.nodes:
        if _is_weight_dot(prog, node) and node.id not in claimed and \
                "vocab" in _weight_free_roles(prog, node):
            add("unembedding", node, [node], tied=_role(node.inputs[
                ia._weight_side(prog, node)], 0) == "vocab")

    # Norms: reductions over embed that lead into a reciprocal square root; the reductions
    # of one norm (LayerNorm: the mean and the variance) reach the same one.
    norms: dict[int, list[Node]] = {}
    for node in prog.nodes:
        if node.op not in ("reduce_sum", "reduce_max") or not isinstance(node.inputs[0], Value):
            continue
        x = node.inputs[0]
        if not any(_role(x, d) == "embed" for d in node.params["axes"]):
            continue
        root = next((u for u, _ in ia._forward(prog, node.out, 12) if u.op in ("rsqrt", "sqrt")),
                    None)
        if root is not None:
            norms.setdefault(root.id, []).append(node)
    for reduces in norms.values():
        centred = any(u.op == "sub" for r in reduces for u, _ in ia._forward(prog, r.out, 3))
        add("norm", reduces[0], reduces, type="layernorm" if centred else "rmsnorm")

    unclassified = []
    for node in prog.nodes:
        if _is_weight_dot(prog, node) and node.id not in claimed:
            unclassified.append(f"dot_general -> {list(node.out.shape)} at {node.source or '?'}")
    order = {"embedding": 0, "norm": 1, "attention": 2, "ffn": 3, "parallel": 4,
             "unembedding": 5}
    blocks.sort(key=lambda b: (b.layer is None, b.layer if b.layer is not None else 0,
                               order[b.kind]))
    return BlockReport(blocks, unclassified)


@register
@dataclass(frozen=True)
class FindBlocks(Pass):
    """Find attention, feed-forward, norm, embedding and unembedding blocks."""

    name = "find-blocks"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        graph.meta["blocks"] = find_blocks(graph)
        return graph
