"""The layout registry (`passes/layouts.py`): each layout one object that the cost model, the
planner, annotate/lower and the engine's plan read. Adding a layout = one object + its tests:
here a layout nobody wrote code for (2D weight-stationary with E over z, F over x and y) is
registered, priced, refused where it degenerates, and lowered by mw.shard."""

import os

import jax
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes import cost_model as cm
from meshwright.passes import layouts as L
from meshwright.passes.hardware import get_hardware
from meshwright.passes.planner import plan_config
from meshwright.passes.sharding import LAYOUT_NAMES_ATTENTION, LAYOUT_NAMES_FFN, make_layout
from meshwright.runtime.layouts import stored_weights

import meshwright as mw

OVERVIEW = os.path.join(os.path.dirname(__file__), "..", "docs", "overview.md")


@pytest.fixture
def ws2d_z():
    """E_z F_xy: ws-2d with its axes renamed, registered for one test."""
    layout = L.register(L.WeightStationary2D("ws-2d-z", "2D weight-stationary, E over z",
                                             e_axes="z", f_axes="xy"))
    yield layout
    L.unregister("ws-2d-z")


def test_the_names_other_modules_import_are_the_registry():
    assert tuple(cm.FFN_LAYOUTS) == ("ws-1d", "ws-2d", "wg-x", "wg-xy", "wg-xyz")
    assert tuple(cm.ATTENTION_LAYOUTS) == ("heads", "batch")
    assert list(LAYOUT_NAMES_FFN) == list(L.FFN) and list(LAYOUT_NAMES_ATTENTION) == list(
        L.ATTENTION)
    for name, ffn in L.FFN.items():
        layout = make_layout(name, "batch")
        assert (layout.stored, layout.use, layout.residual, layout.hidden,
                layout.attention_batch) == (ffn.stored, ffn.use, ffn.residual, ffn.hidden,
                                            ffn.attention_batch)
        assert layout.weight_gather_axes() == tuple(ffn.gathered)
    assert L.FFN["wg-xy"].use["mlp"] == ("z",) and L.FFN["ws-1d"].whole_input
    with pytest.raises(ValueError, match=r"unknown FFN layout 'ws-3d'; known: ws-1d, ws-2d"):
        make_layout("ws-3d", "heads")
    with pytest.raises(ValueError, match="already registered"):
        L.register(L.OverHeads("heads", "again"))
    with pytest.raises(ValueError, match="must split x, y, z between them"):
        L.WeightStationary2D("bad", "", e_axes="x", f_axes="y")


def test_a_registered_layout_is_priced_and_refused_by_the_planner(ws2d_z):
    cfg, hw = get_config("palm-540b"), get_hardware("tpu-v4")
    work = cm.StepWorkload(batch=64, context=2048, phase="decode", weights="int8")
    # E over z (4), F over x*y (4*2) costs what ws-2d costs with E over x (4), F over y*z
    for att in ("heads", "batch"):
        mine = cm.evaluate(cfg, hw, cm.Mesh(4, 2, 4), work, "ws-2d-z", att)
        paper = cm.evaluate(cfg, hw, cm.Mesh(4, 4, 2), work, "ws-2d", att)
        assert mine.step_s == pytest.approx(paper.step_s, rel=1e-12)
        assert mine.comm_bytes_per_chip == pytest.approx(paper.comm_bytes_per_chip, rel=1e-12)
    kinds = [(c.kind, c.axes) for c in cm.layer_collectives(cfg, cm.Mesh(4, 2, 4), work,
                                                             "ws-2d-z", "batch", 48)]
    assert kinds[:4] == [("all-gather", "xy"), ("reduce-scatter", "z"), ("all-gather", "z"),
                         ("reduce-scatter", "xy")]
    plan = plan_config(cfg, hardware=hw, chips=64, batch=64, context=2048, phase="decode",
                       weights="int8")
    priced = {c.name for c in plan.candidates if c.ffn_layout == "ws-2d-z"}
    assert "ws-2d-z/batch 4x4x4" in priced
    refused = dict(plan.rejected)
    assert refused["ws-2d-z/heads 8x8x1"] == "ws-2d-z with Z = 1 is ws-1d"
    # ties go to the layouts registered first: the paper's ws-2d keeps its place
    assert (plan.best.ffn_layout, plan.best.attention_layout) == ("ws-2d", "batch")
    pinned = plan_config(cfg, hardware=hw, chips=64, batch=64, context=2048, phase="decode",
                         weights="int8", force_ffn="ws-2d-z")
    assert pinned.best.ffn_layout == "ws-2d-z" and pinned.best.mesh.z > 1
    assert stored_weights("ws-2d-z", {"x": 2, "y": 2, "z": 2})[0] == ("embed", ("z",))


def test_an_unregistered_layout_is_unknown_again(ws2d_z):
    L.unregister("ws-2d-z")
    try:
        with pytest.raises(ValueError, match="unknown FFN layout 'ws-2d-z'"):
            plan_config(get_config("palm-tiny"), hardware="cpu", chips=8, batch=8,
                        context=64, force_ffn="ws-2d-z")
    finally:
        L.register(ws2d_z)  # the fixture unregisters it


def test_mw_shard_lowers_a_registered_layout(ws2d_z):
    model = build(get_config("palm-tiny"))
    xs = model.example_args("decode", batch=8, length=16, key=jax.random.PRNGKey(0))
    want = jax.jit(model.fn("decode"))(*xs)
    step = mw.shard(model.fn("decode"), mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    hardware="cpu", force={"ffn": "ws-2d-z", "attention": "heads",
                                           "mesh": (2, 2, 2)})
    got = step(*xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    report = step.report(*xs)
    assert report["layouts"]["ffn"] == "ws-2d-z" and not report["replicated_fallbacks"]
    moved = report["collective_bytes"]
    assert moved["measured"] == pytest.approx(moved["predicted"], rel=0.1)


def test_the_docs_table_is_the_registry():
    with open(OVERVIEW) as f:
        text = f.read()
    assert L.layout_table() in text, (
        "docs/overview.md's layout table is not the registry: paste "
        "meshwright.passes.layouts.layout_table()")
