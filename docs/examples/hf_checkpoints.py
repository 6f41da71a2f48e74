"""Load small Hugging Face checkpoints with meshwright and compare with transformers.

    python docs/examples/hf_checkpoints.py      # the output shown in docs/checkpoints.md

Needs the `test` extra (torch CPU, transformers). For each family a tiny random model is
saved with `save_pretrained`, loaded with `meshwright.models.from_pretrained` (on one device,
then split over 8 simulated devices) and run: full-sequence logits, prefill + cached decode
steps, and 32 greedy tokens, against transformers' forward and `generate`.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from meshwright import models

SMALL = {"vocab_size": 128, "initializer_range": 0.1, "bos_token_id": None,
         "eos_token_id": None, "pad_token_id": None}
LLAMA = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
         "num_attention_heads": 4, "max_position_embeddings": 64, **SMALL}
GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64, **SMALL}
FAMILIES = {
    "gpt2": transformers.GPT2Config(**GPT2),
    "gpt_bigcode (MQA)": transformers.GPTBigCodeConfig(multi_query=True, **GPT2),
    "llama (GQA, llama3 RoPE)": transformers.LlamaConfig(
        num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}, **LLAMA),
    "mistral (GQA)": transformers.MistralConfig(num_key_value_heads=2, sliding_window=None,
                                                **LLAMA),
    "qwen2 (QKV bias, tied)": transformers.Qwen2Config(num_key_value_heads=2,
                                                       tie_word_embeddings=True, **LLAMA),
}
PROMPT, TOTAL, NEW = 5, 12, 32


def run(name: str, hf_config, directory: Path) -> dict:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    hf.save_pretrained(directory)
    tokens = np.random.default_rng(1).integers(0, 128, (2, TOTAL), np.int32)
    with torch.no_grad():
        reference = hf(torch.from_numpy(tokens).long()).logits.numpy()
        hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
        generated = hf.generate(torch.from_numpy(tokens[:, :PROMPT]).long(), do_sample=False,
                                max_new_tokens=NEW)[:, PROMPT:].numpy()

    config, params = models.from_pretrained(directory, scan_layers=True)
    model = models.build(config)
    logits_fn, prefill_fn, decode_fn = (jax.jit(model.logits), jax.jit(model.prefill),
                                        jax.jit(model.decode_step))
    full = np.abs(np.asarray(logits_fn(params, tokens)) - reference).max()
    out, cache = prefill_fn(params, tokens[:, :PROMPT], model.init_cache(2))
    prefill = np.abs(np.asarray(out) - reference[:, :PROMPT]).max()
    decode = 0.0
    for t in range(PROMPT, TOTAL):
        out, cache = decode_fn(params, tokens[:, t], cache, np.full(2, t, np.int32))
        decode = max(decode, np.abs(np.asarray(out) - reference[:, t]).max())
    # greedy generation from our KV cache
    out, cache = prefill_fn(params, tokens[:, :PROMPT], model.init_cache(2))
    token, ours = np.asarray(out)[:, -1].argmax(-1).astype(np.int32), []
    for i in range(NEW):
        ours.append(token)
        out, cache = decode_fn(params, token, cache, np.full(2, PROMPT + i, np.int32))
        token = np.asarray(out).argmax(-1).astype(np.int32)
    same = np.array_equal(np.stack(ours, 1), generated)

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    _, split = models.from_pretrained(directory, mesh=mesh, scan_layers=True,
                                      shardings=models.split_largest_axis(mesh))
    sharded = np.abs(np.asarray(logits_fn(split, tokens)) - reference).max()
    return {"name": name, "family": config.family, "H/K": f"{config.n_heads}/{config.n_kv_heads}",
            "full": full, "prefill": prefill, "decode": decode, "sharded": sharded, "same": same}


def show_errors(directory: Path) -> None:
    """What a checkpoint that does not fit looks like (a Llama checkpoint, edited)."""
    import json
    import shutil

    def edited(**changes) -> Path:
        copy = directory.parent / "edited"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(directory, copy)
        values = json.loads((copy / "config.json").read_text()) | changes
        (copy / "config.json").write_text(json.dumps(values))
        return copy

    for changes in ({"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
                    {"intermediate_size": 80}, {"num_hidden_layers": 1},
                    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}):
        try:
            models.from_pretrained(edited(**changes))
        except models.CheckpointError as err:
            print(f"{type(err).__name__}: {str(err).replace(str(directory.parent), '...')}\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, cfg, Path(tmp) / str(i)) for i, (name, cfg) in
                enumerate(FAMILIES.items())]
        print(f"max |meshwright - transformers| over logits (float32, 2 x {TOTAL} tokens); "
              f"greedy: {NEW} tokens equal to generate()\n")
        print(f"{'checkpoint':<26} {'family':<6} {'H/K':<5} {'full':>8} {'prefill':>8} "
              f"{'decode':>8} {'8 devices':>9}  greedy")
        for r in rows:
            print(f"{r['name']:<26} {r['family']:<6} {r['H/K']:<5} {r['full']:8.1e} "
                  f"{r['prefill']:8.1e} {r['decode']:8.1e} {r['sharded']:9.1e}  "
                  f"{'identical' if r['same'] else 'DIFFERENT'}")
        print("\nconfig.json that meshwright cannot load, and what it says:\n")
        show_errors(Path(tmp) / "2")

if __name__ == "__main__":
    main()
