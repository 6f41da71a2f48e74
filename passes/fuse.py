"""Pass `fuse-parallel-block`: one reduction for a parallel block's two outputs.

In a parallel block `y = x + attn(norm(x)) + mlp(norm(x))` (PaLM, GPT-J), the attention output
projection and the FFN down projection both produce partial sums over the same mesh axes.
Written as `(x + attn) + mlp`, each must be reduced before its add. Reassociated as
`x + (attn + mlp)`, the two partial sums add locally and one reduction (one reduce-scatter in
the 2D layouts) serves both:

    %a = dot_general %o %w_o          # partial over (z, y)       %a = dot_general %o %w_o
    %r1 = add %x %a                   # reduce-scatter here   ->  %b = dot_general %h %w_down
    %b = dot_general %h %w_down       # partial over (z, y)       %s = add %a %b   # one reduce-scatter
    %r2 = add %r1 %b                  # reduce-scatter here       %r2 = add %x %s

The input side needs no rewrite: the lowering gathers the shared normed input once for the
Q/K/V and FFN input projections. Serial blocks are left unchanged. The rewrite reassociates a
float sum: results change by rounding only (the tests hold it to float32 tolerance).
Marks: the two projections get `meta["fused_output"]`, the new sum `meta["fused_sum"]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from jax import lax
from meshwright.ir import Graph, Node, Value
from meshwright.passes.base import Pass, PassContext, register


def _single_add_user(g: Graph, v: Value) -> Node | None:
    users = g.users(v)
    if len(users) == 1 and users[0].op == "add" and not g.is_output(v):
        return users[0]
    return None


def _other(node: Node, v: Value):
    a, b = node.inputs
    return b if a is v else a


def fuse_parallel_blocks(g: Graph) -> int:
    """Reassociate every parallel block's residual sum; returns how many were fused."""
    blocks = g.meta.get("blocks")
    if blocks is None:
        raise ValueError("fuse-parallel-block needs 'find-blocks' first")
    attention = [b for b in blocks.of_kind("attention") if b.detail.get("parallel")]
    ffn = [b for b in blocks.of_kind("ffn") if b.detail.get("parallel")]
    fused = 0
    cleaned: set[int] = set()  # graphs with no dead code left but what a fusion orphans
    for att, mlp in zip(attention, ffn):
        out_proj = _last_weight_dot(att)
        down = _last_weight_dot(mlp)
        if out_proj is None or down is None or out_proj.graph is not down.graph:
            continue
        body = out_proj.graph
        a, b = out_proj.out, down.out
        # (x + a) + b  or  (x + b) + a
        for first, second in ((a, b), (b, a)):
            add1 = _single_add_user(body, first)
            if add1 is None:
                continue
            add2 = _single_add_user(body, add1.out)
            if add2 is None or _other(add2, add1.out) is not second:
                continue
            x = _other(add1, first)
            total = body.add_node(lax.add_p, [a, b], source=add2.source)
            result = body.add_node(lax.add_p, [x, total.out], source=add2.source)
            body.replace_all_uses_with(add2.out, result.out)
            # the first time a whole sweep, then only what this fusion orphaned (a sweep
            # per layer was quadratic in depth)
            body.eliminate_dead_code(None if id(body) not in cleaned else [add2])
            cleaned.add(id(body))
            total.meta["fused_sum"] = True
            total.meta["note"] = "fused parallel-block sum"
            for proj in (out_proj, down):
                proj.meta["fused_output"] = True
            for node in (total, result):
                node.meta["axes"] = add2.meta.get("axes")
            fused += 1
            break
    g.meta["fused_parallel_blocks"] = fused
    return fused


def _last_weight_dot(block) -> Node | None:
    dots = [n for n in block.nodes if n.op == "dot_general"]
    return dots[-1] if dots else None


@register
@dataclass(frozen=True)
class FuseParallelBlock(Pass):
    """One output reduction for the attention and FFN halves of a parallel block."""

    name = "fuse-parallel-block"

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        fuse_parallel_blocks(graph)
        return graph
