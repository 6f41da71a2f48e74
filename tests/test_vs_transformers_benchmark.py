"""benchmarks/vs_transformers.py's quick path on the smallest case: both engines run the same
checkpoint, give the same greedy tokens, and the JSON has every figure the table prints."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_transformers.py"


def test_quick_gpt2_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("vs_transformers", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "vs_transformers.json"
    args = bench.parse_args(["--quick", "--cases", "gpt2-tiny", "--batches", "2",
                             "--prompt-len", "8", "--new-tokens", "4", "--max-len", "16",
                             "--bandwidth-mb", "16", "--matmul-n", "256", "--out", str(out)])
    result = bench.run(args)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    (row,) = result["rows"]
    assert (row["case"], row["batch"], row["new_tokens"], row["max_len"]) == \
        ("gpt2-tiny", 2, 4, 16)
    assert row["equal_token_share"] == 1.0 and row["first_difference"] is None
    for engine in ("meshwright", "transformers"):
        assert row[engine]["tokens_per_s"] > 0 and len(row[engine]["seconds"]) == 1
    assert row["ratio"] == pytest.approx(row["meshwright"]["tokens_per_s"]
                                         / row["transformers"]["tokens_per_s"])
    assert row["roofline_step_s"] > 0 and row["roofline_bound"] in ("memory", "compute")
    # weights read per step: every parameter but the position table (the token table is
    # the tied output head)
    assert row["weight_bytes_per_step"] == (row["params"] - 1024 * 256) * 4
    assert result["read_bandwidth"]["bytes_per_s"] > 0 and result["matmul"]["flops_per_s"] > 0
