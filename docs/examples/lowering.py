"""The examples of docs/lowering.md: a 2D weight-stationary FFN lowered to a per-device
program, its collectives, and a picture of the layout (docs/img/layout_ws2d.png).

    python docs/examples/lowering.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

import meshwright as mw


def ffn(x, w_in, w_out):
    return jax.nn.gelu(x @ w_in) @ w_out


B, L, E, F = 8, 4, 64, 256
k = jax.random.split(jax.random.PRNGKey(0), 3)
args = (jax.random.normal(k[0], (B, L, E)), jax.random.normal(k[1], (E, F)) * 0.05,
        jax.random.normal(k[2], (F, E)) * 0.05)
step = mw.shard(ffn, force={"ffn": "ws-2d", "attention": "heads", "mesh": (2, 2, 2)})
out = step(*args)
print("max |sharded - original| =", float(jnp.abs(out - ffn(*args)).max()))
print()
print(step.graph(*args, after="lower"))
print()
c = step.compiled(*args)
print("collectives written by the lowering (bytes per device):")
for r in c.records:
    print(f"  {r.kind:15} over {','.join(r.axes):6} {r.bytes:6d}  ({r.note})")
rep = step.report(*args)["collective_bytes"]
print("counted in the compiled HLO:", rep["measured"], "bytes", rep["count"])

# A picture of the stored layout E_x F_zy on the 2x2x2 mesh: which device holds which block.
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover
    raise SystemExit("matplotlib is needed for the picture: pip install matplotlib")
placed = c.place(jax.tree_util.tree_leaves(args))[1]  # w_in, placed as the plan says
owner = np.zeros((E, F), dtype=int)
for shard in placed.addressable_shards:
    rows, cols = shard.index
    owner[rows, cols] = shard.device.id
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.imshow(owner, aspect="auto", cmap="tab10", interpolation="nearest")
for shard in placed.addressable_shards:
    rows, cols = shard.index
    ax.text((cols.start + cols.stop) / 2 - 0.5, (rows.start + rows.stop) / 2 - 0.5,
            f"dev {shard.device.id}", ha="center", va="center", fontsize=9, color="white")
ax.set_xlabel("F (d_ff): split over (z, y)")
ax.set_ylabel("E (d_model): split over x")
ax.set_title("w_in stored E_x F_zy on a 2x2x2 mesh (ws-2d): one block per device")
fig.tight_layout()
path = os.path.join(os.path.dirname(__file__), "..", "img", "layout_ws2d.png")
fig.savefig(path, dpi=110)
print("wrote", os.path.normpath(path))
