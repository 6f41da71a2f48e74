"""The analytical cost model: the closed forms of Pope et al. Sec. 3, memory, and profiles."""

import json
import math

import pytest
from meshwright.models.config import TransformerConfig, get_config
from meshwright.passes import cost_model as cm
from meshwright.passes.cost_model import (
    CostOptions,
    LayoutNotApplicable,
    Mesh,
    StepWorkload,
    evaluate,
    factorizations,
    ffn_comm_seconds,
)
from meshwright.passes.hardware import (
    HARDWARE,
    TPU_V4,
    HardwareProfile,
    get_hardware,
)

BW = 1.0  # closed forms in units of the bandwidth


def best_2d(n, t, e, f):
    """The mesh minimising 2D weight-stationary FFN communication (leading-order formula)."""
    return min(factorizations(n), key=lambda m: (ffn_comm_seconds("ws-2d", t, e, f, m, BW), m.x))


# ---- factorisations ---------------------------------------------------------------------------


def test_factorizations_are_every_ordered_triple():
    meshes = factorizations(64)
    assert len(meshes) == 28  # C(6 + 2, 2) ordered triples of powers of two
    assert all(m.n == 64 for m in meshes)
    assert Mesh(1, 1, 64) in meshes and Mesh(64, 1, 1) in meshes and Mesh(4, 4, 4) in meshes
    assert len(factorizations(12)) == 18
    with pytest.raises(ValueError):
        factorizations(0)


# ---- closed forms of Sec. 3.2.1 ------------------------------------------------------------


def test_2d_weight_stationary_optimum_is_half_sqrt_n():
    n, t, e = 64, 512, 8192
    f = 4 * e
    m = best_2d(n, t, e, f)
    assert m.x == 0.5 * math.sqrt(n) == 4
    # At the optimum, T_comm = 8BLE / (sqrt(n) bw)
    assert ffn_comm_seconds("ws-2d", t, e, f, m, BW) == pytest.approx(8 * t * e / math.sqrt(n))


def test_2d_optimum_with_ring_correction_is_the_same_mesh():
    # (K-1)/K subtracts constants: the optimal X does not move, T drops by 2BL(E+F)/n.
    n, t, e = 64, 512, 8192
    f = 4 * e
    exact = min(factorizations(n),
                key=lambda m: (ffn_comm_seconds("ws-2d", t, e, f, m, BW, ring_correction=True),
                               m.x))
    assert exact.x == 4
    got = ffn_comm_seconds("ws-2d", t, e, f, exact, BW, ring_correction=True)
    assert got == pytest.approx(8 * t * e / 8 - 2 * t * (e + f) / n)


@pytest.mark.parametrize("n", [4, 8, 16, 32, 64, 128, 256])
def test_2d_beats_1d_iff_sqrt_n_exceeds_f_over_e(n):
    t, e = 128, 1024
    f = 4 * e
    two_d = ffn_comm_seconds("ws-2d", t, e, f, best_2d(n, t, e, f), BW)
    one_d = ffn_comm_seconds("ws-1d", t, e, f, Mesh(n, 1, 1), BW)
    assert one_d == pytest.approx(2 * t * e)  # flat in n
    assert (two_d < one_d * (1 - 1e-12)) == (math.sqrt(n) > f / e)


@pytest.mark.parametrize("n_opt,layout", [(4, "wg-x"), (16, "wg-xy"), (64, "wg-xyz")])
def test_weight_gathered_optimum_is_sqrt_bln_over_f(n_opt, layout):
    n, e, f = 64, 16384, 65536
    mesh = Mesh(4, 4, 4)
    t = n_opt**2 * f / n  # tokens at which N = sqrt(BLn/F) = n_opt
    costs = {lay: ffn_comm_seconds(lay, t, e, f, mesh, BW) for lay in ("wg-x", "wg-xy", "wg-xyz")}
    assert min(costs, key=costs.get) == layout
    assert math.sqrt(t * n / f) == n_opt
    # T_comm at the optimum = 4E sqrt(BLF) / (sqrt(n) bw)
    assert costs[layout] == pytest.approx(4 * e * math.sqrt(t * f) / math.sqrt(n))


def test_layout_crossover_as_tokens_grow():
    """WS 2D -> WG X -> WG XY -> WG XYZ for X=Y=Z=4, E=16384, F=65536 (Pope et al. Fig. 3)."""
    e, f, mesh = 16384, 65536, Mesh(4, 4, 4)
    layouts = ("ws-2d", "wg-x", "wg-xy", "wg-xyz")
    winners = []
    for t in [2.0**k for k in range(8, 26)]:
        best = min(layouts, key=lambda lay: ffn_comm_seconds(lay, t, e, f, mesh, BW))
        if not winners or winners[-1] != best:
            winners.append(best)
    assert winners == list(layouts)


