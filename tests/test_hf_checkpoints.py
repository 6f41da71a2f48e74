"""Hugging Face checkpoints: meshwright computes what transformers computes.

Each variant is a small randomly initialised transformers model (PyTorch, CPU, float32) saved
with `save_pretrained` (safetensors; one variant in several shards) and loaded with
`meshwright.models.from_pretrained`. Full-sequence logits, prefill logits and cached decode
steps must be within 1e-4 of transformers' logits, and 32 greedy tokens identical to its
`generate`. Weights are drawn with std 0.1 (not transformers' 0.02) and norms/biases
perturbed, so attention is far from uniform and a wrong RoPE pairing, head order or bias
would move the logits by much more than the tolerance.

Compiling is the slow part: every variant is built, saved, loaded and run once (`_Zoo`), and
each config's jitted functions are shared (`_compiled`).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test-only dependencies (the `test` extra): the CPU build of PyTorch
import transformers
from meshwright.models import (
    CheckpointError,
    build,
    from_pretrained,
    load_config,
    load_tokenizer,
    param_shapes,
    split_largest_axis,
)
from meshwright.models.checkpoint_io import SafetensorsCheckpoint
from safetensors.numpy import save_file

BATCH, PROMPT, TOTAL, NEW = 2, 5, 12, 32  # prefill PROMPT tokens, decode up to TOTAL
VOCAB, MAX_POS = 128, 64
TOL = 1e-4
_SMALL = {"vocab_size": VOCAB, "initializer_range": 0.1, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": None}
_LLAMA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 4, "max_position_embeddings": MAX_POS, **_SMALL}
_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": MAX_POS, **_SMALL}

# name -> (transformers config, scan_layers, save kwargs)
VARIANTS = {
    "gpt2": (lambda: transformers.GPT2Config(**_GPT2), False, {}),
    "gpt_bigcode-mqa": (lambda: transformers.GPTBigCodeConfig(multi_query=True, **_GPT2), True,
                        {}),
    "gpt_bigcode-mha": (lambda: transformers.GPTBigCodeConfig(multi_query=False, **_GPT2),
                        True, {}),
    "llama-gqa": (lambda: transformers.LlamaConfig(num_key_value_heads=2, **_LLAMA), False,
                  {"max_shard_size": "40KB"}),
    "llama-mqa-tied": (lambda: transformers.LlamaConfig(
        num_key_value_heads=1, tie_word_embeddings=True, **_LLAMA), True, {}),
    "llama-rope-llama3": (lambda: transformers.LlamaConfig(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}, **_LLAMA), True, {}),
    "llama-rope-linear": (lambda: transformers.LlamaConfig(
        rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        num_key_value_heads=2, **_LLAMA), True, {}),
    "mistral": (lambda: transformers.MistralConfig(
        num_key_value_heads=2, sliding_window=None, **_LLAMA), True, {}),
    "qwen2-tied": (lambda: transformers.Qwen2Config(
        num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA), True, {}),
}


@dataclass
class Loaded:
    name: str
    directory: Path
    hf: torch.nn.Module  # the transformers model, eval mode
    config: object  # meshwright TransformerConfig
    params: dict
    tokens: np.ndarray  # (BATCH, TOTAL) int32
    hf_logits: np.ndarray  # (BATCH, TOTAL, VOCAB) transformers' full-sequence logits


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb norms and biases (transformers initialises them to 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _make_hf(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(VARIANTS[name][0]())
    _randomize(model, seed)
    return model.eval()


@functools.cache
def _compiled(config):
    model = build(config)
    return model, jax.jit(model.logits), jax.jit(model.prefill), jax.jit(model.decode_step)


class _Zoo:
    """Every variant built, saved, loaded and run once per module."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def __call__(self, name: str) -> Loaded:
        if name not in self.cache:
            hf = _make_hf(name)
            directory = self.root / name
            hf.save_pretrained(directory, **VARIANTS[name][2])
            config, params = from_pretrained(directory, scan_layers=VARIANTS[name][1])
            tokens = np.random.default_rng(1).integers(0, VOCAB, (BATCH, TOTAL), np.int32)
            with torch.no_grad():
                hf_logits = hf(torch.from_numpy(tokens).long()).logits.numpy()
            self.cache[name] = Loaded(name, directory, hf, config, params, tokens, hf_logits)
        return self.cache[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("hf"))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---- logits against transformers -------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_full_sequence_logits_match_transformers(zoo, name):
    m = zoo(name)
    _, logits_fn, _, _ = _compiled(m.config)
    assert _max_diff(logits_fn(m.params, m.tokens), m.hf_logits) <= TOL


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_cached_decode_match_transformers(zoo, name):
    m = zoo(name)
    model, _, prefill_fn, decode_fn = _compiled(m.config)
    prompt_logits, cache = prefill_fn(m.params, m.tokens[:, :PROMPT], model.init_cache(BATCH))
    assert _max_diff(prompt_logits, m.hf_logits[:, :PROMPT]) <= TOL
    for t in range(PROMPT, TOTAL):
        step_logits, cache = decode_fn(m.params, m.tokens[:, t], cache,
                                       np.full(BATCH, t, np.int32))
        assert _max_diff(step_logits, m.hf_logits[:, t]) <= TOL, f"decode step at {t}"


