"""infer-axes' second stage: roles for the unified dimension classes, from the program's
structure (never from variable names).

In order (`name_roles`): a stacked weight's scanned dimension is `layers`; the integer ids
feeding the embedding gather give `batch` and `length`, its table `vocab` and `embed` (with
several tables the biggest is the vocabulary, the others `positions`); attention (two
activation matmuls around a softmax, `Analysis.attention`) gives `head_dim` (contracted),
`kv_length` (key only), `heads` / `kv_heads` / `groups` (what query and key carry besides);
its output projection and the projections feeding it give `embed`; without attention or a
table, a projection whose output a second projection contracts is embed -> mlp -> embed; a
weight projection out of `embed` is `mlp` if it comes back to `embed`, else `vocab` when it
reaches the output (the logits); a cache written at the current positions gives `kv_length`;
a projection output cut apart is `fused`; what is left is named from its factors
(`heads*head_dim`) or the whole it was cut from (`head_dim/2`).

The structural questions (which values are weights, who uses what, the attention matmuls) are
`passes.analysis`; the symbols are `axis_symbols`.
"""

from __future__ import annotations

from typing import Any

from meshwright.ir import Graph, Literal, Node, Value
from meshwright.passes.analysis import Analysis, contracted_dims, free_dims, value_operand
from meshwright.passes.axis_rules import scatter_pairs
from meshwright.passes.axis_symbols import Symbols


class Namer:
    """The roles given so far: symbol class -> role (the first role given a class stays)."""

    def __init__(self, syms: Symbols, dims: dict[int, list[int]]):
        self.syms = syms
        self.dims = dims
        self.names: dict[int, str] = {}
        self.weight_classes: set[int] = set()

    def cls(self, v: Any, d: int) -> int:
        return self.syms.find(self.dims[v.id][d])

    def classes(self, v: Any) -> list[int]:
        if isinstance(v, Literal):
            return []
        return [self.syms.find(s) for s in self.dims[v.id]]

    def name(self, s: int, role: str) -> None:
        r = self.syms.find(s)
        if self.syms.size[r] == 1:
            return
        self.names.setdefault(r, role)

    def role(self, s: int) -> str | None:
        return self.names.get(self.syms.find(s))


def _key_operand(n: Namer, score: Node, value: Node) -> int:
    """The key is the score operand with a free dimension that the value dot contracts (on
    ties, the one with fewer free dimensions: keys carry no query heads)."""
    probs = value.inputs[1 - value_operand(value, score)]
    contracted = {n.cls(probs, d) for d in contracted_dims(value, value.inputs.index(probs))}
    has = [any(n.cls(score.inputs[k], d) in contracted for d in free_dims(score, k))
           for k in (0, 1)]
    if has[0] != has[1]:
        return 0 if has[0] else 1
    f0, f1 = len(free_dims(score, 0)), len(free_dims(score, 1))
    return 0 if f0 < f1 else 1


def key_operand_by_axes(score: Node, value: Node) -> int:
    """The key operand of a labelled score dot: the one with kv_length, else fewer heads."""
    def roles(v):
        return v.producer.meta["axes"][v.index]

    for k in (0, 1):
        if "kv_length" in roles(score.inputs[k]) and "kv_length" not in roles(score.inputs[1 - k]):
            return k
    heads = [sum(r in ("heads", "groups") for r in roles(score.inputs[k])) for k in (0, 1)]
    if heads[0] != heads[1]:
        return 0 if heads[0] < heads[1] else 1
    return 1


def _name_activation_dims(n: Namer, score: Node, k: int) -> None:
    """Without token ids, batch and length are the query's classes that no weight carries:
    shared by query and key (a batch dim of the score dot) -> batch; the query's own -> length."""
    q = 1 - k
    (_lc, _rc), (lb, rb) = score.params["dimension_numbers"]
    for d in (lb if q == 0 else rb):
        c = n.cls(score.inputs[q], d)
        if c not in n.weight_classes and n.syms.size[c] > 1:
            n.name(c, "batch")
    for d in free_dims(score, q):
        c = n.cls(score.inputs[q], d)
        if c not in n.weight_classes and n.syms.size[c] > 1:
            n.name(c, "length")


