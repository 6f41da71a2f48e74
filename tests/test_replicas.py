"""Replicas across nodes, lowered (passes/replicas.py), on 8 devices of one process taken as
nodes by a `cpu` profile whose node holds fewer devices: the batch split over a `replica`
mesh axis, each replica the planned layout on its node(s), equal to the unsharded function,
and nothing but the inputs and outputs between replicas (counted in the compiled HLO). The
same over 2 processes x 4 devices is in test_distributed.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes.hardware import CPU_DEFAULT
from meshwright.passes.hlo import collective_bytes, replica_groups

import meshwright as mw


@pytest.fixture(scope="module")
def palm():
    model = build(get_config("palm-tiny").replace(scan_layers=True))
    args = model.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(11))
    return model, args, jax.jit(model.decode_step)(*args)


def nodes_of(c, per_node: int) -> list[int]:
    """The node of each of the program's devices (the mesh's, in order): blocks of
    `per_node` consecutive devices of this process."""
    devices = jax.devices()
    return [devices.index(d) // per_node for d in c.jax_mesh.devices.flat]


def max_err(out, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))


@pytest.fixture(scope="module")
def two_replicas(palm):
    return mw.shard(palm[0].decode_step, hardware=CPU_DEFAULT.replace(max_chips=4))


def test_two_replicas_one_per_node(palm, two_replicas):
    """2 nodes of 4: the planner's best is 2 replicas (nothing crosses the slow network);
    mw.shard runs them: the batch over `replica`, the weights copied, equal to one device."""
    _, args, want = palm
    step = two_replicas
    out = step(*args)
    assert max_err(out, want) < 2e-5
    c = step.compiled(*args)
    assert c.plan.cross_node.kind == "replicas" and c.plan.cross_node.replicas == 2
    best = c.plan.best.mesh
    assert dict(c.jax_mesh.shape) == {"replica": 2, "x": best.x, "y": best.y, "z": best.z}
    # replica r holds node r's devices; the logits' batch is split over it first
    devices = jax.devices()
    assert [sorted(devices.index(d) for d in c.jax_mesh.devices[r].flat) for r in (0, 1)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert out[0].sharding.spec[0][:1] == ("replica",) or out[0].sharding.spec[0] == "replica"
    weight = c.place(jax.tree.leaves(args))[0]  # the embedding: a copy per replica
    assert "replica" not in str(weight.sharding.spec)
    counted = collective_bytes(c.compiled.as_text(), nodes=nodes_of(c, 4))
    assert counted["total"] > 0 and counted["slow"] == 0 == c.plan.cross_node.slow_bytes_per_chip
    text = step.explain(*args)
    assert "chosen: 2 replicas" in text and "lowered as 2 replicas" in text
    assert "does not lower" not in text
    assert step.report(*args)["layouts"]["mesh"]["replica"] == 2


def test_replicas_of_a_layout_stretched_over_two_nodes(palm):
    """4 nodes of 2 whose chips hold too little for a copy of the weights on one node, 2
    replicas each stretched over 2 nodes pinned (the planner's best is 2 replicas of a 2-stage
    pipeline: tests/test_stages.py): it runs and says so. Collectives cross the nodes of a
    replica as priced, never between replicas."""
    model, args, want = palm
    hw = CPU_DEFAULT.replace(max_chips=2, hbm_bytes=300_000)
    step = mw.shard(model.decode_step, hardware=hw, force={"cross_node": "stretched"})
    assert max_err(step(*args), want) < 2e-5
    c = step.compiled(*args)
    x = c.plan.cross_node
    assert (x.kind, x.replicas, c.jax_mesh.shape["replica"]) == ("stretched", 2, 2)
    assert sum(k > 1 for k in c.slow) == 1  # one axis runs over the replica's 2 nodes
    text = step.explain(*args)
    assert "forced by the caller: {'cross_node': 'stretched'}" in text
    # nodes simulated as blocks of this process's devices, and said so
    assert "over 2 nodes (each node a block of this process's devices)" in text
    nodes = nodes_of(c, 2)
    hlo = c.compiled.as_text()
    counted = collective_bytes(hlo, nodes=nodes)
    assert counted["slow"] == pytest.approx(x.slow_bytes_per_chip, rel=0.1)
    replica = [p // (len(nodes) // 2) for p in range(len(nodes))]  # positions: replica-major
    for line in hlo.splitlines():
        if "replica_groups=" in line:
            assert all(len({replica[d] for d in g}) == 1 for g in replica_groups(line, 8)), line


def test_hlo_groups_and_bytes_across_nodes():
    line = ("%ag = f32[8,4]{1,0} all-gather(f32[4,4]{1,0} %p), channel_id=1, "
            "replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true")
    assert replica_groups(line, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    hlo = f"ENTRY %main (p: f32[4,4]) -> f32[8,4] {{\n  %p = f32[4,4]{{1,0}} parameter(0)\n" \
          f"  ROOT {line[1:]}\n}}\n"
    # each pair spans both nodes: half of the 128-byte output crosses
    assert collective_bytes(hlo, nodes=[0, 0, 0, 0, 1, 1, 1, 1])["slow"] == 64
    assert collective_bytes(hlo, nodes=[0, 1, 2, 3, 0, 1, 2, 3])["slow"] == 0


def test_outputs_without_the_batch_refuse_replicas(palm):
    model, args, _ = palm

    def with_total(*a):
        logits, cache = model.decode_step(*a)
        return logits, cache, jnp.sum(logits)  # mixes the rows of every replica

    step = mw.shard(with_total, hardware=CPU_DEFAULT.replace(max_chips=4))
    with pytest.raises(ValueError, match=r"replicas: output 3 \[\] is not the replica's output"):
        step.lower(*args)


def test_a_replicas_program_exports_and_runs_from_its_file(palm, two_replicas, tmp_path):
    """The artifact carries the (replica, x, y, z) mesh: loaded back, it runs on 8 devices
    and equals the function."""
    _, args, want = palm
    two_replicas.export(*args, platforms=("cpu",)).save(tmp_path / "decode.mwx")
    program = mw.load_exported(tmp_path / "decode.mwx")
    assert program.manifest["mesh"] == {"replica": 2, "x": 1, "y": 1, "z": 4}
    assert max_err(program(*args), want) < 2e-5
