"""The example of docs/ir.md: trace a bare attention function, label its axes, find its block.

    python docs/examples/attention_axes.py
"""

import jax
import jax.numpy as jnp
from meshwright.passes import PassManager

import meshwright as mw


def attention(x, wq, wk, wv, wo):
    q = jnp.einsum("bte,ehd->bthd", x, wq)
    k = jnp.einsum("bte,ehd->bthd", x, wk)
    v = jnp.einsum("bte,ehd->bthd", x, wv)
    p = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
    return jnp.einsum("bhts,bshd,hde->bte", p, v, wo)


B, T, E, H, D = 2, 8, 32, 4, 8
args = (jnp.ones((B, T, E)), jnp.ones((E, H, D)), jnp.ones((E, H, D)), jnp.ones((E, H, D)),
        jnp.ones((H, D, E)))

g = mw.trace(attention, *args)
print("# traced")
print(g)
g = PassManager(["infer-axes", "find-blocks"]).run(g)
print("\n# after infer-axes and find-blocks")
print(g)
print("\nroles:", g.meta["axes"].sizes)
print("blocks:", g.meta["blocks"].to_list())
print()
print(g.format_summary())
