"""The plan pass and mw.plan on traced graphs agree with the planner on presets."""

import functools
import json

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshwright.models import build, get_config
from meshwright.passes import PassManager, get_pass
from meshwright.passes.plan import PlanError, config_from_graph
from meshwright.passes.planner import plan_config

import meshwright as mw
from meshwright.cli import main

COMPARED = ("ffn_layout", "attention_layout", "mesh", "step_seconds", "latency_seconds", "mfu",
            "breakdown", "weight_bytes_per_chip", "kv_cache_bytes_per_chip", "max_context")


@functools.cache
def traced(name, scan, phase, batch=8):
    cfg = get_config(name).replace(scan_layers=scan)
    return cfg, mw.trace_model(cfg, phase=phase, batch=batch, length=16)


@pytest.mark.parametrize("name", ["gpt2-tiny", "palm-tiny", "llama-tiny"])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_traced_graph_plans_like_its_preset(name, scan, phase):
    cfg, g = traced(name, scan, phase)
    pm = PassManager(["infer-axes", "find-blocks",
                      get_pass("plan", hardware="tpu-v4", chips=8)], verify=True)
    g = pm.run(g)
    got = g.meta["plan"].to_dict()
    context = 16 if phase == "prefill" else cfg.max_len
    want = plan_config(cfg, hardware="tpu-v4", chips=8, batch=8, context=context,
                       phase=phase).to_dict()
    for key in COMPARED:
        assert got[key] == want[key], key
    kinds = [b["kind"] for b in got["blocks"]]
    assert kinds.count("attention") == cfg.n_layers
    assert set(pm.timings) == {"infer-axes", "find-blocks", "plan"}


def test_config_from_graph_recovers_the_architecture():
    cfg, g = traced("llama-tiny", True, "decode")
    g = PassManager(["infer-axes", "find-blocks"]).run(g)
    got = config_from_graph(g)
    for field in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head", "vocab_size",
                  "max_len", "parallel_block", "activation", "tie_embeddings"):
        assert getattr(got, field) == getattr(cfg, field), field


def test_mw_plan_on_a_graph_and_on_a_preset():
    _, g = traced("palm-tiny", False, "decode")
    p = mw.plan(g, hardware="tpu-v4", chips=8)
    q = mw.plan(model="palm-tiny", hardware="tpu-v4", chips=8, batch=8, context=128)
    assert p.to_dict()["step_seconds"] == q.to_dict()["step_seconds"]
    paper = mw.plan(model="palm-540b", hardware="tpu-v4", chips=64, batch=64, context=2048,
                    phase="decode", weights="int8")
    assert (paper.ffn_layout, paper.attention_layout) == ("ws-2d", "batch")


def test_planning_something_that_is_not_a_transformer_says_so():
    g = mw.trace(lambda x, w: jax.nn.relu(x @ w), np.ones((4, 8), np.float32),
                 np.ones((8, 8), np.float32))
    with pytest.raises(PlanError, match="no .*attention block"):
        mw.plan(g, chips=8)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["gpt2-tiny", "palm-tiny", "llama-tiny"]),
       layers=st.integers(1, 3), heads=st.sampled_from([2, 4, 8]), d_head=st.sampled_from([4, 8]),
       kv_div=st.sampled_from([1, 2]), ff_mult=st.integers(2, 4), scan=st.booleans())
def test_axes_and_config_over_model_sizes(family, layers, heads, d_head, kv_div, ff_mult, scan):
    base = get_config(family)
    kv = heads if family == "gpt2-tiny" else (1 if family == "palm-tiny" and kv_div == 1
                                              else max(1, heads // kv_div))
    d_model = heads * d_head
    cfg = base.replace(n_layers=layers, n_heads=heads, n_kv_heads=kv, d_head=d_head,
                       d_model=d_model, d_ff=ff_mult * d_model, scan_layers=scan, max_len=32)
    model = build(cfg)
    args = jax.eval_shape(lambda: model.example_args("decode", batch=3,
                                                     key=jax.random.PRNGKey(0)))
    g = PassManager(["infer-axes", "find-blocks"], verify=True).run(
        mw.trace(model.decode_step, *args))
    got = config_from_graph(g)
    assert (got.n_layers, got.d_model, got.d_ff, got.n_heads, got.n_kv_heads, got.d_head) == \
        (layers, d_model, ff_mult * d_model, heads, kv, d_head)
    assert not g.meta["axes"].unlabelled and not g.meta["blocks"].unclassified


def test_cli_inspect_prints_the_labelled_graph(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    assert main(["inspect", "llama-tiny", "--scan", "--phase", "decode", "--summary",
                 "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decode_step(%params.layers.attention_norm:f32[2,64]")
    assert "scan[" in out and "summary of decode_step" in out
    assert dot.read_text().startswith('digraph "decode_step"')
    assert main(["inspect", "palm-tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "palm-tiny" and data["summary"]["equations"] > 10
    assert main(["inspect", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["inspect", "gpt2-tiny", "--after", "find-blocks", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["axes"]["sizes"]["heads"] == 4
    assert [b["kind"] for b in data["blocks"]].count("attention") == 2
    assert any("{batch,1,embed}" in line for line in data["graph"])
    assert main(["inspect", "--after", "lower-everything"]) == 2
    assert "unknown pass 'lower-everything'" in capsys.readouterr().err


def test_cli_plan_from_a_checkpoint_config(tmp_path, capsys):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--checkpoint", str(tmp_path), "--hardware", "h100", "--chips", "8",
                 "--batch", "16", "--context", "4096", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = mw.plan(model="llama3-8b", hardware="h100", chips=8, batch=16, context=4096).to_dict()
    assert got["ffn_layout"] == want["ffn_layout"] and got["mesh"] == want["mesh"]
    assert got["weight_bytes_per_chip"] == pytest.approx(want["weight_bytes_per_chip"], rel=0.01)
    assert main(["plan", "--checkpoint", str(tmp_path / "missing")]) == 2