def _name_attention(a: Analysis, n: Namer, score: Node, value: Node, k: int) -> None:
    q = 1 - k
    qv, kv = score.inputs[q], score.inputs[k]
    for d in contracted_dims(score, q):
        n.name(n.cls(qv, d), "head_dim")
    q_cls = n.classes(qv)
    for d in free_dims(score, k):
        c = n.cls(kv, d)
        if c not in q_cls:
            n.name(c, "kv_length")
    # the value's own head dimension: what the value dot keeps from V but not from the probs
    vi = value_operand(value, score)
    probs_cls = set(n.classes(value.inputs[1 - vi]))
    for d in free_dims(value, vi):
        c = n.cls(value.inputs[vi], d)
        if c not in probs_cls:
            n.name(c, "head_dim")
    settled = ("batch", "length", "kv_length", "head_dim", "layers")

    def heads_like(v):
        out = []
        for c in n.classes(v):
            if n.syms.size[c] > 1 and n.role(c) not in settled and c not in out:
                out.append(c)
        return out

    qh, kh = heads_like(qv), heads_like(kv)
    if not kh:  # multiquery: keys have no head dimension
        for c in qh:
            n.name(c, "heads")
    elif set(kh) == set(qh):  # multihead, or grouped-query with keys repeated up to heads
        kv_classes = set()
        for operand in (kv, value.inputs[vi]):
            proj = a.projection_of(operand)
            if proj is not None:
                for c in n.classes(proj.out):
                    kv_classes.add(c)
                    kv_classes.update(n.syms.factors(c) or ())
        for c in qh:
            n.name(c, "heads")
            fs = n.syms.factors(c)
            if fs and len(fs) == 2 and any(f in kv_classes for f in fs):
                kvh = fs[0] if fs[0] in kv_classes else fs[1]
                n.name(kvh, "kv_heads")
                n.name(fs[1] if kvh == fs[0] else fs[0], "groups")
    elif set(kh) < set(qh):  # grouped-query einsum: q is (kv_heads, groups)
        for c in kh:
            n.name(c, "kv_heads")
        for c in qh:
            n.name(c, "groups")
    else:
        for c in kh:
            if c not in qh:
                n.name(c, "kv_heads")
        for c in qh:
            n.name(c, "heads")


