"""The examples of docs/passes/*.md that are not a `meshwright inspect` command: what annotate
writes, fuse-parallel-block's before -> after and its collectives, collective-einsum on a toy
feed-forward block.

    python docs/examples/pass_pages.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from meshwright.ir.diff import diff_text
from meshwright.models import build, get_config
from meshwright.passes import PassManager, get_pass
from meshwright.passes.collective_einsum import CollectiveEinsum
from meshwright.passes.hlo import collective_bytes
from meshwright.passes.plan import config_from_graph, workload_from_graph

import meshwright as mw


def ffn(x, w_in, w_out):
    return x + jax.nn.relu(x @ w_in) @ w_out


k = jax.random.split(jax.random.PRNGKey(0), 3)
toy = (jax.random.normal(k[0], (4, 16)), jax.random.normal(k[1], (16, 64)) / 4,
       jax.random.normal(k[2], (64, 16)) / 8)

print("== plan: palm-tiny decode (batch 8) traced, planned for 8 simulated CPU devices")
model = build(get_config("palm-tiny").replace(scan_layers=True))
args = model.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(0))
g = PassManager(["infer-axes", "find-blocks"]).run(mw.trace(model.decode_step, *args))
print(config_from_graph(g))
print(workload_from_graph(g))
g = PassManager([get_pass("plan", hardware="cpu", chips=8)], verify=True).run(g)
print("\n".join(g.meta["plan"].explain().splitlines()[:16]))

print("\n== annotate: the anchors it writes (ws-2d, heads, 2x2x2), toy FFN")
step = mw.shard(ffn, force={"ffn": "ws-2d", "attention": "heads", "mesh": (2, 2, 2)})
g = step.graph(*toy, after="annotate")
for v, spec in zip(g.inputs, g.meta["in_specs"]):
    print(f"  input  %{v.producer.params['path']:8} {spec}")
for node, _ in g.walk():
    for key in ("operand_target", "target"):
        if key in node.meta:
            value = node.meta[key]
            text = {k: str(v) for k, v in value.items()} if isinstance(value, dict) else \
                [str(v) for v in value]
            print(f"  {node.op} -> {node.out.shape} {key}: {text}")
print(f"  outputs {[str(s) for s in g.meta['out_specs']]}")

print("\n== fuse-parallel-block: palm-tiny (layers as a scan), decode")
g = PassManager(["infer-axes", "find-blocks"]).run(mw.trace(model.decode_step, *args))
before = str(g)
g = PassManager(["fuse-parallel-block"], verify=True).run(g)
print(diff_text(before, str(g), "find-blocks", "fuse-parallel-block"))
force = {"ffn": "ws-2d", "attention": "heads", "mesh": (2, 2, 2)}
want = jax.jit(model.decode_step)(*args)
for name, passes in (("fused", None), ("not fused", ["infer-axes", "find-blocks"])):
    s = mw.shard(model.decode_step, force=force, passes=passes)
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(s(*args)),
                                                            jax.tree_util.tree_leaves(want)))
    r = s.report(*args)["collective_bytes"]
    print(f"  {name:9}: reduce-scatters {r['count'].get('reduce-scatter', 0)}, "
          f"{r['by_kind'].get('reduce-scatter', 0)} B; all collectives {r['measured']} B; "
          f"max |error| {err:.1e}")

print("\n== collective-einsum: the toy FFN, ws-1d over 8 devices, forced on")
step = mw.shard(ffn, force={"ffn": "ws-1d", "attention": "heads", "mesh": (1, 1, 8)},
                collective_einsum=CollectiveEinsum(mode="on", direction="bidi"))
print("max |sharded - original| =", float(jnp.abs(step(*toy) - ffn(*toy)).max()))
print(step.diff(*toy))
print(step.graph(*toy, after="lower"))
plain = mw.shard(ffn, force={"ffn": "ws-1d", "attention": "heads", "mesh": (1, 1, 8)})
for name, s in (("plain", plain), ("looped", step)):
    counted = collective_bytes(s.compiled(*toy).compiled.as_text())
    print(f"  {name:6}: HLO {counted['count']}, {counted['wire']} B on the wire per device")
