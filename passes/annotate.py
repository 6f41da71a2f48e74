"""Pass `annotate`: the shardings a layout asks for, written on the graph.

From the plan's FFN and attention layout and the dimension roles, it decides:

- every input's spec: weights in their stored layout (`E_x F_zy`, heads like F; ws-1d:
  `E F_xyz`), token ids and caches by their roles (a cache over batch for attention "batch");
- the spec of every projection's output: hidden roles (`mlp`, `heads`, ...) as the layout's
  hidden activations, `embed` back in the residual layout;
- the spec every attention score/value matmul wants its operands in (heads or batch);
- the weights the weight-gathered layouts gather before use;
- the outputs: logits replicated, caches in the spec they came in.

Only these anchors are chosen; `lower` propagates specs through everything else with
per-primitive rules and emits the collectives where an anchor differs. Analyses only
annotate; the lowering asserts what it needs.

Results: `node.meta["target"]` (per output), `node.meta["operand_target"]` ({operand: spec}),
`graph.meta["in_specs"]`, `graph.meta["out_specs"]`, `graph.meta["layout"]`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshwright.ir import Graph, Literal, Node, Value
from meshwright.passes.analysis import Analysis, analyze
from meshwright.passes.base import Pass, PassContext, register
from meshwright.passes.sharding import Layout, MeshInfo, Spec, make_layout, spec_for

_HIDDEN_ROLES = ("mlp", "heads", "kv_heads", "fused", "groups")


def _roles(v: Value) -> tuple:
    return v.producer.meta["axes"][v.index]


def _is_hidden(role: str | None) -> bool:
    return role is not None and any(h in role for h in _HIDDEN_ROLES)


def _hidden_map(layout: Layout, roles) -> dict:
    """Role -> axes for a value inside a block: hidden roles (and products of them) as the
    layout's hidden activations, batch as the residual."""
    m = {"batch": layout.residual.get("batch", ())}
    for r in roles:
        if r is None:
            continue
        base = r.split("*")[0]
        if base in layout.hidden:
            m[r] = layout.hidden[base]
    return m


def _attention_map(layout: Layout, roles) -> dict:
    if layout.attention_splits_batch:
        return {"batch": layout.attention_batch}
    return _hidden_map(layout, roles)


def _logits_map(layout: Layout, roles) -> dict:
    """Role -> axes for logits: the residual's batch (also on tokens merged with it,
    `batch*length`: a prefill's (B*T, V) logits keep B split as the residual had it), the
    table's vocabulary."""
    return _weight_map({"batch": layout.residual.get("batch", ()),
                        "vocab": layout.stored.get("vocab", ())}, roles)


def _weight_map(table: dict, roles) -> dict:
    m = {}
    for r in roles:
        if r is None:
            continue
        base = r.split("*")[0]
        if base in table:
            m[r] = table[base]
    return m


def _heads_axes(g: Graph, a: Analysis, layout: Layout, mesh: MeshInfo) -> tuple:
    """The mesh axes that split the query heads as the projections use them: the layout's,
    less the minor ones the head count does not divide (PaLM 540B's 48 heads take (x, y) of
    ws-1d's (x, y, z) on 4x4x4). None when no weight has a query-heads dimension."""
    for v in g.inputs:
        if not a.is_weight(v):
            continue
        for role, size in zip(_roles(v), v.shape):
            if role is not None and role.split("*")[0] == "heads":
                return spec_for((role,), (size,), _weight_map(layout.use, (role,)),
                                mesh).dims[0]
    return None


def attention_batch_order(g: Graph, a: Analysis, layout: Layout,
                          mesh: MeshInfo) -> tuple:
    """The batch axes inside batch-sharded attention, ordered so that the axes splitting the
    query heads come last: the heads then move onto batch with one all-to-all of minor axes
    (and back the same way), and the axes the heads cannot take are sliced or reduce-scattered
    onto batch first. ws-1d with 16 heads on 4x4x4: (z, x, y); ws-2d: (x, z, y) as laid out."""
    order = tuple(a for a in layout.attention_batch if mesh.sizes.get(a, 1) > 1)
    heads = _heads_axes(g, a, layout, mesh)
    if not heads or not set(heads) <= set(order):
        return order
    return tuple(a for a in order if a not in heads) + tuple(heads)


def _groups_take_rest(spec: Spec, v: Value, layout: Layout, mesh: MeshInfo) -> Spec:
    """Grouped-query attention over heads, (B, K, G, T, D): the query groups G take the heads
    axes the K kv heads cannot (2 kv heads over x, their groups over (y, z)), as the
    reshape that made them split them, instead of being gathered."""
    roles = _roles(v)
    if layout.attention_splits_batch or "groups" not in roles or "kv_heads" not in roles:
        return spec
    g = roles.index("groups")
    heads = tuple(a for a in layout.hidden.get("heads", ()) if mesh.sizes.get(a, 1) > 1)
    rest = tuple(a for a in heads if a not in spec.used())
    if spec.dims[g] or not rest or not spec.dims[roles.index("kv_heads")] or \
            v.shape[g] % mesh.count(rest):
        return spec
    dims = list(spec.dims)
    dims[g] = rest
    return spec.with_dims(dims)


