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

from meshwright.ir import Graph, Literal, Node, Value
from meshwright.passes.analysis import (
    Analysis,
    analyze,
    contracted_dims,
    free_dims,
    value_operand,
    view_source,
)
from meshwright.passes.axis_roles import key_operand_by_axes
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
        """`[{"kind": ..., "layer": ...}, ...]` in program order; the blocks of a scan body are
        listed layer by layer."""
        out: list[dict] = []
        run: list[Block] = []

        def flush():
            for layer in range(run[0].repeats if run else 0):
                out.extend({"kind": b.kind, "layer": layer, **b.detail} for b in run)
            run.clear()

        for b in self.blocks:
            if b.repeats > 1:
                if run and run[0].repeats != b.repeats:
                    flush()
                run.append(b)
                continue
            flush()
            out.append({"kind": b.kind, "layer": b.layer, **b.detail})
        flush()
        return out


def _role(v: Value, d: int) -> str | None:
    axes = v.producer.meta.get("axes")
    return axes[v.index][d] if axes else None


def _weight_free_roles(a: Analysis, node: Node) -> list[str | None]:
    w = a.weight_operand(node)
    return [_role(node.inputs[w], d) for d in free_dims(node, w)]


def _activation_operand(a: Analysis, node: Node) -> Value:
    return node.inputs[1 - a.weight_operand(node)]


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


def _head_counts(score: Node, value: Node) -> dict:
    """heads, kv_heads and head_dim of one attention, from its operands' axes."""
    key = score.inputs[key_operand_by_axes(score, value)]
    query = score.inputs[1 - key_operand_by_axes(score, value)]

    def count(v, roles):
        n = 1
        for d, r in enumerate(v.producer.meta["axes"][v.index]):
            if r in roles:
                n *= v.shape[d]
        return n

    heads = count(query, ("heads", "kv_heads", "groups"))
    kv_heads = count(key, ("heads", "kv_heads"))
    # a key repeated up to `heads` still carries only kv_heads distinct heads
    key_roles = key.producer.meta["axes"][key.index]
    if "heads" in key_roles and "kv_heads" not in key_roles:
        kv_heads = _distinct_kv_heads(key, kv_heads)
    return {"heads": heads, "kv_heads": kv_heads,
            "head_dim": count(query, ("head_dim",))}


def _distinct_kv_heads(key: Value, heads: int) -> int:
    """Keys repeated up to the query heads (GQA, or MQA via jnp.repeat) carry heads / r
    distinct heads, r being the size of the head axis a broadcast added on the way."""
    for p in _upstream(key, lambda p: False, max_depth=12):
        if p.op != "broadcast_in_dim" or isinstance(p.inputs[0], Literal):
            continue
        operand = p.inputs[0]
        if "head_dim" not in operand.producer.meta["axes"][operand.index]:
            continue  # a mask broadcast over the heads, not the keys themselves
        kept = dict(zip(p.params["broadcast_dimensions"], operand.shape))
        roles = p.meta["axes"][0]
        for d, size in enumerate(p.out.shape):
            added = d not in kept or (kept[d] == 1 and size > 1)
            if added and roles[d] in ("heads", "groups") and heads % size == 0:
                return heads // size
    return heads


_NONLINEAR = {"tanh": "gelu", "erf": "gelu", "erfc": "gelu", "logistic": "silu", "max": "relu"}


