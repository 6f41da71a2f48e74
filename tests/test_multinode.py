"""Beyond one node: the two-level network model, what crosses the slow network, bad input."""

import json

import pytest
from meshwright.models.config import get_config
from meshwright.passes import cost_model as cm
from meshwright.passes.cost_model import CostOptions, Mesh, Workload, evaluate, factorizations
from meshwright.passes.hardware import get_hardware
from meshwright.passes.multinode import (
    NodeSplit,
    price_crossings,
    split_nodes,
    stretched_meshes,
)
from meshwright.passes.planner import plan

from meshwright.cli import main

H100 = get_hardware("h100")
LLAMA_405B = get_config("llama3-405b")
DECODE = Workload(batch=64, context=2048, phase="decode", weights="bf16")


# ---- the profiles and the preset ---------------------------------------------------------------


def test_profiles_have_a_network_between_nodes():
    assert (H100.max_chips, H100.max_nodes, H100.dcn_bandwidth) == (8, 128, 50e9)  # 400 Gb/s
    assert get_hardware("h200").dcn_bandwidth == H100.dcn_bandwidth
    assert get_hardware("a100").dcn_bandwidth == 25e9  # 200 Gb/s HDR per GPU
    assert get_hardware("tpu-v5e").dcn_bandwidth == 200e9 / 8 / 8  # 2 x 100 Gb/s per 8 chips
    for name in ("tpu-v4", "tpu-v5e", "h100", "h200", "a100", "cpu"):
        hw = get_hardware(name)
        assert hw.spans_nodes and hw.dcn_bandwidth < hw.ici_bandwidth and hw.dcn_name


def test_calibrated_cpu_file_without_network_fields_keeps_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWRIGHT_CACHE", str(tmp_path))
    old = get_hardware("cpu").to_dict()
    for f in ("max_nodes", "dcn_bandwidth", "dcn_efficiency", "dcn_latency_s", "dcn_name",
              "multinode_collective_s", "multinode_bandwidth"):
        old.pop(f)
    (tmp_path / "cpu.json").write_text(json.dumps({"profile": {**old, "source": "old file"}}))
    cpu = get_hardware("cpu")
    assert cpu.source == "old file" and cpu.spans_nodes
    assert (cpu.multinode_collective_s, cpu.multinode_bandwidth) == (3e-3, 50e6)  # defaults


def test_a_plain_calibration_keeps_the_network_measured_under_launch():
    from meshwright.passes.calibrate import keep_network, network_profile
    from meshwright.passes.hardware import CPU_DEFAULT, HardwareProfile

    network = {"processes": 2, "devices_per_process": 4, "time": 0.0,
               "bandwidth_per_device": 4.9e8, "latency_s": 6e-4,
               "in_node_collective_s": 2.5e-3, "in_node_bandwidth_per_device": 8e7}
    launched = network_profile(CPU_DEFAULT, network)
    assert (launched.dcn_bandwidth, launched.dcn_latency_s) == (4.9e8, 6e-4)
    # a collective among one process's devices, as the job over processes runs it
    assert (launched.multinode_collective_s, launched.multinode_bandwidth) == (2.5e-3, 8e7)
    fast = network_profile(CPU_DEFAULT, {**network, "in_node_bandwidth_per_device": 1e15})
    assert fast.multinode_bandwidth == CPU_DEFAULT.ici_bandwidth  # no faster than in-process
    assert launched.ici_bandwidth == CPU_DEFAULT.ici_bandwidth  # in-node figures kept
    plain = {"profile": CPU_DEFAULT.replace(ici_bandwidth=3e9, source="measured").to_dict()}
    kept = keep_network(plain, {"profile": launched.to_dict(), "network": network})
    p = HardwareProfile.from_dict(kept["profile"])
    assert (p.ici_bandwidth, p.dcn_bandwidth, p.dcn_latency_s) == (3e9, 4.9e8, 6e-4)
    assert (p.multinode_collective_s, p.multinode_bandwidth) == (2.5e-3, 8e7)
    assert p.source.startswith("measured; network between processes measured")
    assert kept["network"] == network
    assert keep_network(plain, None) is plain  # nothing measured before: nothing kept


