"""Workloads, serving metrics and `meshwright bench serve`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from meshwright.runtime.request import Result
from meshwright.runtime.workload import make_workload, summarize

from meshwright.cli import main


def test_poisson_arrivals_have_the_requested_rate_and_are_seeded():
    w = make_workload(4000, rate=50.0, out_len=(16, 256), max_len=320, seed=1)
    times = np.array([t for t, _ in w.arrivals])
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert np.mean(np.diff(times)) == pytest.approx(1 / 50.0, rel=0.05)
    lengths = [r.max_tokens for _, r in w.arrivals]
    assert min(lengths) >= 16 and max(lengths) <= 256
    assert np.mean(lengths) == pytest.approx(136, rel=0.05)
    assert all(len(r.prompt) + r.max_tokens <= 320 for _, r in w.arrivals)
    again = make_workload(4000, rate=50.0, out_len=(16, 256), max_len=320, seed=1)
    assert again.arrivals == w.arrivals
    assert make_workload(10, rate=50.0, seed=2).arrivals != make_workload(10, rate=50.0,
                                                                          seed=1).arrivals


def test_fixed_interval_and_clipping_to_max_len():
    w = make_workload(5, interval=0.25, out_len=(100, 100), prompt_len=(30, 30), max_len=64)
    assert [t for t, _ in w.arrivals] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(r.max_tokens == 63 and len(r.prompt) == 1 for _, r in w.arrivals)
    assert w.output_tokens == 5 * 63


def test_trace_files(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([3, {"output_len": 5, "prompt_len": 2, "arrival_s": 0.5}, 7]))
    w = make_workload(0, trace=str(path), interval=0.1, seed=0)
    assert [(t, r.max_tokens) for t, r in w.arrivals] == [(0.0, 3), (0.2, 7), (0.5, 5)]
    assert len(w.arrivals[2][1].prompt) == 2 and "trace" in w.description
    with pytest.raises(ValueError, match="output_len"):
        make_workload(0, trace=[{"prompt_len": 3}])
    with pytest.raises(ValueError, match="rate or interval"):
        make_workload(3, rate=1.0, interval=1.0)


def fake_result(i, arrival, times, ok=True):
    return Result(request_id=i, prompt=(1,), tokens=[0] * len(times) if ok else [],
                  finish_reason="length" if ok else "refused", error=None if ok else "bad",
                  arrival_s=arrival, finish_s=times[-1] if times else arrival,
                  token_times_s=list(times))


def test_summarize_counts_and_percentiles():
    results = [fake_result(0, 0.0, [1.0, 2.0, 3.0]), fake_result(1, 1.0, [2.0, 3.0]),
               fake_result(2, 2.0, [], ok=False), fake_result(3, 2.0, [6.0])]
    m = summarize(results, policy="fused", elapsed_s=6.0)
    assert (m["requests_submitted"], m["requests_completed"], m["requests_failed"]) == (4, 3, 1)
    assert m["failure_reasons"] == ["bad"] and m["tokens_generated"] == 6
    assert m["throughput_tokens_per_s"] == pytest.approx(6 / 6.0)
    assert m["latency_s"]["p50"] == pytest.approx(3.0) and m["latency_s"]["mean"] == 3.0
    assert m["ttft_s"]["p50"] == pytest.approx(1.0)
    assert m["per_token_s"]["p50"] == pytest.approx(1.0)


BENCH = ["bench", "serve", "--model", "palm-tiny", "--requests", "12", "--out-len", "2", "8",
         "--prompt-len", "1", "4", "--max-slots", "4", "--max-len", "64", "--no-progress"]


def test_cli_bench_serve_json(capsys, tmp_path):
    out_file = tmp_path / "serve.json"
    assert main(BENCH + ["--rate", "500", "--policy", "static", "--json",
                         "--output", str(out_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    for key in ("policy", "requests_submitted", "requests_completed", "requests_failed",
                "throughput_tokens_per_s", "latency_s", "ttft_s", "per_token_s",
                "buckets_used", "layout_switches"):
        assert key in printed
    assert printed["policy"] == "static" and printed["requests_completed"] == 12
    assert set(printed["latency_s"]) == {"p50", "p99", "mean"}
    assert set(printed["ttft_s"]) == {"p50", "p99"}


def test_cli_bench_serve_text_and_sweep_png(capsys, tmp_path):
    assert main(BENCH + ["--interval", "0.001"]) == 0
    text = capsys.readouterr().out
    assert "policy fused" in text and "12 completed" in text and "tokens/s" in text
    png = tmp_path / "sweep.png"
    assert main(BENCH + ["--sweep", "--intervals", "0.0005,0.05", "--png", str(png),
                         "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["mean_interarrival_s"] for r in result["rows"]] == [0.0005, 0.05]
    assert all(r["speedup_vs_static"] > 0 and r["speedup_vs_dynamic"] > 0
               for r in result["rows"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_errors_are_clear(capsys):
    assert main(["bench", "serve", "--model", "palm-huge", "--no-progress"]) == 2
    assert "unknown model" in capsys.readouterr().err