def test_layer_collectives_match_the_closed_form():
    # A serial GELU block: the FFN's own collectives are exactly (2BL/bw)(E/X + F/YZ) x ring.
    cfg = TransformerConfig(n_layers=1, d_model=1024, d_ff=4096, n_heads=16, n_kv_heads=16,
                            d_head=64, activation="gelu", parallel_block=False)
    mesh = Mesh(2, 2, 4)
    work = StepWorkload(batch=16, context=32, phase="prefill", weights="bf16")
    colls = cm.layer_collectives(cfg, mesh, work, "ws-2d", "heads", cfg.n_heads)
    ffn = [c for c in colls if c.what.startswith("ffn")]
    assert [c.kind for c in ffn] == ["all-gather", "reduce-scatter", "all-gather",
                                     "reduce-scatter"]
    hw = HardwareProfile(**{**TPU_V4.to_dict(), "ici_efficiency": 1.0, "ici_bandwidth": 1.0})
    got = sum(cm.collective_seconds(c, mesh, hw, CostOptions())[0] for c in ffn)
    want = ffn_comm_seconds("ws-2d", work.tokens * 2, 1024, 4096, mesh, 1.0,
                            ring_correction=True)
    assert got == pytest.approx(want)


# ---- the full model --------------------------------------------------------------------------

PALM = get_config("palm-540b")
V4 = get_hardware("tpu-v4")


def test_int8_halves_weight_bytes_and_weight_load():
    kw = {"batch": 64, "context": 2048, "phase": "decode"}
    bf = evaluate(PALM, V4, Mesh(4, 4, 4), StepWorkload(weights="bf16", **kw), "ws-2d", "batch")
    i8 = evaluate(PALM, V4, Mesh(4, 4, 4), StepWorkload(weights="int8", **kw), "ws-2d", "batch")
    assert i8.weight_bytes_per_chip == pytest.approx(bf.weight_bytes_per_chip / 2)
    assert i8.weight_load_s == pytest.approx(bf.weight_load_s / 2)
    assert i8.kv_cache_bytes_per_chip == bf.kv_cache_bytes_per_chip  # KV stays bf16
    # Pope et al. Sec. 5: 36.9 -> 28.5 ms per token at batch 64.
    assert bf.step_s * 1e3 == pytest.approx(36.9, rel=0.1)
    assert i8.step_s * 1e3 == pytest.approx(28.5, rel=0.1)


def test_parallel_block_removes_collectives():
    work = StepWorkload(batch=512, context=2048, phase="decode", weights="bf16")
    par = evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "batch")
    ser = evaluate(PALM.replace(parallel_block=False), V4, Mesh(4, 4, 4), work, "ws-2d", "batch")
    assert ser.collectives_per_layer == par.collectives_per_layer + 4
    assert ser.comm_total_s > par.comm_total_s
    # The paper measured serial blocks 14% slower per decode step here.
    assert 1.05 < ser.step_s / par.step_s < 1.3


def test_multiquery_kv_cache_is_replicated_over_heads_and_split_over_batch():
    work = StepWorkload(batch=64, context=2048, phase="decode", weights="bf16")
    heads = evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "heads")
    batch = evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "batch")
    total = PALM.kv_bytes_per_token(2) * 64 * 2048
    assert heads.kv_cache_bytes_per_chip == total  # every chip holds the single K/V head
    assert batch.kv_cache_bytes_per_chip == total / 64
    assert batch.kv_load_s < heads.kv_load_s / 60
    mha = PALM.replace(n_kv_heads=48, d_head=256)
    assert evaluate(mha, V4, Mesh(4, 4, 4), work, "ws-2d", "heads").kv_cache_bytes_per_chip \
        == mha.kv_bytes_per_token(2) * 64 * 2048 / 48  # ceil(48 / 64) = 1 head per chip


def test_heads_are_padded_to_the_chip_count():
    work = StepWorkload(batch=1, context=2048, phase="prefill", weights="int8")
    c = evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "heads")
    assert c.padded_heads == 64 and "48 heads padded to 64" in c.notes[0]
    assert c.hardware_flops > c.model_flops  # padded heads are computed, not counted in MFU
    with pytest.raises(LayoutNotApplicable, match="48 heads cannot cover 64 chips"):
        evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "heads", CostOptions(pad_heads=False))
    # Over batch no padding is needed: the all-to-all splits H*D, not whole heads.
    batch = evaluate(PALM, V4, Mesh(4, 4, 4), StepWorkload(64, 2048, "decode"), "ws-2d", "batch")
    assert batch.padded_heads == 48