def find_blocks(g: Graph) -> BlockReport:
    if "axes" not in g.meta:
        raise ValueError("find-blocks needs the axis roles: run the 'infer-axes' pass first")
    a = analyze(g)
    blocks: list[Block] = []
    claimed: set[int] = set()

    def add(kind: str, anchor: Node, nodes: list[Node], **detail) -> Block:
        b = Block(kind, None, a.trips(anchor), nodes or [anchor], detail)
        claimed.update(nd.id for nd in nodes)
        blocks.append(b)
        return b

    # Embedding: gathers from a weight table whose rows are the vocabulary.
    for node in a.equations:
        if node.op == "gather" and a.is_weight(node.inputs[0]) and \
                _role(node.inputs[0], 0) == "vocab":
            add("embedding", node, [node])

    # Attention.
    attention_inputs: dict[int, Block] = {}
    for score, value in a.attention:
        is_dot = a.is_weight_matmul
        up = _upstream(score.inputs[0], is_dot) + _upstream(score.inputs[1], is_dot) + \
            _upstream(value.inputs[value_operand(value, score)], is_dot)
        projections = [p for p in up if a.is_weight_matmul(p)]
        cache_writes = [p for p in up if p.op == "dynamic_update_slice"
                        or p.op.startswith("scatter")]
        out_proj = None
        for u, _ in a.forward(value.out, max_depth=12):
            if a.is_weight_matmul(u):
                out_proj = u
                break
        nodes = [score, value] + projections + ([out_proj] if out_proj else [])
        b = add("attention", score, nodes, projections=len(projections) + (1 if out_proj else 0),
                cache_writes=len(cache_writes), **_head_counts(score, value))
        for p in projections:
            attention_inputs[_activation_operand(a, p).id] = b

    # Feed-forward: a projection back to embed that contracts mlp, and what feeds it.
    for node in a.equations:
        if not a.is_weight_matmul(node) or node.id in claimed:
            continue
        act = _activation_operand(a, node)
        contracted = [_role(act, d) for d in contracted_dims(node, 1 - a.weight_operand(node))]
        if "mlp" not in contracted:
            continue
        up = [p for p in _upstream(act, a.is_weight_matmul)
              if a.is_weight_matmul(p) and "mlp" in _weight_free_roles(a, p)]
        between = _upstream(act, a.is_weight_matmul)
        kinds = {_NONLINEAR[p.op] for p in between if p.op in _NONLINEAR}
        activation = "+".join(sorted(kinds)) or "none"
        if len(up) >= 2:
            activation = {"silu": "swiglu", "gelu": "geglu"}.get(activation, f"gated {activation}")
        b = add("ffn", node, up + [node], activation=activation, projections=len(up) + 1)
        # parallel: the ffn reads the same normalised input as an attention block
        for p in up:
            partner = attention_inputs.get(_activation_operand(a, p).id)
            if partner is not None and not partner.detail.get("parallel"):
                partner.detail["parallel"] = True
                b.detail["parallel"] = True
                add("parallel", node, [])
                break

    # Unembedding: a weight projection to vocab (tied: it reads the embedding table).
    tables = {view_source(n.inputs[0]) for b in blocks if b.kind == "embedding" for n in b.nodes}
    for node in a.equations:
        if a.is_weight_matmul(node) and node.id not in claimed and \
                "vocab" in _weight_free_roles(a, node):
            weight = node.inputs[a.weight_operand(node)]
            add("unembedding", node, [node], tied=view_source(weight) in tables)

    # Norms: reductions over embed that lead into a reciprocal square root; the reductions
    # of one norm (LayerNorm: the mean and the variance) reach the same one.
    norms: dict[int, list[Node]] = {}
    for node in a.equations:
        if node.op not in ("reduce_sum", "reduce_max") or not isinstance(node.inputs[0], Value):
            continue
        x = node.inputs[0]
        if not any(_role(x, d) == "embed" for d in node.params["axes"]):
            continue
        root = next((u for u, _ in a.forward(node.out, 12) if u.op in ("rsqrt", "sqrt")),
                    None)
        if root is not None:
            norms.setdefault(root.id, []).append(node)
    for reduces in norms.values():
        centred = any(u.op == "sub" for r in reduces for u, _ in a.forward(r.out, 3))
        add("norm", reduces[0], reduces, type="layernorm" if centred else "rmsnorm")

    unclassified = []
    for node in a.equations:
        if a.is_weight_matmul(node) and node.id not in claimed:
            unclassified.append(f"dot_general -> {list(node.out.shape)} at {node.source or '?'}")
    _assign_layers(g, blocks)
    return BlockReport(blocks, unclassified)


def _assign_layers(g: Graph, blocks: list[Block]) -> None:
    """Layer numbers in program order: attention (or a lone ffn) opens a layer; a norm belongs
    to the layer of the next attention/ffn; embedding, unembedding and the final norm have none.
    Blocks inside a scan stand for every layer (layer None, repeats = the scan length)."""
    position = {}
    for i, (node, _) in enumerate(g.walk()):
        position[node.id, id(node.graph)] = i
    blocks.sort(key=lambda b: min(position.get((n.id, id(n.graph)), 0) for n in b.nodes))
    layer = -1
    last_opened_by = None
    for b in blocks:
        if b.repeats > 1 or b.kind in ("embedding", "unembedding"):
            continue
        if b.kind == "attention" or (b.kind == "ffn" and last_opened_by == "ffn"):
            layer += 1
            last_opened_by = b.kind
        elif b.kind == "ffn" and last_opened_by is None:
            layer, last_opened_by = layer + 1, "ffn"
        if b.kind in ("attention", "ffn", "parallel"):
            b.layer = max(layer, 0)
    for i, b in enumerate(blocks):
        if b.kind == "norm" and b.repeats == 1:
            nxt = next((c for c in blocks[i + 1:] if c.kind in ("attention", "ffn")
                        and c.repeats == 1), None)
            b.layer = nxt.layer if nxt is not None else None
    for b in blocks:
        tag = f"{b.kind}.{b.layer if b.layer is not None else ('scan' if b.repeats > 1 else '-')}"
        for nd in b.nodes:
            nd.meta.setdefault("block", tag)


@register
@dataclass(frozen=True)
class FindBlocks(Pass):
    """Find attention, feed-forward, norm, embedding and unembedding blocks."""

    name = "find-blocks"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        graph.meta["blocks"] = find_blocks(graph)
        return graph
