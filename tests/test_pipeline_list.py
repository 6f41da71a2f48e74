"""One list of mw.shard's stages (`meshwright.passes.PIPELINE`): the order mw.shard really
runs, the pass registry, the CLI and the docs' diagram all follow it."""

import os

import jax
import jax.numpy as jnp
import pytest
from meshwright.models import build, get_config
from meshwright.passes import (
    PASS_MODULES,
    PIPELINE,
    STAGES,
    Force,
    PassContext,
    PassManager,
    get_pass,
    pipeline_diagram,
    pipeline_passes,
)

import meshwright as mw

OVERVIEW = os.path.join(os.path.dirname(__file__), "..", "docs", "overview.md")


def test_mw_shard_runs_the_stages_in_the_listed_order():
    model = build(get_config("palm-tiny").replace(scan_layers=True))
    xs = model.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(0))
    step = mw.shard(model.fn("decode"), mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    hardware="cpu", weights="int8",
                    force={"ffn": "ws-2d", "attention": "batch", "mesh": (2, 2, 2)})
    ran = []
    c = step.compile_watched(lambda name, g: ran.append(name), *xs)
    assert tuple(ran) == STAGES
    assert [k for k in c.timings if k in STAGES] == list(STAGES)  # every stage timed
    # without int8 weights, its stage is the only one skipped
    step = mw.shard(model.fn("decode"), mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    hardware="cpu", force={"ffn": "ws-2d", "attention": "batch",
                                           "mesh": (2, 2, 2)})
    ran.clear()
    step.compile_watched(lambda name, g: ran.append(name), *xs)
    assert [s.name for s in PIPELINE if not s.when] == ran


def test_every_stage_but_trace_is_a_registered_pass():
    for stage in PIPELINE:
        if stage.name == "trace":  # it makes the graph
            with pytest.raises(KeyError, match="a stage of mw.shard, not a pass"):
                get_pass(stage.name)
            continue
        assert PASS_MODULES[stage.name] == stage.module
        assert get_pass(stage.name).name == stage.name


def test_the_passes_run_alone_with_a_context():
    """plan chooses the layouts and mesh into the context; annotate through lower read them:
    the same program as mw.shard's, from a PassManager over the pipeline's passes."""
    model = build(get_config("palm-tiny"))
    xs = model.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(0))
    ctx = PassContext(devices=tuple(jax.devices()[:8]), hardware="cpu",
                      force=Force("ws-2d", "batch", (2, 2, 2)))
    pm = PassManager(pipeline_passes(ctx), verify=True)
    g = pm.run(mw.trace(model.fn("decode"), *xs), ctx)
    assert list(pm.timings) == [s.name for s in PIPELINE[1:] if s.runs(ctx)]
    assert (ctx.results.choice.ffn, ctx.results.choice.attention) == ("ws-2d", "batch")
    assert ctx.results.mesh.sizes == {"x": 2, "y": 2, "z": 2}
    program = ctx.results.program
    step = mw.shard(model.fn("decode"), mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    hardware="cpu", force={"ffn": "ws-2d", "attention": "batch",
                                           "mesh": (2, 2, 2)})
    c = step.compiled(*xs)
    assert g.format() == c.graph.format()
    assert program.lowered.as_text() == c.lowered.as_text()


def test_a_bad_input_keeps_its_type_and_names_the_pass():
    """A ValueError inside a pass (PlanError, NotAsPlanned, ...) is raised as it is, with a
    note naming the pass and the passes before it; the CLI prints its one line."""
    from meshwright.passes.plan import PlanError

    g = mw.trace(lambda x, w: jax.nn.relu(x @ w), jnp.ones((4, 8)), jnp.ones((8, 8)))
    with pytest.raises(PlanError, match="no .*attention block") as e:
        PassManager(pipeline_passes(PassContext())[:4]).run(g)
    where = ("an error occurred when running the 'plan' pass after the following passes: "
             "['infer-axes', 'find-blocks', 'fuse-parallel-block']")
    assert e.value.__notes__ == [where]


def test_the_docs_diagram_is_the_list():
    with open(OVERVIEW) as f:
        text = f.read()
    block = text.split("```\n", 2)[1]
    assert block == pipeline_diagram() + "\n", (
        "docs/overview.md's diagram is not the pipeline: paste "
        "meshwright.passes.pipeline_diagram() in its first code block")
    assert [s.name for s in PIPELINE] == [n for n in STAGES]
    for stage in PIPELINE:
        assert f"─{stage.name}" in block


def test_the_cli_offers_every_stage(capsys):
    from meshwright import cli

    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps at hyphens
    assert ",".join(STAGES[1:]) in help_text