def test_not_applicable_layouts_say_why():
    one = StepWorkload(batch=1, context=128, phase="prefill")
    with pytest.raises(LayoutNotApplicable, match="batch >= chips"):
        evaluate(PALM, V4, Mesh(4, 4, 4), one, "ws-2d", "batch")
    with pytest.raises(LayoutNotApplicable, match="splits the batch"):
        evaluate(PALM, V4, Mesh(4, 4, 4), one, "wg-x", "heads")
    with pytest.raises(LayoutNotApplicable, match="heads"):
        evaluate(get_config("palm-8b"), V4, Mesh(4, 4, 4), one, "ws-2d", "heads")
    with pytest.raises(ValueError, match="unknown FFN layout"):
        evaluate(PALM, V4, Mesh(4, 4, 4), one, "ws-3d", "heads")
    with pytest.raises(ValueError, match="weights must be"):
        StepWorkload(batch=1, context=1, weights="int4")


def test_roofline_bound_and_mfu_definition():
    work = StepWorkload(batch=512, context=2048, phase="prefill", weights="bf16")
    c = evaluate(PALM, V4, Mesh(4, 4, 4), work, "wg-xyz", "batch")
    assert c.bound == "compute"
    assert c.model_flops == 2 * PALM.n_params() * 512 * 2048  # 2N per token, no attention
    assert c.mfu == pytest.approx(c.model_flops / (64 * 275e12 * c.step_s))
    assert c.cost_per_token == pytest.approx(64 * c.step_s / (512 * 2048))
    d = evaluate(PALM, V4, Mesh(4, 4, 4), StepWorkload(64, 2048, "decode", "int8"), "ws-2d", "batch")
    assert d.bound == "memory"


def test_max_context_and_fits():
    work = StepWorkload(batch=512, context=2048, phase="decode", weights="bf16")
    c = evaluate(PALM, V4, Mesh(4, 4, 4), work, "ws-2d", "batch", kv_memory_fraction=0.3)
    per_token = c.kv_cache_bytes_per_chip / 2048
    assert c.max_context == int(0.3 * V4.hbm_bytes // per_token)
    assert c.fits
    huge = evaluate(PALM, V4, Mesh(4, 4, 4), StepWorkload(512, 100_000, "decode"), "ws-2d", "batch")
    assert not huge.fits and "GiB per chip" in huge.notes[-1]


# ---- hardware profiles -----------------------------------------------------------------------


def test_tpu_v4_profile_numbers():
    hw = get_hardware("tpu-v4")
    assert hw.peak_flops_bf16 == 275e12
    assert hw.hbm_bytes == 32 * 2**30 and hw.hbm_bandwidth == 1.2e12
    assert hw.ici_bandwidth == 6 * 45e9 and hw.topology == "torus3d"
    for name in ("tpu-v4", "tpu-v5e", "h100", "h200", "a100", "cpu"):
        p = get_hardware(name)
        assert 0 < p.matmul_efficiency <= 1 and 0 < p.hbm_efficiency <= 1
        assert p.max_chips >= 1
    assert get_hardware("h200").hbm_bytes > get_hardware("h100").hbm_bytes


def test_unknown_hardware_lists_names_and_close_matches():
    with pytest.raises(KeyError, match="Did you mean tpu-v4") as e:
        get_hardware("tpu-v3")
    assert "h100" in str(e.value)
    assert set(HARDWARE) >= {"tpu-v4", "tpu-v5e", "h100", "h200", "a100", "cpu"}


def test_cpu_profile_loads_a_calibrated_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWRIGHT_CACHE", str(tmp_path))
    assert get_hardware("cpu").source.startswith("conservative defaults")
    profile = get_hardware("cpu").replace(peak_flops_bf16=1.25e10, source="test")
    (tmp_path / "cpu.json").write_text(json.dumps({"profile": profile.to_dict()}))
    assert get_hardware("cpu").peak_flops_bf16 == 1.25e10


def test_calibrate_measures_this_machine(tmp_path):
    from meshwright.passes.calibrate import calibrate, format_report

    report = calibrate(devices=8, quick=True, output=str(tmp_path / "cpu.json"))
    m = report["measured"]
    assert m["devices"] == 8
    assert m["matmul_flops_per_device"] > 1e8 and m["memory_bandwidth_per_device"] > 1e7
    assert m["collective_bandwidth"] > 0 and m["collective_latency_s"] > 0
    saved = json.loads((tmp_path / "cpu.json").read_text())
    assert HardwareProfile.from_dict(saved["profile"]).max_chips == 8
    assert "GFLOP/s" in format_report(report)
