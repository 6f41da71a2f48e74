"""The property sweep in CI: a dozen random small Transformers (every family, MHA / GQA /
MQA, loop or scan) on random meshes of up to 8 devices, every FFN and attention layout, both
phases, with and without looped collective einsums and int8 weights, each equal to the
unsharded function. `python benchmarks/property_sweep.py --cases 500` runs the long sweep."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "property_sweep.py"
CASES = 12  # ~35 s of CPU; the benchmark runs hundreds


def _sweep_module():
    spec = importlib.util.spec_from_file_location("property_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_random_models_meshes_and_layouts_equal_the_unsharded_function():
    sweep = _sweep_module()
    results = sweep.sweep(CASES, seed=16)
    summary = sweep.summarize(results)
    assert summary["cases"] == CASES
    assert summary["mismatches"] == 0, summary["mismatch_cases"]
    assert summary["ok"] >= CASES // 2, summary["refused_reasons"]
    # what ran replicated is reported with a reason, never an empty one
    for r in results:
        assert all(isinstance(f, str) and ": " in f for f in r["fallbacks"]), r["label"]
