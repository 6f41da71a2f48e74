"""Export: a PaLM-style model planned for a 4x4x4 TPU v4 mesh lowers for tpu and cuda here
(a subprocess with 64 simulated CPU devices), its StableHLO holds the collectives the
lowering emitted and the cost model predicts; a cpu export round-trips through
mw.load_exported with the live program's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes.export import load_exported, stablehlo_collectives
from zoo import fused_qkv_transformer

import meshwright as mw

# PaLM-style (parallel blocks, multiquery, SwiGLU, RoPE), small enough to export in seconds
PALM_SET = ["d_model=256", "d_ff=1024", "n_heads=16", "vocab_size=512"]


# PaLM 8B's and 540B's structure on 4x4x4, small: 16 and 48 heads, which the 64 chips do not
# divide (ws-1d splits 16 heads over x, y; ws-2d 48 over z, y), multiquery K/V, batch 64
HEADS_SET = ["d_model=128", "d_ff=256", "vocab_size=512", "d_head=16", "max_len=32"]
HEADS_CASES = [(16, "ws-1d"), (48, "ws-2d"), (48, "wg-x")]
# the fused-QKV model's layouts
FUSED_FORCE = {"ffn": "ws-2d", "attention": "heads"}


@pytest.fixture(scope="module")
def exported_4x4x4(tmp_path_factory):
    """Every 4x4x4 export of this module in one fresh process of 64 simulated devices
    (lowering only, no XLA compile for this machine), one JSON line per part:
    - "palm": `meshwright export ... --mesh 4x4x4` for tpu and for cuda (the same plan, TPU
      v4, lowered for each platform); it runs first, with XLA_FLAGS unset: the command sets
      the 64 devices itself;
    - "heads": decode at batch 64, attention over batch, for tpu (export_model): the
      StableHLO's bytes and the prediction, per HEADS_CASES;
    - "fused", "int8": the test zoo's fused-QKV model through step.export, and palm-tiny
      with int8 weights through `meshwright export`."""
    tmp = tmp_path_factory.mktemp("export")
    tests = os.path.dirname(__file__)
    code = (
        "import contextlib, io, json, sys\n"
        f"sys.path.insert(0, {tests!r})\n"
        "from meshwright.cli import main\n"
        "def cli(args):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        assert main(args) == 0\n"
        "    return json.loads(out.getvalue())\n"
        "palm = []\n"
        "for platform in ('tpu', 'cuda'):\n"
        "    args = ['export', 'palm-tiny', '--platform', platform, '--mesh', '4x4x4',\n"
        "            '--hardware', 'tpu-v4', '--phase', 'decode', '--batch', '64', '--json',\n"
        f"            '--out', {str(tmp)!r} + f'/palm.{{platform}}.mwx']\n"
        f"    for s in {PALM_SET!r}:\n"
        "        args += ['--set', s]\n"
        "    palm.append(cli(args))\n"
        "print(json.dumps({'palm': palm}))\n"
        "import jax\n"
        "assert jax.device_count() == 64, jax.device_count()\n"
        "from meshwright.passes.export import export_model\n"
        "heads = []\n"
        f"for n_heads, ffn in {HEADS_CASES!r}:\n"
        f"    p = export_model('palm-tiny', overrides={HEADS_SET!r} + [f'n_heads={{n_heads}}'],\n"
        "                     batch=64, force_ffn=ffn, force_attention='batch',\n"
        "                     hardware='tpu-v4')\n"
        "    heads.append({'counted': p.collectives(),\n"
        "                  'predicted': p.manifest['predicted']['comm_bytes_per_chip']})\n"
        "print(json.dumps({'heads': heads}))\n"
        "import meshwright as mw\n"
        "from zoo import fused_qkv_transformer\n"
        "fn, args = fused_qkv_transformer(jax.random.PRNGKey(0))\n"
        "shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)\n"
        "step = mw.shard(fn, mesh=mw.make_mesh({'x': 4, 'y': 4, 'z': 4}), hardware='tpu-v4',\n"
        f"                force=dict({FUSED_FORCE!r}, mesh=(4, 4, 4)))\n"
        "program = step.export(*shapes, platforms='tpu')\n"
        f"program.save({str(tmp)!r} + '/fused.mwx')\n"
        "int8 = cli(['export', 'palm-tiny', '--weights', 'int8', '--platform', 'tpu',\n"
        "            '--mesh', '4x4x4', '--batch', '64', '--json',\n"
        f"            '--out', {str(tmp)!r} + '/int8.mwx'])\n"
        "print(json.dumps({'fused': program.collectives(), 'int8': int8}))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # meshwright export sets 64 devices itself
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    parts = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            parts.update(json.loads(line))
    return tmp, parts


@pytest.fixture(scope="module")
def exported_64(exported_4x4x4):
    tmp, parts = exported_4x4x4
    return tmp, parts["palm"]


def test_palm_exports_for_tpu_and_cuda_on_a_4x4x4_mesh(exported_64):
    tmp, summaries = exported_64
    assert [s["platforms"] for s in summaries] == [["tpu"], ["cuda"]]
    for s in summaries:
        assert s["mesh"] == {"x": 4, "y": 4, "z": 4}
        manifest = json.loads((tmp / f"palm.{s['platforms'][0]}.mwx.json").read_text())
        assert manifest["format"] == "meshwright-export/1"
        assert manifest["devices"] == 64 and manifest["model"] == "palm-tiny"
        assert manifest["model_config"]["d_model"] == 256
        assert manifest["model_config"]["parallel_block"] is True
        assert manifest["jax_version"] == jax.__version__
        assert manifest["meshwright_version"] == mw.__version__
        assert manifest["layouts"]["ffn"] and manifest["layouts"]["attention"]
        assert len(manifest["inputs"]) > 10 and all("spec" in i for i in manifest["inputs"])
        assert manifest["bytes"] == (tmp / manifest["artifact"]).stat().st_size


def test_tpu_stablehlo_holds_the_predicted_collectives(exported_64):
    tmp, summaries = exported_64
    tpu = summaries[0]
    counted, emitted = tpu["collectives_in_stablehlo"], tpu["collectives_emitted"]
    assert counted["loops"] == 0  # layers unrolled: every collective counted once is right
    assert counted["count"] == {k: v["count"] for k, v in emitted.items()}
    assert counted["bytes"] == {k: v["bytes"] for k, v in emitted.items()}
    predicted = tpu["predicted"]["comm_bytes_per_chip"]
    assert abs(counted["total_bytes"] / predicted - 1) < 0.01
    # the same count from the deserialized artifact's own module text
    program = load_exported(tmp / "palm.tpu.mwx")
    assert program.collectives() == counted
    assert program.exported.platforms == ("tpu",)
    with pytest.raises(ValueError, match="exported for tpu, and this process runs on cpu"):
        program(*[np.zeros(i["shape"], i["dtype"]) for i in program.manifest["inputs"]])


@pytest.fixture(scope="module")
def exported_heads(exported_4x4x4):
    """Per HEADS_CASES: the StableHLO's collectives and the cost model's bytes per chip."""
    return exported_4x4x4[1]["heads"]


@pytest.mark.parametrize("case", range(len(HEADS_CASES)))
def test_heads_the_mesh_does_not_divide_export_the_predicted_bytes(exported_heads, case):
    """The attention-over-batch all-to-alls move what each chip keeps, the block output is
    reduced once, multiquery K/V weights stay split: within 2% of the cost model (the rest is
    the norms' statistics, which it does not price)."""
    row = exported_heads[case]
    counted = row["counted"]
    assert abs(counted["model_bytes"] / row["predicted"] - 1) < 0.02, (HEADS_CASES[case], row)
    assert counted["bytes"].get("all-reduce", 0) < 0.01 * counted["model_bytes"]


def test_cpu_export_round_trips_with_the_live_logits(tmp_path):
    model = build(get_config("palm-tiny"))
    args = model.example_args("decode", batch=8, key=jax.random.PRNGKey(3))
    step = mw.shard(model.decode_step, mesh=mw.make_mesh({"y": 2, "z": 2}),
                    force={"ffn": "ws-2d", "attention": "batch", "mesh": (1, 2, 2)})
    live = step(*args)
    program = step.export(*args, platforms=("cpu",))
    program.save(tmp_path / "step.mwx")
    loaded = mw.load_exported(tmp_path / "step.mwx")
    assert loaded.manifest["layouts"] == {"ffn": "ws-2d", "attention": "batch"}
    got = loaded(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(live)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # shapes alone export too (no weights in memory)
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    assert step.export(*structs, platforms="cpu").collectives() == program.collectives()
    # another batch than exported: refused by name, not JAX's IndivisibleError
    other = model.example_args("decode", batch=4, key=jax.random.PRNGKey(3))
    with pytest.raises(ValueError, match=r"was exported for \w+\[8.*got \w+\[4.*export it "
                                         r"again"):
        loaded(*other)


def test_bad_artifacts_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported program"):
        mw.load_exported(tmp_path / "missing.mwx")
    (tmp_path / "a.mwx").write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="has no manifest"):
        mw.load_exported(tmp_path / "a.mwx")
    (tmp_path / "a.mwx.json").write_text(json.dumps({"format": "meshwright-export/1",
                                                     "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="does not match the checksum"):
        mw.load_exported(tmp_path / "a.mwx")


def test_stablehlo_counter_on_a_small_module():
    text = """module @m {
  func.func public @main(%arg0: tensor<4x8xf32>) -> (tensor<16x8xf32>) {
    %0 = call @body(%arg0) : (tensor<4x8xf32>) -> tensor<16x8xf32>
    %1 = call @body(%arg0) : (tensor<4x8xf32>) -> tensor<16x8xf32>
    return %0 : tensor<16x8xf32>
  }
  func.func private @body(%arg0: tensor<4x8xf32>) -> (tensor<16x8xf32>) {
    %0 = "stablehlo.all_gather"(%arg0) <{all_gather_dim = 0 : i64}> : (tensor<4x8xf32>) -> tensor<16x8xf32>
    %1 = "stablehlo.all_reduce"(%arg0) ({
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %2 = stablehlo.add %a, %b : tensor<f32>
      stablehlo.return %2 : tensor<f32>
    }) : (tensor<4x8xf32>) -> tensor<4x8xf32>
    return %0 : tensor<16x8xf32>
  }
}"""
    counted = stablehlo_collectives(text)
    assert counted["count"] == {"all-gather": 2, "all-reduce": 2}
    assert counted["bytes"] == {"all-gather": 2 * 16 * 8 * 4, "all-reduce": 2 * 4 * 8 * 4}


def test_stablehlo_counter_counts_a_looped_einsum_as_the_collective_it_replaces():
    """Three ppermutes around a ring of 4 (a looped collective einsum) pass 3 of the 4 blocks
    of the all-gather they replace; `model_bytes` counts that all-gather whole."""
    import numpy as np

    ring = [[0, 1], [1, 2], [2, 3], [3, 0]]
    hexed = "0x" + np.asarray(ring, "<i8").tobytes().hex().upper()
    perm = ('%{n} = "stablehlo.collective_permute"(%arg0) <{{source_target_pairs = '
            'dense<{pairs}> : tensor<4x2xi64>}}> : (tensor<4x8xf32>) -> tensor<4x8xf32>')
    lines = [perm.format(n=i, pairs=str(ring) if i else f'"{hexed}"') for i in range(3)]
    text = ("module @m {\n  func.func public @main(%arg0: tensor<4x8xf32>) -> "
            "(tensor<4x8xf32>) {\n    " + "\n    ".join(lines) +
            "\n    return %arg0 : tensor<4x8xf32>\n  }\n}")
    counted = stablehlo_collectives(text)
    assert counted["count"] == {"collective-permute": 3}
    assert counted["total_bytes"] == 3 * 4 * 8 * 4
    assert counted["model_bytes"] == 4 * 4 * 8 * 4


# ---- programs that convert weights at load time: fused Q/K/V interleaved, int8 ----------------

@pytest.fixture(scope="module")
def exported_converted_64(exported_4x4x4):
    tmp, parts = exported_4x4x4
    return tmp, parts["fused"], parts["int8"]


def test_fused_qkv_and_int8_export_for_a_4x4x4_tpu_mesh(exported_converted_64):
    tmp, fused_counted, cli = exported_converted_64
    fused = load_exported(tmp / "fused.mwx")
    assert fused.collectives() == fused_counted
    assert fused.manifest["load_conversion"]["weights"] == ["params['qkv']",
                                                            "params['qkv_b']"]
    qkv = next(i for i in fused.manifest["inputs"] if i["path"] == "params['qkv']")
    assert qkv["shape"] == [32, 96] and "interleave dim 1" in qkv["converted"]["steps"][0]
    # it arrives split over the FFN layout's (y, z) as the program takes its permutation
    assert qkv["converted"]["to"] == [{"shape": [32, 96], "dtype": "float32",
                                       "spec": qkv["spec"]}]
    assert qkv["spec"][1] is not None
    int8 = load_exported(tmp / "int8.mwx")
    assert cli["load_conversion"]["weights"] == int8.manifest["load_conversion"]["weights"]
    converted = [i for i in int8.manifest["inputs"] if "converted" in i]
    assert len(converted) == 14 and all(i["dtype"] == "float32" for i in converted)
    assert all([t["dtype"] for t in i["converted"]["to"]] == ["int8", "float32"]
               for i in converted)
    # the program's collectives are the lowering's; the conversion's run once, apart
    assert cli["collectives_in_stablehlo"]["count"] == {
        k: v["count"] for k, v in cli["collectives_emitted"].items()}
    for program in (fused, int8):
        assert program.exported.platforms == program.conversion.platforms == ("tpu",)
        assert (tmp / program.manifest["load_conversion"]["artifact"]).stat().st_size == \
            program.manifest["load_conversion"]["bytes"]
        with pytest.raises(ValueError, match="exported for tpu, and this process runs on cpu"):
            program(*[np.zeros(i["shape"], i["dtype"]) for i in program.manifest["inputs"]])


def _round_trip(step, args, path):
    live = step(*args)
    step.export(*args, platforms="cpu").save(path)
    loaded = mw.load_exported(path)
    got = loaded(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(live)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return loaded


def test_fused_qkv_export_round_trips_on_cpu(tmp_path):
    """The zoo's fused-QKV model (its Q/K/V weight stored interleaved for 4 shards of the
    fused dimension): exported for cpu on 8 devices, loaded, run: the live program's
    logits bit for bit; the weights are converted by the artifact's conversion, once."""
    fn, args = fused_qkv_transformer(jax.random.PRNGKey(1))
    step = mw.shard(fn, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    force=dict(FUSED_FORCE, mesh=(2, 2, 2)))
    assert any("interleave" in t for t in step.compiled(*args).describe_load_transforms())
    loaded = _round_trip(step, args, tmp_path / "fused.mwx")
    first = loaded.convert(jax.tree.leaves(args), loaded.mesh())
    assert loaded.convert(jax.tree.leaves(args), loaded.mesh()) is first  # converted once
    # the caller's structure, not the program's (a converted weight is one argument)
    with pytest.raises(ValueError, match=r"exported PyTreeDef\(\(\{.*'qkv': \*, 'qkv_b': \*"):
        loaded(args[0])
    (tmp_path / "fused.mwx.convert").unlink()
    with pytest.raises(FileNotFoundError, match="conversion fused.mwx.convert is missing"):
        mw.load_exported(tmp_path / "fused.mwx")


def test_int8_export_round_trips_on_cpu(tmp_path):
    """palm-tiny with int8 weights on 8 devices: the artifact takes the float weights and
    converts them as mw.shard does (bit for bit), then runs the int8 program."""
    model = build(get_config("palm-tiny"))
    args = model.example_args("decode", batch=8, key=jax.random.PRNGKey(4))
    step = mw.shard(model.decode_step, mesh=mw.make_mesh({"x": 2, "y": 2, "z": 2}),
                    weights="int8", force={"ffn": "ws-2d", "attention": "batch",
                                           "mesh": (2, 2, 2)})
    loaded = _round_trip(step, args, tmp_path / "int8.mwx")
    assert len(loaded.manifest["load_conversion"]["weights"]) == 14
