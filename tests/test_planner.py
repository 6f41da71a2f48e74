"""The planner: Table 2 of Pope et al., the `plan` / `frontier` CLI, forcing, and clear errors."""

import json
import time

import pytest
from meshwright.models.config import PRESETS, get_config
from meshwright.passes.frontier import pareto, sweep
from meshwright.passes.hardware import get_hardware
from meshwright.passes.planner import blocks_of, plan, plan_config

from meshwright.cli import main

# PaLM 540B on 64 TPU v4, context 2048 (prefill 2048 tokens, decode 64 tokens): Table 2.
TABLE_2 = [
    # phase, batch, weights, FFN, attention, latency s, MFU
    ("prefill", 1, "int8", "ws-2d", "heads", 0.29, 0.43),
    ("decode", 64, "int8", "ws-2d", "batch", 1.82, 0.14),
    ("prefill", 512, "bf16", "wg-xyz", "batch", 85.2, 0.76),
    ("decode", 512, "bf16", "ws-2d", "batch", 6.0, 0.33),
]


@pytest.mark.parametrize("phase,batch,weights,ffn,attention,latency,mfu", TABLE_2)
def test_table_2_reproduced_without_forcing(phase, batch, weights, ffn, attention, latency, mfu):
    p = plan("palm-540b", hardware="tpu-v4", chips=64, batch=batch, context=2048, phase=phase,
             weights=weights, gen_tokens=64)
    assert (p.ffn_layout, p.attention_layout) == (ffn, attention)
    assert p.latency_seconds == pytest.approx(latency, rel=0.2)
    assert p.mfu == pytest.approx(mfu, rel=0.2)
    assert p.fits


DESIGN_KEYS = {"ffn_layout", "attention_layout", "mesh", "step_seconds", "latency_seconds",
               "mfu", "breakdown", "weight_bytes_per_chip", "kv_cache_bytes_per_chip",
               "max_context", "fits"}