def name_roles(g: Graph, a: Analysis, n: Namer) -> None:
    """Stage 2: a role for the symbol classes the program's structure explains (see the module
    docstring), written into `n.names`."""
    syms = n.syms
    for scan in a.layer_scans:
        n.name(scan.meta["scan_axis"], "layers")

    # Token ids -> batch, length; the table -> vocab, embed. With several tables (learned
    # positions), the one with the most rows is the vocabulary; the others are positions.
    gathers = [node for node in a.equations
               if node.op == "gather" and a.is_weight(node.inputs[0])]

    def row_dims(node):
        """Table dimensions indexed by the ids (collapsed, or sliced to size 1 under vmap)."""
        dn, sizes, table = node.params["dimension_numbers"], node.params["slice_sizes"], \
            node.inputs[0]
        return [d for d in range(len(table.shape)) if d in set(dn.collapsed_slice_dims)
                or (sizes[d] == 1 and table.shape[d] > 1)]

    def rows(node):
        return max((node.inputs[0].shape[d] for d in row_dims(node)), default=0)

    for i, node in enumerate(sorted(gathers, key=lambda nd: -rows(nd))):
        table = node.inputs[0]
        dn = node.params["dimension_numbers"]
        for d in range(len(table.shape)):
            if d in row_dims(node):
                n.name(n.cls(table, d), "vocab" if i == 0 else "positions")
            elif node.params["slice_sizes"][d] == table.shape[d]:
                n.name(n.cls(table, d), "embed")
        if i == 0:
            idx = node.inputs[1]
            batch_dims = [d for d in range(len(node.out.shape)) if d not in dn.offset_dims]
            if not batch_dims:  # vmapped lookups: the ids' own dimensions, but the last
                batch_dims = []
                for d in range(len(idx.shape) - 1):
                    c = n.cls(idx, d)
                    if n.syms.size[c] > 1:
                        batch_dims.append(d)
                for role, d in zip(("batch", "length"), batch_dims):
                    n.name(n.cls(idx, d), role)
            for role, d in zip(("batch", "length"), batch_dims):
                n.name(n.cls(node.out, d), role)

    attention = [(s, v, _key_operand(n, s, v)) for s, v in a.attention]
    # Classes a weight carries (or a factor of one): heads can be; batch and length cannot.
    n.weight_classes = set()
    for node in a.equations:
        for v in node.inputs:
            if a.is_weight(v):
                for c in n.classes(v):
                    n.weight_classes.add(c)
                    n.weight_classes.update(syms.factors(c) or ())
    for score, value, k in attention:
        _name_activation_dims(n, score, k)
    for score, value, k in attention:
        _name_attention(a, n, score, value, k)
    # The attention output projection returns to the model width.
    for score, value, k in attention:
        for u, _ in a.forward(value.out, max_depth=12):
            if a.is_weight_matmul(u):
                w = a.weight_operand(u)
                for d in free_dims(u, w):
                    n.name(n.cls(u.inputs[w], d), "embed")
                break

    # embed: what the projections contract, if no embedding gather said it already.
    for score, value, k in attention:
        proj = a.projection_of(score.inputs[1 - k])
        if proj is not None:
            w = a.weight_operand(proj)
            for d in contracted_dims(proj, 1 - w):
                n.name(n.cls(proj.inputs[1 - w], d), "embed")
    embed = {c for c, r in n.names.items() if r == "embed"}

    # No attention and no embedding table (a bare feed-forward block): a projection whose
    # output a second projection contracts is embed -> mlp -> embed.
    if not any(r == "embed" for r in n.names.values()):
        _name_bare_ffn(a, n)
        embed = {c for c, r in n.names.items() if r == "embed"}
    # Activations entering the model (no gather): batch and length from the first activation.
    if not any(r == "batch" for r in n.names.values()):
        for v in g.inputs:
            cs = n.classes(v)
            if not a.is_weight(v) and cs and cs[-1] in embed:
                for role, c in zip(("batch", "length"), cs[:-1]):
                    n.name(c, role)

    # Weight projections out of embed: mlp (comes back to embed) or vocab (the logits).
    for node in a.equations:
        if not a.is_weight_matmul(node):
            continue
        w = a.weight_operand(node)
        if not any(n.cls(node.inputs[1 - w], d) in embed for d in contracted_dims(node, 1 - w)):
            continue
        for d in free_dims(node, w):
            c = n.cls(node.inputs[w], d)
            if n.role(c) is not None or _explained_by_products(n, c):
                continue
            if _returns_to_embed(a, n, node, c, embed):
                n.name(c, "mlp")
            elif _reaches_output(a, node.out):
                n.name(c, "vocab")

    # A cache written at the current positions: its long dimension is kv_length.
    for node in a.equations:
        if node.op == "dynamic_update_slice":
            operand, update = node.inputs[0], node.inputs[1]
            pairs = [(d, d) for d in range(len(operand.shape))]
        elif node.op.startswith("scatter"):
            operand, update = node.inputs[0], node.inputs[2]
            pairs = scatter_pairs(node)
        else:
            continue
        for du, do in pairs:
            if update.shape[du] != operand.shape[do] and (
                    update.shape[du] == 1 or n.role(n.cls(update, du)) == "length"):
                n.name(n.cls(operand, do), "kv_length")
    # A weight table cut to the prompt length (learned positions, `wpe[:T]`): positions.
    for piece, whole in syms.pieces.items():
        if n.role(piece) == "length" and n.role(whole) is None:
            n.name(whole, "positions")
    # A projection whose output dimension is cut apart (fused Q/K/V, stacked K/V): fused.
    cut = {syms.find(w) for w in syms.pieces.values()}
    for node in a.equations:
        if a.is_weight_matmul(node):
            w = a.weight_operand(node)
            for d in free_dims(node, w):
                c = n.cls(node.inputs[w], d)
                if n.role(c) is None and (c in cut or _is_indexed_apart(a, n, node.out, c)):
                    n.name(c, "fused")
    # Whatever is left: products of named classes, and parts of named classes (RoPE halves).
    factors_of, whole_of = syms.part_index()  # naming does not unify: valid throughout
    for _ in range(3):
        for c in list(_all_classes(n)):
            if n.role(c) is not None:
                continue
            fs = factors_of.get(c)
            if fs and all(n.role(f) for f in fs):
                n.name(c, "*".join(n.role(f) for f in fs))
                continue
            whole = whole_of.get(c)
            if whole is not None and n.role(whole) is not None:
                ratio = syms.size[whole] // syms.size[c]
                exact = ratio * syms.size[c] == syms.size[whole]
                n.name(c, f"{n.role(whole)}/{ratio}" if exact else f"part({n.role(whole)})")
    # Leading dimensions of caches in a Python-loop model: one entry per layer.
    n_layers = sum(1 for score, _, _ in attention if score.graph is g)
    if n_layers > 1:
        for v in list(g.inputs) + [o for o in g.outputs if isinstance(o, Value)]:
            cs = n.classes(v)
            if not a.is_weight(v) and cs and n.role(cs[0]) is None \
                    and syms.size[cs[0]] == n_layers:
                n.name(cs[0], "layers")