def _greedy(config, params, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n greedy tokens after `prompt` (B, P): prefill, then decode steps. Returns the tokens
    (B, n) and the logits that chose them (B, n, V)."""
    model, _, prefill_fn, decode_fn = _compiled(config)
    logits, cache = prefill_fn(params, prompt, model.init_cache(prompt.shape[0]))
    step = np.asarray(logits)[:, -1]
    tokens, chosen_by = [], []
    for i in range(n):
        token = step.argmax(-1).astype(np.int32)
        tokens.append(token)
        chosen_by.append(step)
        if i + 1 < n:
            positions = np.full(prompt.shape[0], prompt.shape[1] + i, np.int32)
            logits, cache = decode_fn(params, token, cache, positions)
            step = np.asarray(logits)
    return np.stack(tokens, 1), np.stack(chosen_by, 1)


def _hf_generate(hf: torch.nn.Module, prompt: np.ndarray, n: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    hf.generation_config.eos_token_id = None  # exactly n tokens
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt).long(), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, prompt.shape[1]:].numpy()
    return tokens, torch.stack(out.logits, 1).numpy()


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation_matches_generate(zoo, name):
    m = zoo(name)
    prompt = m.tokens[:, :PROMPT]
    ours, our_logits = _greedy(m.config, m.params, prompt, NEW)
    theirs, their_logits = _hf_generate(m.hf, prompt, NEW)
    np.testing.assert_array_equal(ours, theirs)
    # and the logits behind every choice: ours from our KV cache, theirs from theirs
    assert _max_diff(our_logits, their_logits) <= TOL


# ---- on 8 simulated devices -----------------------------------------------------------------

def _auto_mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("name", ["gpt2", "gpt_bigcode-mqa", "llama-gqa", "qwen2-tied"])
def test_replicated_on_an_8_device_mesh(zoo, name):
    m = zoo(name)
    mesh = jax.make_mesh((8,), ("x",))  # Explicit axes, as the rest of meshwright uses
    config, params = from_pretrained(m.directory, mesh=mesh, scan_layers=m.config.scan_layers)
    for leaf in jax.tree.leaves(params):
        assert leaf.sharding.mesh.shape == {"x": 8} and leaf.sharding.is_fully_replicated
    _, logits_fn, _, _ = _compiled(config)
    assert _max_diff(logits_fn(params, m.tokens), m.hf_logits) <= TOL


@pytest.mark.parametrize("name", ["gpt2", "gpt_bigcode-mqa", "llama-gqa", "qwen2-tied"])
def test_split_over_8_devices(zoo, name):
    """Every parameter split 8 ways along its largest dimension (Auto axes: the reference
    models are not written for Explicit-axis shardings; the sharded lowering is meshwright's
    pipeline). Logits, prefill and decode equal transformers'."""
    m = zoo(name)
    mesh = _auto_mesh()
    config, params = from_pretrained(m.directory, mesh=mesh, shardings=split_largest_axis(mesh),
                                     scan_layers=m.config.scan_layers)
    for leaf in jax.tree.leaves(params):
        assert not leaf.sharding.is_fully_replicated  # every dim here is a multiple of 8
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size
    model, logits_fn, prefill_fn, decode_fn = _compiled(config)
    assert _max_diff(logits_fn(params, m.tokens), m.hf_logits) <= TOL
    if name in ("gpt_bigcode-mqa", "llama-gqa"):
        prompt_logits, cache = prefill_fn(params, m.tokens[:, :PROMPT], model.init_cache(BATCH))
        assert _max_diff(prompt_logits, m.hf_logits[:, :PROMPT]) <= TOL
        step, _ = decode_fn(params, m.tokens[:, PROMPT], cache, np.full(BATCH, PROMPT, np.int32))
        assert _max_diff(step, m.hf_logits[:, PROMPT]) <= TOL


def test_each_device_reads_only_its_block(zoo, monkeypatch):
    m = zoo("llama-gqa")
    checkpoint = SafetensorsCheckpoint(m.directory)
    reads: list[tuple[str, int]] = []
    original = SafetensorsCheckpoint.read

    def counting_read(self, key, index):
        block = original(self, key, index)
        reads.append((key, block.nbytes))
        return block

    monkeypatch.setattr(SafetensorsCheckpoint, "read", counting_read)
    from_pretrained(m.directory, mesh=jax.make_mesh((8,), ("x",)))  # replicated
    assert sum(n for _, n in reads) == checkpoint.nbytes()  # each tensor read once, not 8 times
    reads.clear()
    mesh = _auto_mesh()
    from_pretrained(m.directory, mesh=mesh, shardings=split_largest_axis(mesh))
    assert len(reads) == 8 * len(checkpoint.names())
    for key, nbytes in reads:  # a block is 1/8 of its tensor (q/k: + at most one head)
        whole = int(np.prod(checkpoint.shape(key))) * 4
        assert nbytes <= whole // 8 + 16 * 64 * 4, key
    assert sum(n for _, n in reads) <= 1.5 * checkpoint.nbytes()


# ---- files, dtypes, shardings -----------------------------------------------------------------

def test_sharded_save_loads_the_same_numbers(zoo, tmp_path):
    m = zoo("llama-gqa")
    index = json.loads((m.directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m.hf.save_pretrained(tmp_path)  # the same model in one file
    assert not (tmp_path / "model.safetensors.index.json").exists()
    _, params = from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, m.params)


def test_bfloat16_checkpoint(zoo, tmp_path):
    """numpy has no bfloat16: these tensors are read through ml_dtypes; values are exact."""
    m = zoo("llama-gqa")
    hf = _make_hf("llama-gqa").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    hf.float().save_pretrained(tmp_path / "f32")  # the same (rounded) numbers in float32
    config, params = from_pretrained(tmp_path / "bf16")
    assert config.dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    _, as_f32 = from_pretrained(tmp_path / "bf16", dtype="float32")
    _, reference = from_pretrained(tmp_path / "f32")
    jax.tree.map(np.testing.assert_array_equal, as_f32, reference)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                            np.asarray(b, np.float32)),
                 params, reference)
    assert m.config.dtype == "float32"


