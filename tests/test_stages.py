"""Pipeline stages across nodes, lowered (passes/stages.py), on 8 devices of one process taken
as 2 nodes of 4 by a `cpu` profile: each stage holds its layers' weights and KV cache, the
batch runs in microbatches, the activations hop between the stages, and the result equals
the unsharded function. The same over 2 processes x 4 devices is in test_distributed.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes.hardware import CPU_DEFAULT
from meshwright.passes.hlo import collective_bytes

import meshwright as mw

NODES_OF_4 = CPU_DEFAULT.replace(max_chips=4)


def max_err(out, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))


@pytest.fixture(scope="module")
def palm():
    return build(get_config("palm-tiny").replace(scan_layers=True))


@pytest.fixture(scope="module")
def decode(palm):
    args = palm.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(11))
    step = mw.shard(palm.decode_step, hardware=NODES_OF_4,
                    force={"cross_node": "pipeline", "microbatches": 2})
    return step, args, jax.jit(palm.decode_step)(*args)


def test_decode_in_two_stages_equals_one_device(decode):
    step, args, want = decode
    assert max_err(step(*args), want) < 2e-5
    c = step.compiled(*args)
    assert (c.plan.cross_node.kind, c.plan.cross_node.stages) == ("pipeline", 2)
    assert c.jax_mesh.axis_names == ("stage", "x", "y", "z")
    devices = jax.devices()
    assert [sorted(devices.index(d) for d in c.jax_mesh.devices[s].flat) for s in (0, 1)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    text = step.explain(*args)
    assert "lowered as 2 pipeline stages" in text and "2 microbatches of 4 rows" in text
    assert "pipeline 2 stages x 2 mb" in text and "'microbatches': 2" in text


def test_each_stage_holds_only_its_layers(decode, palm):
    """The stacked weights and the KV cache are split over `stage` along the layers: a device
    of stage s holds layer s (palm-tiny has 2) and nothing of the other; the embedding is on
    every stage."""
    step, args, _ = decode
    c = step.compiled(*args)
    flat, _ = jax.tree.flatten(args)
    placed = c.place(flat)
    names = list(c.arguments)
    stacked = [k for k, name in enumerate(names) if ".layers." in name or "cache" in name]
    assert len(stacked) == 10  # 8 stacked weights, K and V
    for k in stacked:
        x = placed[k]
        assert x.sharding.spec[0] in ("stage", ("stage",)) or x.sharding.spec[0][0] == "stage"
        for shard in x.addressable_shards:
            stage = jax.devices().index(shard.device) // 4
            assert shard.data.shape[0] == 1
            assert np.array_equal(np.asarray(shard.data)[0],
                                  np.asarray(flat[k])[stage][shard.index[1:]])
    embedding = placed[names.index("params.embedding")]
    assert "stage" not in str(embedding.sharding.spec)


def test_only_activations_and_outputs_cross_the_stages(decode):
    """In the compiled HLO the collectives between the nodes are the activations sent to the
    next stage every iteration and the last stage's outputs sent back once: their bytes are
    the lowering's records over `stage` (each sent by one of the two stages: half of the
    devices), and nothing else crosses."""
    step, args, _ = decode
    c = step.compiled(*args)
    hlo = c.compiled.as_text()
    counted = collective_bytes(hlo, nodes=[jax.devices().index(d) // 4
                                           for d in c.jax_mesh.devices.flat])
    on_stage = [r for r in c.records if r.axes == ("stage",)]
    assert {r.kind for r in on_stage} == {"collective-permute"}
    assert {r.note for r in on_stage} == {"pipeline activations", "pipeline outputs"}
    assert counted["slow"] == pytest.approx(sum(r.bytes for r in on_stage) / 2)
    assert set(counted["slow_by_kind"]) == {"collective-permute"}
    # as the model counts them: 2 hops of a microbatch's activations from stage 0 and
    # the logits once from stage 1, each chip of a node sending its share (per device of both
    # stages, averaged)
    assert counted["slow"] == pytest.approx(c.plan.cross_node.slow_bytes_per_chip)


def test_prefill_in_microbatches(palm):
    args = palm.example_args("prefill", batch=4, length=8, key=jax.random.PRNGKey(3))
    step = mw.shard(palm.prefill, hardware=NODES_OF_4,
                    force={"cross_node": "pipeline", "microbatches": 4})
    assert max_err(step(*args), jax.jit(palm.prefill)(*args)) < 2e-5
    assert "4 microbatches of 1 rows, 5 iterations" in step.explain(*args)


def test_the_planner_picks_stages_when_a_copy_does_not_fit_a_node(palm, decode):
    """Nothing pinned, chips too small for a copy of palm-tiny per node: the planner's best
    is 2 stages (no replicas fit), and that runs."""
    _, args, want = decode
    step = mw.shard(palm.decode_step, hardware=NODES_OF_4.replace(hbm_bytes=150_000))
    assert max_err(step(*args), want) < 2e-5
    x = step.compiled(*args).plan.cross_node
    assert (x.kind, x.replicas, x.stages) == ("pipeline", 1, 2)


def test_two_replicas_of_two_stages(palm, decode):
    """4 nodes of 2 whose chips hold too little for a copy of the weights on one node: the
    planner's best is 2 replicas of a 2-stage pipeline, and that runs on a (replica, stage,
    x, y, z) mesh, replica r's stage s on node 2r + s, equal to one device; between the nodes
    only the stages' hops and the outputs' return, as priced."""
    _, args, want = decode
    step = mw.shard(palm.decode_step, hardware=CPU_DEFAULT.replace(max_chips=2,
                                                                   hbm_bytes=300_000))
    assert max_err(step(*args), want) < 2e-5
    c = step.compiled(*args)
    x = c.plan.cross_node
    assert (x.kind, x.replicas, x.stages) == ("pipeline", 2, 2)
    assert c.jax_mesh.axis_names == ("replica", "stage", "x", "y", "z")
    devices = jax.devices()
    nodes = [[sorted({devices.index(d) // 2 for d in c.jax_mesh.devices[r, s].flat})
              for s in (0, 1)] for r in (0, 1)]
    assert nodes == [[[0], [1]], [[2], [3]]]
    counted = collective_bytes(c.compiled.as_text(),
                               nodes=[devices.index(d) // 2 for d in c.jax_mesh.devices.flat])
    assert counted["slow"] == pytest.approx(x.slow_bytes_per_chip)
    assert "lowered as 2 replicas of 2 pipeline stages" in step.explain(*args)


def test_a_python_loop_of_layers_is_not_split(decode):
    """Layers written as a Python loop (separate arrays per layer) have no layer dimension to
    split: pinned, a pipeline is refused with the reason; planned, the best way that lowers
    runs and the plan says why the pipeline did not."""
    _, _, _ = decode
    model = build(get_config("palm-tiny"))
    args = model.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(11))
    pinned = mw.shard(model.decode_step, hardware=NODES_OF_4, force={"cross_node": "pipeline"})
    with pytest.raises(ValueError, match=r"needs the layers in one jax.lax.scan"):
        pinned(*args)
    planned = mw.shard(model.decode_step, hardware=NODES_OF_4.replace(hbm_bytes=150_000))
    assert max_err(planned(*args), jax.jit(model.decode_step)(*args)) < 2e-5
    text = planned.explain(*args)
    assert "mw.shard does not lower it (a pipeline needs the layers in one jax.lax.scan" in text


def test_bad_pins(palm, decode):
    _, args, _ = decode
    with pytest.raises(ValueError, match=r"force\['microbatches'\] must be a positive int"):
        mw.shard(palm.decode_step, force={"microbatches": 0})
    with pytest.raises(ValueError, match=r"unknown way across nodes 'pipe'"):
        mw.shard(palm.decode_step, force={"cross_node": "pipe"})
    step = mw.shard(palm.decode_step, hardware=NODES_OF_4,
                    force={"cross_node": "pipeline", "microbatches": 3})
    with pytest.raises(ValueError, match=r"pipeline over 2 nodes: the batch 8 does not split "
                                         r"into 3 microbatches"):
        step(*args)
    one_node = mw.shard(palm.decode_step, force={"microbatches": 2})
    with pytest.raises(ValueError, match=r"pins a pipeline's microbatches, but this runs on "
                                         r"one node"):
        one_node(*args)


def test_a_pipeline_program_exports_and_runs_from_its_file(decode, tmp_path):
    """The artifact carries the (stage, x, y, z) mesh: loaded back, it runs on 8 devices
    (stage s on the s-th block of 4) and equals the function."""
    step, args, want = decode
    step.export(*args, platforms=("cpu",)).save(tmp_path / "decode.mwx")
    program = mw.load_exported(tmp_path / "decode.mwx")
    assert program.manifest["mesh"] == {"stage": 2, "x": 1, "y": 1, "z": 4}
    assert program.manifest["devices"] == 8
    assert max_err(program(*args), want) < 2e-5


def test_plan_cli_pins_microbatches(capsys):
    from meshwright.cli import main

    args = ["plan", "--model", "llama3-405b", "--hardware", "h100", "--chips", "16",
            "--cross-node", "pipeline"]
    assert main([*args, "--microbatches", "4"]) == 0
    assert "pipeline 2 stages x 4 mb" in capsys.readouterr().out
    assert main([*args, "--microbatches", "5"]) == 2
    err = capsys.readouterr().err
    assert "the batch 64 does not split into 5 microbatches" in err
    assert "Traceback" not in err
