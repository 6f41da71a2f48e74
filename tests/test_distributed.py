"""Several processes, one mesh: every layout, serving, checkpoint reads and failures, run as
real multi-process jobs on 127.0.0.1 (tests/distributed_job.py is the program they run).

Two jobs share the work, each checking several things so that few processes start:
2 processes x 4 devices (four layouts, greedy serving of a Poisson workload, checkpoint
blocks) and 4 processes x 2 devices (the fifth FFN layout, checkpoint blocks). Together
they cover every FFN layout and both attention layouts. Each layout's gathered outputs are
compared (in the job's process 0) with the same function run unsharded on one device; this
process serves the same workload with a one-process engine to compare the tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from distributed_job import serve_workload
from meshwright.runtime import distributed as dist
from meshwright.runtime.launch import launch, spawn, stop

import meshwright as mw

JOB = str(Path(__file__).with_name("distributed_job.py"))
DEADLINE_S = 400  # a job that takes longer has hung: fail instead of waiting


def run_job(tmp: Path, processes: int, devices: int, *parts: str) -> list[dict]:
    result = launch([sys.executable, JOB, str(tmp), *parts], processes,
                    devices_per_process=devices, timeout_s=180, deadline_s=DEADLINE_S,
                    out=None, keep_output=True)
    log = "\n".join(f"[p{p}] {line}" for p, lines in result.output.items() for line in lines
                    if "Gloo" not in line)
    assert result.returncode == 0, log[-4000:]
    return [json.loads((tmp / f"result{p}.json").read_text()) for p in range(processes)]


@pytest.fixture(scope="module")
def job_2x4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job2x4")
    return run_job(tmp, 2, 4, "layouts=0,1,2,3", "checkpoint", "serve", "planned",
                   "stretched", "pipeline", "calibrate")


@pytest.fixture(scope="module")
def job_4x2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job4x2")
    return run_job(tmp, 4, 2, "layouts=4", "checkpoint")


def check_layouts(results: list[dict]) -> list[str]:
    checked = []
    for k, row in enumerate(results[0]["layouts"]):
        # process 0 compared the gathered outputs with the function run unsharded on one
        # device (test_lower's tolerance), and every process gathered the same bytes
        assert row["max_abs_err_vs_unsharded"] < 2e-5, row
        assert {r["layouts"][k]["output_sha256"] for r in results} == {row["output_sha256"]}
        # the inputs really were laid out over several processes' devices
        assert row["inputs_spanning_processes"] > 0
        checked.append(f"{row['ffn']}/{row['attention']}")
    return checked


def test_layouts_on_2_processes_x_4_devices(job_2x4):
    results = job_2x4
    assert [(r["num_processes"], r["local_devices"], r["devices"]) for r in results] == \
        [(2, 4, 8)] * 2
    assert check_layouts(results) == ["ws-1d/heads", "ws-2d/batch", "wg-x/heads",
                                           "wg-xy/batch"]


def test_layouts_on_4_processes_x_2_devices(job_4x2):
    results = job_4x2
    assert [(r["num_processes"], r["local_devices"]) for r in results] == [(4, 2)] * 4
    assert check_layouts(results) == ["wg-xyz/heads"]


def test_a_model_planned_over_processes_runs_as_replicas(job_2x4):
    """mw.shard with nothing pinned on 2 processes x 4 devices: each process a node; the
    planner's best is a replica per node, and that runs: the batch split over a `replica`
    axis whose replicas are the processes, nothing else crossing them, equal to one device."""
    planned = job_2x4[0]["planned"]
    assert planned["max_abs_err_vs_unsharded"] < 2e-5, planned
    assert (planned["nodes"], planned["cross_node"], planned["replicas"]) == (2, "replicas", 2)
    assert planned["axes"] == ["replica", "x", "y", "z"]
    assert planned["replica_processes"] == [[0], [1]]
    assert planned["inputs_spanning_processes"] > 0
    assert planned["slow_bytes"] == 0 < planned["collective_bytes"]
    assert "lowered as 2 replicas" in planned["explain"]
    assert "does not lower" not in planned["explain"]


def test_pipeline_stages_over_processes_when_a_copy_does_not_fit_a_node(job_2x4):
    """Chips too small for a copy per node: the planner's best is 2 pipeline stages, and that
    runs: stage s on process s, holding its layers' weights and KV cache (the stacked arrays
    split over `stage`), the activations sent between the processes, equal to one device."""
    run = job_2x4[0]["pipeline"]
    assert run["max_abs_err_vs_unsharded"] < 2e-5, run
    assert (run["nodes"], run["cross_node"], run["replicas"]) == (2, "pipeline", 1)
    assert run["axes"] == ["stage", "x", "y", "z"]
    assert run["stage_processes"] == [[0], [1]]
    # the 8 stacked layer weights and the K and V caches: each stage its layers
    assert len(run["stacked_inputs_on_stages"]) == 10
    assert all(spec.startswith(("P('stage'", "P(('stage',"))
               for spec in run["stacked_inputs_on_stages"])
    assert "lowered as 2 pipeline stages" in run["explain"]
    assert "does not lower" not in run["explain"]
    # between the processes: the activations' hops and the outputs' return, as priced
    assert 0 < run["slow_bytes"] == pytest.approx(run["slow_bytes_predicted"])


def test_a_layout_stretched_over_processes_when_pinned(job_2x4):
    """The same chips with the stretched layout pinned (force={"cross_node": "stretched"}):
    it runs over all 8 devices (one axis across the processes), says so, equals one device,
    and sends across the processes what the model predicts."""
    run = job_2x4[0]["stretched"]
    assert run["max_abs_err_vs_unsharded"] < 2e-5, run
    assert (run["nodes"], run["cross_node"], run["replicas"]) == (2, "stretched", 1)
    assert run["mesh_processes"] == [0, 1] and run["inputs_spanning_processes"] > 0
    assert run["axes"] == ["x", "y", "z"] and np.prod(list(run["mesh"].values())) == 8
    assert sorted(run["slow"]) == [1, 1, 2]  # one axis crosses the two processes
    axis = "xyz"[run["slow"].index(2)]
    assert f"; {axis} over 2 nodes (each node a process)" in run["explain"]
    assert run["slow_bytes"] == pytest.approx(run["slow_bytes_predicted"], rel=0.1)


def test_calibrate_under_launch_measures_the_network_between_processes(job_2x4):
    """`meshwright calibrate` in a launched job times all-gathers over an axis across the
    processes, fits bandwidth and latency, and process 0 writes them into the profile it
    saves (the in-node figures kept: here the defaults); the planner reads them back."""
    from meshwright.passes.calibrate import CHAIN
    from meshwright.passes.hardware import CPU_DEFAULT, HardwareProfile

    lead, other = (r["calibrate"] for r in job_2x4)
    assert other["saved"] is None and "(process 0 saves it)" in other["text"]
    saved = json.loads(Path(lead["saved"]).read_text())
    profile = HardwareProfile.from_dict(saved["profile"])
    net = lead["network"]
    assert (net["processes"], net["devices_per_process"]) == (2, 4)
    assert len(net["collectives"]) == len(net["in_node"]) == 3
    assert net["collectives_per_program"] == CHAIN
    assert profile.dcn_bandwidth == net["bandwidth_per_device"] > 0
    assert profile.dcn_latency_s == net["latency_s"] > 0 and profile.dcn_efficiency == 1.0
    assert "under `meshwright launch -n 2` (4 devices each)" in profile.source
    # the in-node figures are the profile's before (none saved: the defaults)
    assert (profile.ici_bandwidth, profile.max_chips) == (CPU_DEFAULT.ici_bandwidth,
                                                           CPU_DEFAULT.max_chips)
    assert "bandwidth per device" in lead["text"] and "inside a process" in lead["text"]


def test_each_process_reads_only_its_checkpoint_blocks(job_2x4, job_4x2):
    for results, blocks in ((job_2x4, 4), (job_4x2, 2)):
        for r in results:
            # (16, 24) split 4 x 2 over 8 devices: each process reads its devices' blocks
            assert r["checkpoint"] == {"reads": True, "blocks_read": blocks,
                                       "rows_read": 4 * blocks, "equal": True}


def test_greedy_serving_equals_single_process(job_2x4):
    from meshwright.models import build, get_config
    from meshwright.runtime.engine import Engine, StepClock

    results = job_2x4
    served = results[0]["serve"]
    model = build(get_config("palm-tiny").replace(scan_layers=True))
    params = jax.tree.map(lambda a: a * 10 if a.ndim >= 2 else a,
                          model.init_params(jax.random.PRNGKey(0)))
    engine = Engine(model, params, max_slots=4, max_len=16, prefill_lengths=(16,),
                    progress=False)
    report = engine.serve(serve_workload(), clock=StepClock(1e-3))
    assert served["tokens"] == [r.tokens for r in report.results]
    assert served["decode_steps"] == report.metrics["decode_steps"]
    assert served["kv_moves"] == report.metrics["kv_moves"] > 0  # the shuffle ran
    assert served["mesh_processes"] == [0, 1]  # planned over both processes' devices
    assert results[1]["followed_steps"] == served["steps"] > served["decode_steps"]


def _pump(proc, lines):
    for raw in iter(proc.stdout.readline, b""):
        lines.append(raw.decode(errors="replace"))


@pytest.mark.parametrize("victim,how", [(1, signal.SIGKILL), (0, signal.SIGSTOP)])
def test_a_lost_process_stops_the_others(tmp_path, victim, how):
    """Kill one process mid-run (or freeze the coordinator's): the others exit with
    EXIT_PEER_LOST and a message naming what was lost, within the timeout."""
    timeout_s = 3.0
    procs = spawn([sys.executable, JOB, str(tmp_path), "kill"], 2, devices_per_process=2,
                  timeout_s=timeout_s)
    lines = [[], []]
    pumps = [threading.Thread(target=_pump, args=(p, out), daemon=True)
             for p, out in zip(procs, lines)]
    for t in pumps:
        t.start()
    try:
        t0 = time.monotonic()
        while not all(any(x.startswith("step 2") for x in out) for out in lines):
            assert time.monotonic() - t0 < 120, lines
            assert all(p.poll() is None for p in procs), lines
            time.sleep(0.05)
        os.kill(procs[victim].pid, how)
        killed = time.monotonic()
        survivor = procs[1 - victim]
        code = survivor.wait(timeout=3 * timeout_s + 10)
        waited = time.monotonic() - killed
    finally:
        stop(procs)
    for t in pumps:
        t.join(timeout=5)
    text = "".join(lines[1 - victim])
    assert code == dist.EXIT_PEER_LOST, text[-2000:]
    assert waited < 2 * timeout_s + 3, waited
    assert f"meshwright.distributed: process {1 - victim}: error:" in text
    if victim == 1:  # its connections close: the collective fails at once, or beats stop
        assert ("process 1 has sent no heartbeat" in text or "did not finish within" in text
                or "(another process died or its connection broke)" in text), text[-2000:]
    else:  # frozen: its connections stay open, nothing answers
        assert "did not finish within" in text or "lost the coordinator" in text, text[-2000:]


def test_unreachable_coordinator_is_a_clear_error():
    from meshwright.runtime.launch import free_port

    port = free_port()
    with pytest.raises(dist.DistributedError, match=f"could not reach the coordinator at "
                       f"127.0.0.1:{port} within 0.5 s.*start process 0"):
        dist.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_s=0.5)
    with pytest.raises(dist.DistributedError, match="need a coordinator address"):
        dist.initialize(num_processes=2, process_id=1)


def test_launch_streams_output_and_stops_the_others_when_one_fails(capsys, tmp_path):
    from meshwright.cli import main

    marker = tmp_path / "p0-spoke"
    # process 1 fails (exit 7) once process 0 has printed; process 0 would sleep a minute
    code = ("import os, sys, time, pathlib; pid = os.environ['MESHWRIGHT_PROCESS_ID']; "
            "print('hello from', pid, os.environ['MESHWRIGHT_NUM_PROCESSES'], "
            "os.environ['MESHWRIGHT_COORDINATOR'], flush=True); "
            f"marker = pathlib.Path({str(marker)!r}); "
            "pid == '0' and marker.touch(); "
            "[time.sleep(0.05) for _ in range(600) if pid == '1' and not marker.exists()]; "
            "sys.exit(7) if pid == '1' else time.sleep(60)")
    t0 = time.monotonic()
    assert main(["launch", "-n", "2", "--", sys.executable, "-c", code]) == 7
    assert time.monotonic() - t0 < 20
    out = capsys.readouterr().out
    assert "[p1] hello from 1 2 127.0.0.1:" in out
    assert "[p0] hello from 0 2 127.0.0.1:" in out
    assert "meshwright launch: process 1 exited with code 7; stopped process 0" in out
    ok = launch([sys.executable, "-c", "print('fine')"], 3, out=None, keep_output=True)
    assert ok.returncode == 0 and ok.returncodes == [0, 0, 0]
    assert ok.output == {0: ["fine"], 1: ["fine"], 2: ["fine"]}


def test_one_process_job_needs_no_coordinator():
    info = dist.info()
    assert (info.process_id, info.num_processes, info.is_leader) == (0, 1, True)
    assert dist.broadcast({"a": 1}) == {"a": 1}
    with dist.guard("anything"):  # a no-op without a monitor
        pass
    x = dist.put(np.arange(8.0), jax.sharding.NamedSharding(
        mw.make_mesh({"x": 8}), jax.sharding.PartitionSpec("x")))
    assert np.array_equal(dist.gather({"x": x})["x"], np.arange(8.0))


def test_subprocess_helpers_are_importable_without_jax():
    code = "import sys, meshwright.runtime.launch; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.stdout.strip() == "False", out.stderr