def test_shardings_as_a_pytree_or_partition_specs(zoo):
    m = zoo("gpt2")
    mesh = _auto_mesh()
    split = split_largest_axis(mesh)
    tree = jax.tree_util.tree_map_with_path(
        lambda path, s: split("/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                       for k in path), s), param_shapes(m.config))
    _, params = from_pretrained(m.directory, mesh=mesh, shardings=tree)
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), params,
                 tree)
    specs = jax.tree.map(lambda s: s.spec, tree)
    _, again = from_pretrained(m.directory, mesh=mesh, shardings=specs)
    jax.tree.map(np.testing.assert_array_equal, again, m.params)
    with pytest.raises(ValueError, match="PartitionSpec: pass mesh="):
        from_pretrained(m.directory, shardings=specs)


def test_configs(zoo, tmp_path):
    c = zoo("gpt_bigcode-mqa").config
    assert (c.family, c.n_heads, c.n_kv_heads, c.tie_embeddings) == ("gpt2", 4, 1, True)
    c = zoo("llama-rope-llama3").config
    assert (c.rope_scaling, c.rope_scaling_factor, c.rope_original_max_len, c.rope_theta) == (
        "llama3", 8.0, 16, 500000.0)
    c = zoo("qwen2-tied").config
    assert c.qkv_bias and c.family == "llama" and c.n_kv_heads == 2
    assert load_config(zoo("llama-gqa").directory) == zoo("llama-gqa").config
    # a sliding window caps max_len: within the window, sliding attention is full attention
    shutil.copytree(zoo("mistral").directory, tmp_path / "m")
    _edit_config(tmp_path / "m", sliding_window=16)
    assert load_config(tmp_path / "m").max_len == 16
    assert load_config(tmp_path / "m", max_len=8).max_len == 8
    with pytest.raises(CheckpointError, match="max_len=100 is longer than the 64 learned"):
        load_config(zoo("gpt2").directory, max_len=100)