def test_calibration_fits_what_a_collective_inside_a_process_costs():
    from meshwright.passes.calibrate import _fit

    rows = [{"model_bytes": b, "all_gather_s": 3e-3 + b / 5e7} for b in (768, 49152, 786432)]
    bandwidth, fixed, floor = _fit(rows)
    assert bandwidth == pytest.approx(5e7) and fixed == pytest.approx(3e-3)
    assert floor == pytest.approx(0.5 * (3e-3 + 768 / 5e7))
    # times that do not grow with the bytes: the median as the fixed part, and a lower
    # bound of the bandwidth (the largest bytes over the largest time)
    noisy = [{"model_bytes": b, "all_gather_s": t}
             for b, t in ((768, 5e-3), (49152, 3e-3), (786432, 4e-3))]
    assert _fit(noisy)[:2] == (pytest.approx(786432 / 5e-3), pytest.approx(4e-3))


def test_calibrate_under_launch_keeps_the_devices_launch_gave(monkeypatch):
    import argparse

    from meshwright.cli import devices_needed

    args = argparse.Namespace(command="calibrate", devices=8)
    assert devices_needed(args) == 8
    monkeypatch.setenv("MESHWRIGHT_NUM_PROCESSES", "2")
    assert devices_needed(args) == 0


def test_llama3_405b_preset_is_the_public_config():
    c = LLAMA_405B
    assert (c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.d_head, c.vocab_size) == (
        126, 16384, 53248, 128, 8, 128, 128256)
    assert c.rope_scaling == "llama3" and c.rope_scaling_factor == 8.0 and not c.tie_embeddings
    assert 2 * c.n_params() / 1e9 == pytest.approx(811.7, abs=0.1)  # GB of bf16 weights


# ---- the two-level collective ------------------------------------------------------------------


def test_mesh_over_nodes():
    m = Mesh(4, 2, 2, slow=(2, 1, 1))
    assert (m.nodes, m.chips_per_node, m.slow_axes, str(m)) == (2, 8, {"x": 2}, "[2*2]x2x2")
    assert m.inside_node() == Mesh(2, 2, 2) and m.slow_size("yz") == 1
    assert m.to_dict() == {"x": 4, "y": 2, "z": 2}
    with pytest.raises(ValueError, match="axis y=2 cannot run over 4 nodes"):
        Mesh(2, 2, 2, slow=(1, 4, 1))


def test_collective_inside_a_node_is_priced_as_before():
    c = cm.Collective("all-gather", "yz", 1e6, "t")
    m = Mesh(4, 2, 2, slow=(2, 1, 1))
    t = cm.collective_time(c, m, H100, CostOptions())
    assert (t.bandwidth_s, t.total_latency_s) == cm.collective_seconds(c, Mesh(4, 2, 2), H100,
                                                                       CostOptions())
    assert t.slow_network_s == 0


@pytest.mark.parametrize("kind", ["all-gather", "reduce-scatter"])
def test_hierarchical_gather_sends_one_node_share_over_the_slow_network(kind):
    d = 8e6  # bytes per chip
    m = Mesh(4, 2, 2, slow=(2, 1, 1))  # 2 nodes of 8; the group xyz: 8 chips in each node
    t = cm.collective_time(cm.Collective(kind, "xyz", d, "t"), m, H100, CostOptions())
    slow_bw = 50e9 * 0.8
    fast_bw = 450e9 * 0.8
    assert t.slow_s == pytest.approx(d / 8 * (1 / 2) / slow_bw)
    assert t.fast_s == pytest.approx(d * (7 / 8) / fast_bw)
    assert t.slow_latency_s == pytest.approx(H100.dcn_latency_s)
    assert t.latency_s == pytest.approx(H100.collective_latency_s
                                        + H100.collective_step_latency_s * 3)  # 2x2x2 ring steps
    assert cm.slow_bytes(cm.Collective(kind, "xyz", d, "t"), m, CostOptions()) == d / 16


def test_all_to_all_across_nodes():
    d = 8e6
    m = Mesh(4, 2, 2, slow=(2, 1, 1))
    t = cm.collective_time(cm.Collective("all-to-all", "xyz", d, "t"), m, H100, CostOptions())
    assert t.slow_s == pytest.approx(d / 2 / (50e9 * 0.8))  # half of a chip's data leaves
    assert t.fast_s == pytest.approx(d / 2 * (7 / 8) / (450e9 * 0.8))


def test_stretching_an_axis_over_nodes_only_costs_communication():
    work = Workload(batch=64, context=2048, phase="decode", weights="bf16")
    cfg = get_config("llama-70b")
    inside = evaluate(cfg, H100, Mesh(4, 2, 2), work, "ws-2d", "batch")
    across = evaluate(cfg, H100, Mesh(4, 2, 2, slow=(2, 1, 1)), work, "ws-2d", "batch")
    assert across.compute_s == inside.compute_s and across.weight_load_s == inside.weight_load_s
    assert across.memory_bytes_per_chip == inside.memory_bytes_per_chip
    assert across.comm_s > inside.comm_s and across.slow_network_s > 0
    assert inside.slow_network_s == 0 and inside.slow_bytes_per_chip == 0
    assert across.step_s - inside.step_s == pytest.approx(across.comm_s - inside.comm_s)


