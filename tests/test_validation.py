"""Bad input: every kind of value goes through one validator (meshwright/validate.py), so every
command and API refuses it the same way -- one line `meshwright <cmd>: error: ...` (or
{"error": ...} with --json) and exit 2 on the command line, an InvalidArgument naming the
value and the fix in Python. The command lines run in-process through cli.main; each is
refused before any model is built, so the cases cost milliseconds."""

from __future__ import annotations

import json

import pytest
from meshwright.passes.export import export_model

import meshwright as mw
from meshwright import validate
from meshwright.cli import main
from meshwright.validate import InvalidArgument

# (command line, what the one-line error must contain); {tmp} is a fresh folder
CLI_CASES = {
    "export-batch-negative": (["export", "--batch", "-4", "--out", "{tmp}/a"],
                              "--batch -4: must be a whole number >= 1"),
    "export-batch-zero": (["export", "--batch", "0", "--out", "{tmp}/a"], "--batch 0"),
    "export-length-zero": (["export", "--phase", "prefill", "--length", "0", "--out",
                            "{tmp}/a"], "--length 0: must be a whole number >= 1"),
    "export-out-missing-folder": (["export", "--out", "{tmp}/missing/dir/f"],
                                  "its folder {tmp}/missing/dir does not exist"),
    "export-mesh-four-axes": (["export", "--mesh", "2x2x2x2", "--out", "{tmp}/a"],
                              "--mesh '2x2x2x2': 4 axes"),
    "export-mesh-text": (["export", "--mesh", "axb", "--out", "{tmp}/a"],
                         "not a whole number"),
    "export-max-len-zero": (["export", "--max-len", "0", "--out", "{tmp}/a"],
                            "--max-len 0: must be a whole number >= 2"),
    "inspect-mesh-zero": (["inspect", "--after", "lower", "--mesh", "0x4"],
                          "--mesh '0x4': every size must be a whole number >= 1"),
    "inspect-mesh-four-axes": (["inspect", "--after", "lower", "--mesh", "2x2x2x2"],
                               "--mesh '2x2x2x2': 4 axes; a mesh has one to three"),
    "inspect-batch-zero": (["inspect", "--batch", "0"], "--batch 0"),
    "inspect-dot-missing-folder": (["inspect", "--dot", "{tmp}/no/g.dot"], "does not exist"),
    "plan-batch-zero": (["plan", "--batch", "0"], "--batch 0: must be a whole number >= 1"),
    "plan-chips-not-a-tpu-v4-slice": (["plan", "--chips", "7", "--hardware", "tpu-v4"],
                                      ("tpu-v4 slices do not come in 7 chips; the nearest "
                                       "sizes are 4 or 8")),
    "plan-chips-beyond-the-slice": (["plan", "--chips", "5000", "--hardware", "tpu-v4"],
                                    "--chips 5000"),
    "plan-kv-fraction": (["plan", "--kv-memory-fraction", "0"], "must be in (0, 1]"),
    "plan-checkpoint-missing": (["plan", "--checkpoint", "{tmp}/nothing"], "no such folder"),
    "frontier-png-missing-folder": (["frontier", "--png", "{tmp}/missing/dir/f.png"],
                                    "its folder {tmp}/missing/dir does not exist"),
    "frontier-chips-zero": (["frontier", "--chips", "8,0"], "--chips 0"),
    "frontier-chips-slice": (["frontier", "--chips", "8,7"], "do not come in 7 chips"),
    "bench-trace-missing": (["bench", "serve", "--trace", "{tmp}/missing.json"],
                            "--trace '{tmp}/missing.json': no such file"),
    "bench-max-len-zero": (["bench", "serve", "--max-len", "0"], "--max-len 0"),
    "bench-devices-zero": (["bench", "serve", "--devices", "0"], "--devices 0"),
    "bench-out-len-reversed": (["bench", "serve", "--out-len", "9", "3"],
                               "the range A B needs A <= B; e.g. --out-len 3 9"),
    "bench-rate-zero": (["bench", "serve", "--rate", "0"], "--rate 0.0: must be a number > 0"),
    "demo-max-len-zero": (["demo", "--max-len", "0"], "--max-len 0"),
    "demo-requests-zero": (["demo", "--requests", "0"], "--requests 0"),
    "serve-devices-zero": (["serve", "--devices", "0"], "--devices 0"),
    "calibrate-devices-zero": (["calibrate", "--devices", "0"], "--devices 0"),
    "launch-missing-command": (["launch", "-n", "2", "--", "/nonexistent/cmd"],
                               "COMMAND '/nonexistent/cmd': no such file"),
    "launch-not-on-path": (["launch", "-n", "2", "--", "no-such-program-here"],
                           "not a program on PATH"),
    "launch-no-command": (["launch", "-n", "2"], "no program given"),
    "launch-zero-processes": (["launch", "-n", "0", "--", "true"], "--processes 0"),
    "unknown-flag": (["plan", "--no-such-flag"], "unrecognized arguments"),
}