def _weight_spec(v: Value, layout: Layout, mesh: MeshInfo, table: dict) -> Spec:
    """A weight's spec from a role table (`layout.stored`, or `layout.use` for a gathered
    weight in use); the embedding table by rows only. A K or V weight whose KV heads take
    fewer of the table's heads axes than there are (multiquery: one head) splits its
    head_dim over the rest, so it stays split over every chip as the cost model stores it
    (2KD/YZ per chip) and a weight-gathered layout gathers only its share. Not under ws-1d:
    there every chip holds the whole input and computes the single K/V head itself from
    replicated K/V weights, which is what the model prices (no K/V collective)."""
    roles = _roles(v)
    if "vocab" in roles:  # the table is split by rows only
        return spec_for(roles, v.shape, {"vocab": table.get("vocab", ())}, mesh)
    spec = spec_for(roles, v.shape, _weight_map(table, roles), mesh)
    if "head_dim" not in roles or layout.whole_input or any(
            r is not None and r.split("*")[0] == "heads" for r in roles):
        return spec  # query and output weights keep their heads' split
    used = spec.used()
    rest = tuple(a for a in table.get("heads", ()) if a not in used)
    d = roles.index("head_dim")
    if rest and not spec.dims[d]:
        dims = list(spec.dims)
        dims[d] = spec_for(("head_dim",), (v.shape[d],), {"head_dim": rest}, mesh).dims[0]
        spec = spec.with_dims(dims)
    return spec


def input_spec(v: Value, weight: bool, layout: Layout, mesh: MeshInfo) -> Spec:
    """The spec of one graph input under `layout`: a weight as stored, a KV cache as attention
    holds it, anything else (token ids, positions, activations) as the residual stream."""
    roles = _roles(v)
    if weight:
        return _weight_spec(v, layout, mesh, layout.stored)
    if "kv_length" in roles and len(v.shape) >= 4:  # a KV cache
        return spec_for(roles, v.shape, _attention_map(layout, roles), mesh)
    return spec_for(roles, v.shape, layout.residual, mesh)


def annotate(g: Graph, layout: Layout, mesh: MeshInfo) -> None:
    a = analyze(g)
    if layout.attention_splits_batch:
        layout = replace(layout, attention_batch=attention_batch_order(g, a, layout, mesh))
    g.meta["layout"] = layout
    # Inputs.
    in_specs = []
    for v in g.inputs:
        spec = input_spec(v, a.is_weight(v), layout, mesh)
        v.producer.meta["target"] = [spec]
        in_specs.append(spec)
    g.meta["in_specs"] = in_specs
    _annotate_body(g, a, layout, mesh)
    # Outputs: a value shaped like an input cache keeps that input's spec; the rest replicated.
    by_shape = {}
    for v, spec in zip(g.inputs, in_specs):
        if not a.is_weight(v) and not spec.is_replicated():
            by_shape.setdefault((v.shape, _roles(v)), spec)
    out_specs = []
    for o in g.outputs:
        if isinstance(o, Literal):
            out_specs.append(Spec.replicated(len(o.shape)))
            continue
        if (o.shape, _roles(o)) in by_shape:
            out_specs.append(by_shape[(o.shape, _roles(o))])
        elif "vocab" in _roles(o):  # logits stay split over the vocabulary (no gather)
            out_specs.append(spec_for(_roles(o), o.shape, _logits_map(layout, _roles(o)),
                                      mesh))
        else:
            out_specs.append(Spec.replicated(len(o.shape)))
    g.meta["out_specs"] = out_specs


def _annotate_body(g: Graph, a: Analysis, layout: Layout, mesh: MeshInfo) -> None:
    attention = {}
    for score, value in a.attention:
        attention[score.id] = score
        attention[value.id] = value
    for node in [n for n, _ in g.walk()]:
        if node.op == "dot_general":
            _annotate_dot(node, a, layout, mesh, node.id in attention)
        elif node.meta.get("fused_sum"):  # a parallel block's two outputs, reduced once
            node.meta["target"] = [spec_for(_roles(node.out), node.out.shape, layout.residual,
                                            mesh)]
        elif node.op == "gather" and a.is_weight(node.inputs[0]):
            roles = _roles(node.out)
            node.meta["target"] = [spec_for(roles, node.out.shape, layout.residual, mesh)]


