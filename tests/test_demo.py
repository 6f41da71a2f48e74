"""The bundled demo model and `meshwright demo`.

The model: it loads, predicts held-out bytes, and generates words of its training text.
The demo: `meshwright demo --json` in a fresh process (which sets the 8-device flag itself,
and is given it here too). The sharded engine it builds is tested in test_runtime_layouts.py.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, load_demo_model
from meshwright.models import demo as bundled
from meshwright.runtime.demo import NEWLINE, STREAM_PROMPTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_model():
    return load_demo_model()


def _next_byte_accuracy(config, params, text: str, windows: int = 8) -> float:
    data = np.frombuffer(text.encode(), np.uint8)
    n = config.max_len
    starts = np.linspace(0, len(data) - n - 1, windows).astype(int)
    tokens = np.stack([data[s:s + n] for s in starts]).astype(np.int32)  # (W, T)
    targets = np.stack([data[s + 1:s + n + 1] for s in starts])  # (W, T)
    logits = jax.jit(build(config).logits)(params, jnp.asarray(tokens))  # (W, T, 256)
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == targets))


def test_bundled_model_is_a_small_palm(demo_model):
    config, params = demo_model
    assert (config.family, config.vocab_size, config.n_kv_heads) == ("palm", 256, 1)
    assert config.parallel_block and config.scan_layers
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 0.5e6 < n < 3e6
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    meta = bundled.demo_metadata()
    assert meta["trained_by"] == "models/train_demo.py"


def test_bundled_model_predicts_held_out_text(demo_model):
    config, params = demo_model
    heldout = bundled.demo_text("heldout")
    assert heldout and heldout not in bundled.demo_text("train")
    assert _next_byte_accuracy(config, params, heldout) >= 0.5


def test_greedy_continuation_is_words_of_the_text(demo_model):
    config, params = demo_model
    words = set(re.findall(r"[A-Za-z]+", bundled.demo_text("train")))
    out = bundled.decode(bundled.generate(config, params, bundled.encode(
        "And God said unto Moses,"), 48))
    generated = re.findall(r"[A-Za-z]+", out)
    assert len(generated) >= 5, out
    known = sum(w in words for w in generated) / len(generated)
    assert known >= 0.8, out


def test_bytes_round_trip():
    text = "In the beginning God created the heaven and the earth."
    assert bundled.decode(bundled.encode(text)) == text
    assert bundled.encode("\n") == [NEWLINE]


DEMO_KEYS = {"model", "devices", "plan", "mesh", "layout_plan", "weights_placed_once", "compile_s",
             "buckets", "completions", "sharded_equals_unsharded", "samples", "fused",
             "static", "speedup", "workload", "seconds"}


def test_meshwright_demo_json_in_a_subprocess():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.environ.get("MESHWRIGHT_TEST_CACHE", os.path.join(ROOT, ".jax_cache")))
    proc = subprocess.run(
        [sys.executable, "-m", "meshwright.cli", "demo", "--json", "--requests", "6",
         "--stream", "2", "--out-len", "8", "24", "--max-len", "64"],
        check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert DEMO_KEYS <= set(out), sorted(DEMO_KEYS - set(out))
    assert out["devices"] == 8 and out["weights_placed_once"]
    assert out["sharded_equals_unsharded"] is True
    assert {b["phase"] for b in out["buckets"]} == {"prefill", "decode"}
    biggest = max((b for b in out["buckets"] if b["phase"] == "decode"), key=lambda b: b["batch"])
    assert biggest["layout"] == f"{out['plan']['ffn_layout']}/{out['plan']['attention_layout']}"
    assert out["layout_plan"]["mesh"] == out["plan"]["mesh"] == out["mesh"]
    for policy in ("fused", "static"):
        m = out[policy]
        assert m["policy"] == policy
        assert m["requests_completed"] == m["requests_submitted"] == 6
        assert m["requests_failed"] == 0
        assert m["throughput_tokens_per_s"] > 0 and m["latency_s"]["p50"] > 0
    assert out["fused"]["tokens_generated"] == out["static"]["tokens_generated"]
    assert set(out["speedup"]) == {"throughput", "latency_p50", "latency_p99"}
    assert [c["prompt"] for c in out["completions"]] == list(STREAM_PROMPTS[:2])