def _line(text: str, tmp) -> str:
    return text.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_bad_input_in_one_line(case, tmp_path, capsys):
    argv, want = CLI_CASES[case]
    argv = [_line(a, tmp_path) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    command = "meshwright" if argv[0] == "--no-such-flag" else f"meshwright {argv[0]}"
    assert out == ""
    assert err.startswith(f"{command}: error: ") and err.count("\n") == 1, err
    assert _line(want, tmp_path) in err, err
    # the same refusal as one JSON object on stdout
    assert main([argv[0], "--json", *argv[1:]]) == 2  # before a launch's "--"
    out, err = capsys.readouterr()
    assert err == ""
    assert _line(want, tmp_path) in json.loads(out)["error"]


def test_bench_header_says_how_many_requests_were_shortened():
    import re

    from meshwright.runtime.workload import make_workload

    w = make_workload(64, rate=10.0, out_len=(16, 256), max_len=64)
    m = re.search(r"output lengths uniform \[16, 256\], (\d+) of 64 shortened to fit "
                  r"max_len 64", w.description)
    assert m and 0 < int(m.group(1)) <= 64, w.description
    assert all(len(r.prompt) + r.max_tokens <= 64 for _, r in w.arrivals)
    assert "shortened" not in make_workload(8, out_len=(4, 8), max_len=64).description


def test_request_that_fills_max_len_gets_advice_it_can_follow():
    from meshwright.runtime.request import Request, validate_request

    msg = validate_request(Request(prompt=(1,) * 8, max_tokens=1), max_len=8, vocab_size=16)
    assert "shorten it to at most 7 tokens" in msg and "or less" not in msg


# ---- the Python API: the same validators, typed exceptions ---------------------------------

API_CASES = {
    "make_mesh-zero": (lambda: mw.make_mesh({"x": 0}), "mesh {'x': 0}: axis x is 0"),
    "make_mesh-negative": (lambda: mw.make_mesh({"x": -2}), "axis x is -2"),
    "make_mesh-unknown-axis": (lambda: mw.make_mesh({"w": 2}), "no axis named w"),
    "make_mesh-four-axes": (lambda: mw.make_mesh((2, 2, 2, 2)), "4 axes"),
    "make_mesh-too-many-devices": (
        lambda: mw.make_mesh({"x": 4, "y": 4}),
        ("a 4x4x1 mesh needs 16 devices and JAX has 8; on CPU set "
         "XLA_FLAGS=--xla_force_host_platform_device_count=16")),
    "plan-chips-slice": (lambda: mw.plan("palm-8b", hardware="tpu-v4", chips=7),
                         "chips 7: tpu-v4 slices do not come in 7 chips"),
    "plan-batch-zero": (lambda: mw.plan("palm-8b", chips=8, batch=0), "batch 0"),
    "plan-context-negative": (lambda: mw.plan("palm-8b", chips=8, context=-1), "context -1"),
    "engine-max-len-zero": (lambda: mw.runtime.Engine("palm-tiny", max_len=0, warmup=False),
                            "max_len 0: must be a whole number >= 2"),
    "engine-max-slots-zero": (lambda: mw.runtime.Engine("palm-tiny", max_slots=0,
                                                         warmup=False), "max_slots 0"),
    "bench-devices-zero": (lambda: mw.runtime.bench.make_engine(devices=0), "devices 0"),
    "workload-prompt-len": (lambda: mw.runtime.workload.make_workload(4, prompt_len=(0, 4)),
                            "prompt_len 0"),
    "export-batch": (lambda: export_model("palm-tiny", batch=-4),
                     "batch -4: must be a whole number >= 1"),
    "export-mesh": (lambda: export_model("palm-tiny", mesh=(0, 4)),
                    "every size must be a whole number >= 1"),
    "export-length-past-max-len": (
        lambda: export_model("palm-tiny", phase="prefill", length=4096,
                                              mesh=(2, 2, 2)),
        "length 4096: is longer than max_len=128"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses_bad_input_with_a_typed_error(case):
    call, want = API_CASES[case]
    with pytest.raises(InvalidArgument) as e:
        call()
    assert want in str(e.value)
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


@pytest.mark.parametrize("spec, sizes", [("2x2x2", (2, 2, 2)), ("8", (8, 1, 1)),
                                         ({"y": 4}, (1, 4, 1)), ((2, 4), (2, 4, 1))])
def test_mesh_shapes_accepted(spec, sizes):
    assert validate.mesh_shape(spec) == sizes


def test_true_is_not_a_count():
    with pytest.raises(InvalidArgument, match="not a whole number"):
        validate.positive_int(True, "batch")


# ---- device count: each command simulates what its request needs --------------------------

def test_every_command_simulates_the_devices_its_request_needs():
    """A fresh process (the flag is read when JAX starts): the count each command line asks
    for, then `inspect --mesh 4x2x2` lowered for real on the 16 devices it set."""
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from meshwright import cli\n"
        "needs = {}\n"
        "for argv in (['inspect', '--mesh', '4x4x4', '--after', 'lower'],\n"
        "             ['inspect', '--mesh', '4x4x4'], ['bench', 'serve', '--devices', '16'],\n"
        "             ['serve', '--devices', '12'], ['export', '--mesh', '2x2x4', '--out', 'x'],\n"
        "             ['plan'], ['demo']):\n"
        "    needs[' '.join(argv)] = cli.devices_needed(cli.build_parser().parse_args(argv))\n"
        "print(json.dumps(needs))\n"
        "import os\n"
        "cli._simulate_devices(1)  # one device: XLA's own, no flag\n"
        "assert 'XLA_FLAGS' not in os.environ, os.environ['XLA_FLAGS']\n"
        "rc = cli.main(['inspect', '--mesh', '4x2x2', '--after', 'lower', '--batch', '16',\n"
        "               '--json'])\n"
        "import jax\n"
        "print(json.dumps({'rc': rc, 'devices': jax.device_count()}))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[0]) == {
        "inspect --mesh 4x4x4 --after lower": 64, "inspect --mesh 4x4x4": 0,
        "bench serve --devices 16": 16, "serve --devices 12": 12,
        "export --mesh 2x2x4 --out x": 16, "plan": 0, "demo": 8}
    graph = json.loads("\n".join(lines[1:-1]))
    assert graph["after"] == "lower" and any("_x" in line for line in graph["graph"])
    assert json.loads(lines[-1]) == {"rc": 0, "devices": 16}