def _annotate_dot(node: Node, a: Analysis, layout: Layout, mesh: MeshInfo,
                  is_attention: bool) -> None:
    weights = [k for k, v in enumerate(node.inputs) if a.is_weight(v)]
    out_roles = _roles(node.out)
    if is_attention:
        node.meta["operand_target"] = {
            k: _groups_take_rest(spec_for(_roles(v), v.shape, _attention_map(layout, _roles(v)),
                                          mesh), v, layout, mesh)
            for k, v in enumerate(node.inputs)}
        return
    if len(weights) != 1:
        return
    w = weights[0]
    wv = node.inputs[w]
    # Weight-gathered layouts gather a layer's weights before use; the embedding table (used
    # by the tied unembedding) stays where it is.
    if layout.weight_gather_axes() and "vocab" not in _roles(wv):
        node.meta["operand_target"] = {w: _weight_spec(wv, layout, mesh, layout.use)}
    if node.meta.get("fused_output"):  # stays partial: reduced once with its partner
        return
    if "vocab" in out_roles:  # the logits: split over the vocabulary like the table
        target = spec_for(out_roles, node.out.shape, _logits_map(layout, out_roles), mesh)
    elif "embed" in out_roles:  # a projection back to the model width
        target = spec_for(out_roles, node.out.shape, layout.residual, mesh)
    elif layout.attention_splits_batch and any(
            r is not None and r.split("*")[0] in ("heads", "kv_heads", "groups", "head_dim")
            for r in out_roles):
        # Q, K, V under attention over batch go straight to attention's layout: partial sums
        # reduce-scatter onto batch and the heads follow with one all-to-all (the model's
        # "Q,K,V heads->batch"), before RoPE, instead of through the hidden layout
        target = spec_for(out_roles, node.out.shape, _attention_map(layout, out_roles), mesh)
    elif any(_is_hidden(r) for r in out_roles):
        target = spec_for(out_roles, node.out.shape, _hidden_map(layout, out_roles), mesh)
    else:  # e.g. multiquery K/V (no head axis): batch only
        target = spec_for(out_roles, node.out.shape,
                          {"batch": layout.residual.get("batch", ())}, mesh)
    node.meta["target"] = [target]


class _AnySplitFits(MeshInfo):
    """A mesh on which every split divides: the specs a layout asks for before sizes that do
    not divide drop axes (`spec_for`)."""

    def fits(self, size: int, axes) -> bool:
        return True


def unsplit_inputs(g: Graph, layout: Layout, mesh: MeshInfo, weight_ids: set,
                   paths: tuple[str, ...] = ()) -> list[str]:
    """Inputs with a dimension the layout splits over mesh axes that ends up whole on every
    device (its size does not divide by theirs): replicated where the plan (and the cost
    model's prediction) has it split. A dimension that keeps some of its axes (48 heads on
    4x4x4 take x and y of x, y, z) is split as the planner priced it, and not listed.
    `paths` names the inputs (the caller's argument paths)."""
    out = []
    for i, (v, actual) in enumerate(zip(g.inputs, g.meta["in_specs"])):
        wanted = input_spec(v, v.id in weight_ids, layout, _AnySplitFits(mesh.sizes))
        roles = v.producer.meta["axes"][v.index]
        for d, (want, got) in enumerate(zip(wanted.dims, actual.dims)):
            if want and not got:
                name = paths[i] if i < len(paths) else f"argument {i}"
                n = mesh.count(want)
                out.append(f"{name} {v.dtype}{list(v.shape)}: dimension {d} "
                           f"({roles[d] or '?'}, {v.shape[d]}) is not split over "
                           f"{', '.join(want)} ({n} devices) as {layout.ffn}/"
                           f"{layout.attention} plans: {v.shape[d]} does not divide by {n}; "
                           "every device holds all of it")
    return out


@register
@dataclass(frozen=True)
class Annotate(Pass):
    """Shardings the plan's layouts ask for: inputs, projections, attention operands, outputs.
    Reads the layouts and mesh `plan` chose (`ctx.results`); writes the specs on the graph,
    `ctx.results.layout`, and lists the inputs that do not divide as planned in
    `ctx.results.fallbacks` (`ctx.strict`: NotAsPlanned instead)."""

    name = "annotate"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        from meshwright.passes.plan import NotAsPlanned

        choice, mesh = ctx.results.choice, ctx.results.mesh
        if choice is None or mesh is None:
            raise ValueError("annotate needs the layouts and the mesh: run 'plan' first")
        weights = set(analyze(graph).weights)
        graph.meta["weight_values"] = weights  # what `lower` treats as weights
        annotate(graph, make_layout(choice.ffn, choice.attention), mesh)
        ctx.results.layout = graph.meta["layout"]
        unsplit = unsplit_inputs(graph, ctx.results.layout, mesh, weights, ctx.arguments)
        if ctx.strict and unsplit:
            raise NotAsPlanned(unsplit)
        ctx.results.fallbacks += unsplit
        return graph
