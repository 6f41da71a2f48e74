"""Nothing runs other than planned in silence: a value the layout splits whose size does not
divide over its mesh axes runs replicated (still correct) and is listed with its reason in
explain(), report(), --json and the export manifest; strict=True / --strict refuses it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes.compiler import NotAsPlanned
from meshwright.passes.export import export_model

import meshwright as mw
from meshwright.cli import main

FORCED_BATCH = {"ffn": "ws-2d", "attention": "batch", "mesh": (2, 2, 2)}


@pytest.fixture(scope="module")
def palm():
    return build(get_config("palm-tiny"))


def test_a_batch_the_mesh_does_not_divide_is_reported_and_correct(palm):
    args = palm.example_args("decode", batch=3, key=jax.random.PRNGKey(1))
    step = mw.shard(palm.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    force=FORCED_BATCH)
    got, want = step(*args), palm.decode_step(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    fallbacks = step.report(*args)["replicated_fallbacks"]
    caches = [f for f in fallbacks if f.startswith("cache.")]
    assert len(caches) == 2 * 2 and all(  # k and v of both layers
        "(batch, 3) is not split over" in f and "3 does not divide by 8" in f for f in caches)
    explained = step.explain(*args)
    assert "ran replicated" in explained and caches[0] in explained
    with pytest.raises(NotAsPlanned, match=r"strict: 4 part\(s\) would run replicated"):
        mw.shard(palm.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                 force=FORCED_BATCH, strict=True)(*args)


def test_the_planners_own_choice_runs_as_planned(palm):
    args = palm.example_args("decode", batch=8)
    step = mw.shard(palm.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}), strict=True)
    step.lower(*args)  # strict raises while lowering if anything would not run as planned
    assert step.report(*args)["replicated_fallbacks"] == []
    assert "nothing ran replicated" in step.explain(*args)


INSPECT_3 = ["inspect", "palm-tiny", "--after", "lower", "--mesh", "3x1x1", "--force-ffn",
             "ws-1d", "--force-attention", "heads"]


def test_inspect_lists_what_ran_replicated_and_strict_refuses(capsys):
    assert main([*INSPECT_3, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    heads = [f for f in out["replicated_fallbacks"] if "(heads, 8)" in f]
    assert heads and all("8 does not divide by 3" in f for f in heads)
    assert main(INSPECT_3) == 0
    err = capsys.readouterr().err
    assert "ran replicated (correct, not sharded as planned" in err and heads[0] in err
    assert main([*INSPECT_3, "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshwright inspect: error: strict: ") and err.count("\n") == 1


def test_the_export_manifest_lists_what_ran_replicated(tmp_path):
    program = export_model("palm-tiny", platforms="cpu", mesh=(3, 1, 1))
    path = tmp_path / "p.mwx"
    program.save(path)
    manifest = json.loads((tmp_path / "p.mwx.json").read_text())
    assert any("(heads, 8) is not split over x (3 devices)" in f
               for f in manifest["replicated_fallbacks"])
    with pytest.raises(NotAsPlanned):
        export_model("palm-tiny", platforms="cpu", mesh=(3, 1, 1), strict=True)