# ---- tokenizer: text in, text out ------------------------------------------------------------

def test_tokenizer_text_in_text_out(zoo):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    m = zoo("gpt2")
    assert load_tokenizer(m.directory) is None  # no tokenizer.json: prompts are token ids
    tok = Tokenizer(models.BPE(unk_token="?"))  # a BPE small enough for the 128-token vocab
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["meshwright shards transformer inference over device meshes"] * 4,
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["?"],
                                                show_progress=False))
    directory = m.directory.parent / "gpt2-with-tokenizer"
    shutil.copytree(m.directory, directory)
    tok.save(str(directory / "tokenizer.json"))

    loaded = load_tokenizer(directory)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory /
                                                                     "tokenizer.json"))
    text = "shards transformer"
    ids = np.array([loaded.encode(text).ids], np.int32)
    assert ids.tolist()[0] == hf_tok(text)["input_ids"] and ids.max() < VOCAB
    ours, _ = _greedy(m.config, m.params, np.repeat(ids, BATCH, 0), 8)  # one compiled shape
    theirs, _ = _hf_generate(m.hf, ids, 8)
    assert loaded.decode(ours[0].tolist()) == hf_tok.decode(theirs[0].tolist())


# ---- errors ---------------------------------------------------------------------------------

def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def _copy(zoo, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(zoo(name).directory, tmp_path / name))


def test_unknown_architecture(zoo, tmp_path):
    d = _copy(zoo, "gpt2", tmp_path)
    _edit_config(d, architectures=["FalconForCausalLM"], model_type="falcon")
    with pytest.raises(CheckpointError, match=r"\['FalconForCausalLM'\] \(model_type 'falcon'\)"
                       r" is not supported; meshwright loads GPT2LMHeadModel.*LlamaForCausalLM"):
        from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(d)