def _name_bare_ffn(a: Analysis, n: Namer) -> None:
    for node in a.equations:
        if not a.is_weight_matmul(node):
            continue
        w = a.weight_operand(node)
        hidden = {n.cls(node.inputs[w], d) for d in free_dims(node, w)}
        for u, _ in a.forward(node.out, max_depth=8):
            if u is node or not a.is_weight_matmul(u):
                continue
            uw = a.weight_operand(u)
            if not any(n.cls(u.inputs[1 - uw], d) in hidden
                       for d in contracted_dims(u, 1 - uw)):
                break
            act = node.inputs[1 - w]
            for d in contracted_dims(node, 1 - w):
                n.name(n.cls(act, d), "embed")
            for c in hidden:
                n.name(c, "mlp")
            for d in free_dims(u, uw):
                n.name(n.cls(u.inputs[uw], d), "embed")
            rest = [n.cls(act, d) for d in free_dims(node, 1 - w)]
            for role, c in zip(("batch", "length"), rest):
                n.name(c, role)
            return


def _explained_by_products(n: Namer, c: int) -> bool:
    fs = n.syms.factors(c)
    return bool(fs and all(n.role(f) for f in fs))


def _returns_to_embed(a: Analysis, n: Namer, node: Node, c: int, embed: set[int]) -> bool:
    """Whether a later weight matmul contracts class c and produces embed."""
    for u, _ in a.forward(node.out, max_depth=12):
        if u is node or not a.is_weight_matmul(u):
            continue
        w = a.weight_operand(u)
        if any(n.cls(u.inputs[1 - w], d) == c for d in contracted_dims(u, 1 - w)):
            return any(n.cls(u.inputs[w], d) in embed for d in free_dims(u, w))
    return False


def _reaches_output(a: Analysis, v: Value) -> bool:
    """Whether v is returned, possibly through elementwise and layout operations (logits), but
    not by way of a cache write or another matmul."""
    frontier, seen = [v], {v.id}
    for _ in range(10):
        nxt = []
        for x in frontier:
            if x.id in a.outputs:
                return True
            for u in a.users(x):
                if u.op in _NOT_TO_LOGITS or u.regions:
                    continue
                for o in u.outputs:
                    if o.id not in seen:
                        seen.add(o.id)
                        nxt.append(o)
        frontier = nxt
    return False


_NOT_TO_LOGITS = frozenset({"dynamic_update_slice", "scatter", "dot_general", "concatenate",
                            "stack", "split", "slice", "dynamic_slice", "gather"})


def _is_indexed_apart(a: Analysis, n: Namer, v: Value, c: int) -> bool:
    for u, _ in a.forward(v, max_depth=4):
        if u.op in ("slice", "split", "dynamic_slice", "gather"):
            x = u.inputs[0]
            if isinstance(x, Value) and c in n.classes(x) and all(
                    c not in n.classes(o) for o in u.outputs):
                return True
    return False


def _all_classes(n: Namer):
    seen = set()
    for dims in n.dims.values():
        for s in dims:
            r = n.syms.find(s)
            if r not in seen:
                seen.add(r)
                yield r


__all__ = ["Namer", "key_operand_by_axes", "name_roles"]