def test_stretched_meshes_put_every_node_count_on_an_axis():
    meshes = stretched_meshes(8, 2)
    assert all(m.nodes == 2 and m.chips_per_node == 8 for m in meshes)
    assert Mesh(4, 2, 2, slow=(2, 1, 1)) in meshes and Mesh(2, 2, 4, slow=(1, 1, 2)) in meshes
    assert len({(m.x, m.y, m.z) for m in meshes}) < len(meshes) <= 3 * len(factorizations(16))


# ---- what crosses the slow network ---------------------------------------------------------------


def test_pipeline_step_is_stages_plus_microbatches():
    costs, _ = price_crossings(LLAMA_405B, H100, NodeSplit(2, 8), DECODE, kinds=("pipeline",))
    p = costs[0]
    assert (p.kind, p.stages, p.layers_per_stage, p.replicas) == ("pipeline", 2, 63, 1)
    stage = LLAMA_405B.replace(n_layers=63)
    micro = Workload(64 // p.microbatches, 2048, "decode", "bf16")
    c = evaluate(stage, H100, p.layout.mesh, micro, p.layout.ffn_layout,
                 p.layout.attention_layout)
    t = c.step_s - c.overhead_s
    hop = micro.tokens * 16384 * 2 / 8 / (50e9 * 0.8) + H100.dcn_latency_s
    # the logits (64 rows x 128,256 vocab, bf16) back from the last stage once
    back = 64 * 128256 * 2 / 8 / (50e9 * 0.8) + H100.dcn_latency_s
    m = p.microbatches
    # the lowered loop: m + 1 iterations of a stage's layers, a hop between each two
    assert p.step_s == pytest.approx((m + 1) * t + m * hop + back + c.overhead_s)
    assert p.bubble_s == pytest.approx(t + hop)
    assert p.slow_network_s == pytest.approx(m * hop + back)
    assert p.kv_cache_bytes_per_chip == pytest.approx(m * c.kv_cache_bytes_per_chip)
    assert p.stage_list() == [{"stage": 0, "layers": [0, 63], "node": 0},
                              {"stage": 1, "layers": [63, 126], "node": 1}]


def test_replicas_win_when_a_copy_fits_a_node():
    p = plan("llama-70b", hardware="h100", chips=16, batch=64, context=2048)
    assert (p.nodes, p.cross_node.kind, p.cross_node.replicas) == (2, "replicas", 2)
    assert p.to_dict()["slow_axes"] == {"replica": 2}
    assert p.cross_node.slow_network_s == 0
    # each replica runs half the batch on one node: the step of one node at batch 32
    one = plan("llama-70b", hardware="h100", chips=8, batch=32, context=2048)
    assert p.step_seconds == pytest.approx(one.step_seconds)


def test_llama3_405b_on_two_h100_nodes(capsys):
    """810 GB of bf16 weights do not fit one node of 8 x 80 GB: the plan spans 2 nodes."""
    assert main(["plan", "--model", "llama3-405b", "--hardware", "h100", "--chips", "16",
                 "--weights", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 2 and out["chips_per_node"] == 8 and out["fits"]
    assert out["cross_node"]["kind"] in ("pipeline", "stretched")
    assert out["slow_axes"] and out["breakdown"]["slow_network_s"] > 0
    assert out["memory_bytes_per_chip"] <= 80e9
    reasons = {r["way"]: r["reason"] for r in out["cross_node_rejected"]}
    assert "does not fit one node of 8 x h100" in reasons["2 replicas"]
    kinds = {c["kind"] for c in out["cross_node_candidates"]}
    assert kinds == {"pipeline", "stretched"}
    assert main(["plan", "--model", "llama3-405b", "--hardware", "h100", "--chips", "16"]) == 0
    text = capsys.readouterr().out
    assert "(2 nodes of 8)" in text and "InfiniBand NDR" in text and "why: " in text
    assert "cannot run:\n  2 replicas: does not fit" in text


def test_forcing_a_pipeline():
    p = plan("llama3-405b", hardware="h100", chips=16, batch=64, cross_node="pipeline")
    d = p.to_dict()
    assert d["slow_axes"] == {"stage": 2} and len(d["stages"]) == 2
    assert d["breakdown"]["bubble_s"] > 0 and d["forced"] == {"cross_node": "pipeline"}
    assert "pipeline of 2 stages (63 layers each, one node each)" in p.explain()


def test_prefill_pipelines_its_microbatches():
    p = plan("llama3-405b", hardware="h100", chips=16, batch=8, phase="prefill",
             cross_node="pipeline")
    assert p.cross_node.microbatches > 1  # the bubble shrinks with more microbatches


def test_one_node_plans_as_before():
    a = plan("palm-540b", hardware="tpu-v4", chips=64, batch=64, phase="decode",
             weights="int8")
    b = plan("palm-540b", hardware="tpu-v4", chips=64, batch=64, phase="decode",
             weights="int8", nodes=1)
    assert a.explain() == b.explain() and a.nodes == 1 and a.cross_node is None


def test_tpu_slices():
    p = plan("llama3-405b", hardware="tpu-v5e", chips=128, nodes=2, batch=64)
    assert p.split == NodeSplit(2, 64) and p.fits
    assert "DCN" in p.explain()


# ---- bad input ------------------------------------------------------------------------------------


def test_unequal_nodes_name_the_numbers():
    with pytest.raises(ValueError, match=r"20 chips do not split into 3 equal nodes \(6.67 "
                                         r"chips each\).*use 18 or 21 chips"):
        split_nodes(H100, 20)
    with pytest.raises(ValueError, match="16 chips on 1 nodes would be 16 per node"):
        split_nodes(H100, 16, nodes=1)
    with pytest.raises(ValueError, match="h100 jobs span at most 128 nodes"):
        split_nodes(H100, 8 * 129)
    with pytest.raises(ValueError, match="tpu-v5e slices do not come in 100 chips"):
        split_nodes(get_hardware("tpu-v5e"), 200, nodes=2)
    assert split_nodes(H100, 12) == NodeSplit(2, 6)  # 6 GPUs of each node


def test_slow_axis_that_does_not_divide_what_the_plan_puts_on_it():
    with pytest.raises(ValueError, match=r"126 layers do not split into 4 equal pipeline "
                                         r"stages \(31.5 each\).*batch 3 does not split over 2 "
                                         r"replicas \(1.5 sequences each\)"):
        plan("llama3-405b", hardware="h100", chips=32, batch=3, cross_node="pipeline")
    with pytest.raises(ValueError, match=r"batch 3 does not split over 2 replicas \(1.5 "
                                         r"sequences each\)"):
        plan("llama-7b", hardware="h100", chips=16, batch=3, cross_node="replicas")
    with pytest.raises(ValueError, match="needs 2 or more nodes"):
        plan("llama-7b", hardware="h100", chips=8, cross_node="pipeline")
    with pytest.raises(ValueError, match="unknown way of crossing nodes 'ring'"):
        plan("llama-7b", hardware="h100", chips=16, cross_node="ring")


def test_model_that_fits_no_configuration():
    with pytest.raises(ValueError, match=r"more than the largest h100 job holds \(128 nodes x 8 "
                                         r"x 80 GB = 81.9 TB\)"):
        plan("llama3-405b", hardware="h100", chips=16, batch=4096, context=131072)


def test_one_node_too_small_points_beyond_it():
    with pytest.raises(ValueError, match=r"needs more than one h100 node: it fits 2 nodes of 8 "
                                         r"\(--chips 16\)"):
        plan("llama3-405b", hardware="h100", chips=8, batch=64)


def test_cli_bad_input_is_one_line(capsys):
    assert main(["plan", "--model", "llama3-405b", "--hardware", "h100", "--chips", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshwright plan: error:") and "\n" not in err
    assert "20 chips do not split into 3 equal nodes" in err


# ---- CPU: every collective of a job over processes is a gloo exchange -----------------------


CPU = get_hardware("cpu").replace(
    collective_latency_s=5e-5, ici_bandwidth=1e9, multinode_collective_s=3e-3,
    multinode_bandwidth=5e7, dcn_bandwidth=7e7, dcn_latency_s=1.5e-3)
TINY = get_config("palm-tiny")  # a parallel block with a layernorm
TINY_DECODE = Workload(batch=8, context=64, phase="decode", weights="fp32")


def test_a_job_over_nodes_prices_every_collective_on_cpu_as_issued():
    """One node's mesh of a job over 2 nodes (a replica): every collective the lowering
    issues costs `multinode_collective_s` -- the layer's 2, the step's 2, and the norms'
    statistics (2 all-reduces per layernorm, one norm a layer in a parallel block, plus the
    final one) -- and bytes move at `multinode_bandwidth`."""
    mesh = Mesh(1, 1, 4)
    alone = evaluate(TINY, CPU, mesh, TINY_DECODE, "ws-1d", "heads")
    in_job = evaluate(TINY, CPU, mesh, TINY_DECODE, "ws-1d", "heads", nodes=2)
    assert TINY.parallel_block and TINY.norm == "layernorm"
    layers = TINY.n_layers
    issued = 2 * layers + 2 + 2 * (layers + 1)
    bw_alone = alone.comm_s - (2 * layers + 2) * CPU.collective_latency_s
    assert in_job.comm_s == pytest.approx(issued * 3e-3 + bw_alone * 1e9 / 5e7)
    assert in_job.slow_network_s == 0 and in_job.step_s > alone.step_s
    # everything but communication is the same step
    assert (in_job.compute_s, in_job.weight_load_s) == (alone.compute_s, alone.weight_load_s)


def test_weight_gathers_are_one_collective_per_weight_matrix_in_a_job_over_nodes():
    mesh = Mesh(2, 1, 2)
    c = evaluate(TINY, CPU.replace(multinode_bandwidth=1e18), mesh, TINY_DECODE, "wg-x",
                 "heads", nodes=2)
    no_weights = evaluate(TINY, CPU.replace(multinode_bandwidth=1e18), mesh, TINY_DECODE,
                          "ws-2d", "heads", nodes=2)
    per_layer = cm.weight_tensors_per_layer(TINY)
    assert per_layer == 4 + TINY.ffn_matrices
    gathers = [x for x in cm.layer_collectives(TINY, mesh, TINY_DECODE, "wg-x", "heads",
                                               TINY.n_heads) if x.weights]
    assert len(gathers) == 1  # the model's one gather of the layer's weights ...
    lat, slow = cm.issued_latency(gathers[0], mesh, CPU, TINY)
    assert (lat, slow) == (pytest.approx(per_layer * 3e-3), 0.0)  # ... issued per matrix
    assert c.comm_s > no_weights.comm_s


def test_across_nodes_a_collective_adds_the_slow_ring_steps():
    mesh = Mesh(1, 1, 8, slow=(1, 1, 2))  # z over the 2 nodes
    c = evaluate(TINY, CPU, mesh, TINY_DECODE, "ws-1d", "heads")
    bandwidth_only = evaluate(TINY, CPU.replace(dcn_latency_s=0.0), mesh, TINY_DECODE,
                              "ws-1d", "heads")
    issued = 2 * TINY.n_layers + 2 + 2 * (TINY.n_layers + 1)  # every one over z, crossing
    assert c.slow_network_s == pytest.approx(bandwidth_only.slow_network_s + issued * 1.5e-3)
    lat, slow = cm.norm_latency(TINY, mesh, CPU, "ws-1d")
    assert slow == pytest.approx(2 * (TINY.n_layers + 1) * 1.5e-3)
    # a group of 8 over nodes of 4: the node's cost times 7/3 of its ring steps
    assert lat == pytest.approx(2 * (TINY.n_layers + 1) * (3e-3 * 7 / 3 + 1.5e-3))
    within = cm.issued_latency(cm.Collective("all-gather", "z", 1.0, "a"), Mesh(2, 1, 4, (2, 1, 1)),
                               CPU, TINY)
    assert within == (pytest.approx(3e-3), 0.0)  # a node's group: the calibrated cost


def test_gpu_and_tpu_profiles_price_a_node_alike_in_a_job_over_nodes():
    for name in ("h100", "tpu-v5e"):
        hw = get_hardware(name)
        assert hw.multinode_collective_s == 0 and hw.in_multinode_job() is hw
        one = evaluate(LLAMA_405B, hw, Mesh(2, 2, 2), DECODE, "ws-2d", "batch")
        assert evaluate(LLAMA_405B, hw, Mesh(2, 2, 2), DECODE, "ws-2d", "batch", nodes=2) == one


def test_cpu_replicas_are_priced_as_in_a_job_over_processes():
    """The planner's replicas on CPU: one node's layout priced with every collective a gloo
    exchange; the same layout in a job of one node is far cheaper."""
    costs, _ = price_crossings(TINY, CPU, NodeSplit(2, 4), TINY_DECODE)
    rep = next(c for c in costs if c.kind == "replicas")
    lay = rep.layout
    half = Workload(4, 64, "decode", "fp32")
    assert lay.step_s == evaluate(TINY, CPU, lay.mesh, half, lay.ffn_layout,
                                  lay.attention_layout, nodes=2).step_s
    assert lay.step_s > evaluate(TINY, CPU, lay.mesh, half, lay.ffn_layout,
                                 lay.attention_layout).step_s