def test_plan_json_has_the_design_keys(capsys):
    rc = main(["plan", "--model", "palm-540b", "--hardware", "tpu-v4", "--chips", "64",
               "--batch", "64", "--context", "2048", "--phase", "decode", "--weights", "int8",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert DESIGN_KEYS <= set(out)
    assert set(out["breakdown"]) == {"compute_s", "weight_load_s", "kv_load_s", "comm_s",
                                     "slow_network_s", "bubble_s"}
    # one node: nothing crosses a slow network
    assert out["nodes"] == 1 and out["slow_axes"] == {} and out["stages"] == []
    assert out["breakdown"]["slow_network_s"] == out["breakdown"]["bubble_s"] == 0
    assert set(out["mesh"]) == {"x", "y", "z"}
    assert out["mesh"]["x"] * out["mesh"]["y"] * out["mesh"]["z"] == 64
    assert out["ffn_layout"] in {"ws-1d", "ws-2d", "wg-x", "wg-xy", "wg-xyz"}
    assert out["attention_layout"] in {"heads", "batch"}
    assert out["latency_seconds"] == pytest.approx(64 * out["step_seconds"])
    assert out["fits"] is True and out["max_context"] > 2048
    assert out["candidates"] and {"ffn_layout", "step_seconds", "fits"} <= set(out["candidates"][0])
    kinds = {b["kind"] for b in out["blocks"]}
    assert kinds == {"embedding", "norm", "parallel", "unembedding"}
    assert sum(b["kind"] == "parallel" for b in out["blocks"]) == 118


def test_plan_table_output(capsys):
    assert main(["plan", "--model", "palm-540b", "--chips", "64", "--batch", "64",
                 "--phase", "decode", "--weights", "int8"]) == 0
    text = capsys.readouterr().out
    assert "chosen: FFN ws-2d, attention batch" in text
    assert "why:" in text and "ws-1d/batch" in text  # the runner-up is shown


def test_explain_names_winner_and_runners_up():
    p = plan("palm-540b", chips=64, batch=512, context=2048, phase="prefill", weights="bf16")
    text = p.explain()
    assert text.splitlines()[0].startswith("palm-540b on 64 x tpu-v4, prefill")
    assert "* wg-xyz/batch" in text
    assert len(p.runners_up()) >= 3
    assert p.candidates == sorted(p.candidates, key=lambda c: c.step_s)


def test_forcing_is_honoured():
    p = plan("palm-540b", chips=64, batch=64, phase="decode", weights="int8", force_ffn="ws-1d",
             force_attention="heads")
    assert (p.ffn_layout, p.attention_layout) == ("ws-1d", "heads")
    assert {(c.ffn_layout, c.attention_layout) for c in p.candidates} == {("ws-1d", "heads")}
    assert p.forced == {"ffn": "ws-1d", "attention": "heads"}
    free = plan("palm-540b", chips=64, batch=64, phase="decode", weights="int8")
    assert p.step_seconds > free.step_seconds


def test_forced_layout_that_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="no layout can run.*batch >= chips"):
        plan("palm-540b", chips=64, batch=1, phase="prefill", force_attention="batch")
    with pytest.raises(ValueError, match="unknown FFN layout 'ws-3d'"):
        plan("palm-540b", force_ffn="ws-3d")


def test_layout_follows_the_batch_in_prefill():
    seq = []
    for b in (1, 4, 32, 512):
        p = plan("palm-540b", chips=64, batch=b, context=2048, phase="prefill")
        if not seq or seq[-1] != p.ffn_layout:
            seq.append(p.ffn_layout)
    assert seq == ["ws-2d", "wg-x", "wg-xy", "wg-xyz"]


def test_decode_prefers_batch_sharded_multiquery_attention():
    p = plan("palm-540b", chips=64, batch=256, context=2048, phase="decode")
    assert p.attention_layout == "batch"
    heads = plan("palm-540b", chips=64, batch=256, context=2048, phase="decode",
                 force_attention="heads")
    # Over heads, the single K/V head is on every chip of a batch group: 16x more here
    # (ws-2d/heads would hold all 256 sequences per chip and does not fit; wg-x splits B by 4).
    assert heads.best.kv_cache_bytes_per_chip >= 16 * p.best.kv_cache_bytes_per_chip
    assert heads.step_seconds > p.step_seconds


def test_set_overrides_turn_multiquery_into_multihead():
    mq = plan("palm-540b", chips=64, batch=64, phase="decode", weights="int8")
    mh = plan("palm-540b", chips=64, batch=64, phase="decode", weights="int8",
              overrides=["n_kv_heads=48", "d_head=128"])
    assert mh.best.kv_cache_bytes_per_chip > 20 * mq.best.kv_cache_bytes_per_chip
    assert mh.best.max_context < mq.best.max_context


def test_plan_config_plans_any_config_with_given_blocks():
    cfg = get_config("llama-7b")
    blocks = [{"kind": "attention", "layer": 0}, {"kind": "ffn", "layer": 0}]
    p = plan_config(cfg, hardware="h100", chips=8, batch=16, context=1024, blocks=blocks)
    assert p.blocks == blocks and p.fits and p.hardware == "h100"
    serial = blocks_of(cfg)
    assert [b["kind"] for b in serial[:5]] == ["embedding", "norm", "attention", "norm", "ffn"]
    assert serial[-1] == {"kind": "unembedding", "layer": None}


# ---- clear errors ---------------------------------------------------------------------------


def test_unknown_model_and_hardware():
    with pytest.raises(KeyError, match="palm-540b"):
        plan("palm-541b")
    with pytest.raises(KeyError, match="Did you mean tpu-v4"):
        plan("palm-540b", hardware="tpu-v44")


def test_not_enough_chips_names_the_minimum():
    with pytest.raises(ValueError, match="needs at least 32 chips"):
        plan("palm-540b", chips=8, batch=64, context=2048)


def test_batch_too_large_names_the_max_batch():
    with pytest.raises(ValueError, match=r"max batch at context 2048 is \d+"):
        plan("palm-540b", chips=64, batch=20000, context=2048)


def test_context_that_fits_nowhere():
    with pytest.raises(ValueError, match=r"max context at batch 64 is \d+") as e:
        plan("palm-540b", chips=64, batch=64, context=10_000_000)
    assert "does not fit on any tpu-v4 slice" in str(e.value)


def test_more_chips_than_heads_and_batch_can_use():
    with pytest.raises(ValueError, match="At most 32 chips are usable"):
        plan("palm-8b", chips=64, batch=1, phase="prefill")
    with pytest.raises(ValueError, match="at most 8 chips in one slice/node and its profile "
                                         "has no network between nodes"):
        plan("llama-7b", hardware=get_hardware("h100").replace(max_nodes=1), chips=16)


def test_cli_errors_are_clean(capsys):
    assert main(["plan", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshwright plan: error: unknown model 'nope'")
    assert main(["plan", "--chips", "8", "--json"]) == 2
    assert "needs at least" in json.loads(capsys.readouterr().out)["error"]


# ---- speed -----------------------------------------------------------------------------------


def test_plan_is_fast_for_every_preset():
    for name in PRESETS:
        t0 = time.perf_counter()
        try:
            plan(name, chips=64, batch=64, context=2048, phase="decode")
        except ValueError:
            pass  # e.g. a tiny model cannot use 64 chips: the error is the answer
        assert time.perf_counter() - t0 < 1.0, name


# ---- frontier --------------------------------------------------------------------------------


def test_frontier_sweep_and_pareto():
    r = sweep("palm-540b", chips=(32, 64), batches=(1, 16, 64, 512), progress=False)
    for phase in ("prefill", "decode"):
        front = r.frontier(phase, "mfu")
        assert front
        steps = [p.step_seconds for p in front]
        mfus = [p.mfu for p in front]
        assert steps == sorted(steps) and mfus == sorted(mfus)  # slower only if better
        assert pareto(r.frontier(phase, "cost"), "cost") == r.frontier(phase, "cost")
    assert "Pareto frontier" in r.format()


def test_frontier_cli_writes_png_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "f.png"
    assert main(["frontier", "--model", "palm-62b", "--chips", "8,16", "--batches", "1,64",
                 "--png", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["frontier"]["decode"]["mfu"]