def test_missing_tensor_names_key_and_config_fields(zoo, tmp_path):
    d = _copy(zoo, "gpt2", tmp_path)
    checkpoint = SafetensorsCheckpoint(d)
    kept = {k: checkpoint.read(k, tuple(slice(0, n) for n in checkpoint.shape(k)))
            for k in checkpoint.names() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(kept, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'transformer.h.1.mlp.c_fc.weight' is missing.*"
                       r"n_embd, n_head, n_inner.*\(64, 256\)"):
        from_pretrained(d)


def test_shape_disagreeing_with_config(zoo, tmp_path):
    d = _copy(zoo, "llama-gqa", tmp_path)
    _edit_config(d, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                       r"\(96, 64\), but config.json implies \(80, 64\) \(from hidden_size, "
                       r"intermediate_size\)"):
        from_pretrained(d)


def test_unused_tensor_names_key(zoo, tmp_path):
    d = _copy(zoo, "llama-gqa", tmp_path)
    _edit_config(d, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.\S+' .* is not used: config.json"
                       r" has 1 layer\(s\) \(num_hidden_layers"):
        from_pretrained(d)
    d = _copy(zoo, "qwen2-tied", tmp_path)
    _edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")  # no qkv biases
    with pytest.raises(CheckpointError,
                       match=r"self_attn.[qkv]_proj.bias. .* not used: biases are off"):
        from_pretrained(d)


@pytest.mark.parametrize("change,match", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for model_type 'llama'"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='dynamic'.*supported: 'default', 'linear', 'llama3'"),
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
])
def test_unsupported_config_fields(zoo, tmp_path, change, match):
    d = _copy(zoo, "llama-gqa", tmp_path)
    _edit_config(d, **change)
    with pytest.raises(CheckpointError, match=match):
        load_config(d)


def test_no_safetensors_files(tmp_path, zoo):
    shutil.copy(zoo("gpt2").directory / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        from_pretrained(tmp_path)


def test_corrupt_files_name_themselves(zoo, tmp_path, capsys):
    """A truncated weights file, a malformed config.json or index, a broken tokenizer.json: a
    CheckpointError naming the file (and the CLI one line, no traceback)."""
    from meshwright.models import load_tokenizer

    from meshwright.cli import main

    d = _copy(zoo, "gpt2", tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable "
                       r"safetensors file .*truncated or corrupt"):
        from_pretrained(d)
    assert main(["bench", "serve", "--checkpoint", str(d), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshwright bench: error: ") and "Traceback" not in err
    (d / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_config(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json holds a list, not a JSON object"):
        load_config(d)
    d = _copy(zoo, "gpt2", tmp_path / "again")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        from_pretrained(d)
    (d / "tokenizer.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a readable tokenizer"):
        load_tokenizer(d)


def test_engine_and_bench_serve_take_a_checkpoint(zoo, tmp_path, capsys):
    """The engine serves a loaded checkpoint with its tokenizer (text in, text out), and
    `meshwright bench serve --checkpoint DIR` runs on it."""
    from meshwright.runtime import Engine
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from meshwright.cli import main

    m = zoo("gpt2")
    tok = Tokenizer(models.BPE(unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["meshwright shards transformer inference over device meshes"] * 4,
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["?"],
                                                show_progress=False))
    directory = tmp_path / "gpt2-served"
    shutil.copytree(m.directory, directory)
    tok.save(str(directory / "tokenizer.json"))
    engine = Engine(m.config, m.params, max_slots=2, max_len=32, tokenizer=tok, progress=False)
    (result,) = engine.generate(["shards transformer"], max_tokens=6)
    ids = np.array([tok.encode("shards transformer").ids], np.int32)
    ours, _ = _greedy(m.config, m.params, np.repeat(ids, BATCH, 0), 6)
    assert result.tokens == ours[0].tolist()
    assert result.text == tok.decode(ours[0].tolist())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Engine(m.config, m.params, max_slots=1, max_len=32, warmup=False).generate(["hi"])
    assert main(["bench", "serve", "--checkpoint", str(directory), "--requests", "4",
                 "--out-len", "2", "4", "--prompt-len", "2", "4", "--max-slots", "2",
                 "--max-len", "32", "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["requests_completed"] == out["requests_submitted"] == 4
