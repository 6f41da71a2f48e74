"""Hugging Face checkpoints (config.json + *.safetensors) as meshwright configs and parameters.

    >>> import meshwright as mw                                            # doctest: +SKIP
    >>> config, params = mw.models.from_pretrained("path/to/llama")        # one device
    >>> logits = mw.models.logits(config, params, tokens)                  # (B, T, vocab)
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> config, params = mw.models.from_pretrained(path, mesh=mesh)        # replicated on mesh
    >>> config, params = mw.models.from_pretrained(                        # each device reads
    ...     path, mesh=mesh, shardings=split_largest_axis(mesh))           # only its block

Supported (config.json `architectures`, else `model_type`), each onto one reference family:

| Hugging Face | family | notes |
|---|---|---|
| GPT2LMHeadModel (gpt2) | gpt2 | Conv1D weights are stored (in, out): taken as they are |
| GPTBigCodeForCausalLM (gpt_bigcode) | gpt2 | multi_query: n_kv_heads = 1; Linear (out, in) |
| LlamaForCausalLM (llama) | llama | GQA; tied or untied; RoPE default, "linear", "llama3" |
| MistralForCausalLM (mistral) | llama | sliding window W: max_len is capped at W (exact there) |
| Qwen2ForCausalLM (qwen2) | llama | Q/K/V biases (config.qkv_bias) |

Hugging Face's Llama applies RoPE to the two halves of each head ("rotate half"); meshwright's
llama family, like Meta's code, to interleaved pairs. Loading undoes the permutation that
Hugging Face's conversion script applied to the rows of q_proj/k_proj (and their biases), so
the scores q·k are the same numbers. A tied Llama-family checkpoint gets `output =
embed_tokens.T` as its own array (the llama family keeps a separate output matrix).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from meshwright.models.checkpoint_io import (
    CheckpointError,
    Gathered,
    SafetensorsCheckpoint,
    Stacked,
    Stored,
    Transposed,
    place,
    read_json,
)
from meshwright.models.config import TransformerConfig
from meshwright.models.registry import build, param_shapes

__all__ = ["ARCHITECTURES", "CheckpointError", "from_pretrained", "load_config",
           "load_tokenizer", "split_largest_axis"]

# A sharding for every parameter: a pytree like params whose leaves are Sharding (or
# PartitionSpec, with `mesh`), or a function (path, jax.ShapeDtypeStruct) -> the same, where path
# is "tok_embeddings", "layers/3/wq" (layers in a loop) or "layers/wq" (scan_layers).
Shardings = Any | Callable[[str, jax.ShapeDtypeStruct], Sharding | PartitionSpec]

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # one function, three names


# ---- config.json ----------------------------------------------------------------------------

class _HfConfig:
    """config.json as read; every missing or unsupported field is an error naming the field."""

    def __init__(self, path: Path, values: dict):
        self.path, self.values = path, values
        self.model_type = values.get("model_type", "?")

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def require(self, name: str) -> Any:
        if self.values.get(name) is None:
            raise CheckpointError(f"{self.path}: field {name!r} is missing (model_type "
                                  f"{self.model_type!r} needs it)")
        return self.values[name]

    def expect(self, **supported: Any) -> None:
        """Each field, when present, must have the one value meshwright implements."""
        for name, value in supported.items():
            actual = self.get(name, value)
            if actual != value:
                raise CheckpointError(
                    f"{self.path}: {name}={actual!r} is not supported for model_type "
                    f"{self.model_type!r} (meshwright implements {name}={value!r})")


def _gpt2_config(hf: _HfConfig, multiquery: bool) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise CheckpointError(f"{hf.path}: activation_function={act!r} is not supported; the "
                              f"gpt2 family runs the tanh GELU ({', '.join(_TANH_GELUS)})")
    hf.expect(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              add_cross_attention=False, tie_word_embeddings=True)
    E, H = hf.require("n_embd"), hf.require("n_head")
    return {"family": "gpt2", "n_layers": hf.require("n_layer"), "d_model": E,
            "d_ff": hf.get("n_inner", 4 * E), "n_heads": H,
            "n_kv_heads": 1 if multiquery else H, "d_head": E // H,
            "vocab_size": hf.require("vocab_size"), "max_len": hf.require("n_positions"),
            "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "parallel_block": False,
            "norm": "layernorm", "activation": "gelu", "positions": "learned", "bias": True,
            "tie_embeddings": True}


def _rope_fields(hf: _HfConfig) -> dict:
    """rope_theta and the scaling fields, from transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{hf.path}: per-layer-type RoPE parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{hf.path}: partial_rotary_factor={partial} is not supported "
                              "(RoPE on the whole head only)")
    fields = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return fields
    if kind == "linear":
        return fields | {"rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return fields | {
            "rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params.get("original_max_position_embeddings",
                                                    hf.require("max_position_embeddings")))}
    raise CheckpointError(
        f"{hf.path}: RoPE scaling rope_type={kind!r} (in rope_parameters/rope_scaling) is not "
        "supported; supported: 'default', 'linear', 'llama3' ('dynamic' changes with the "
        "sequence length, 'yarn'/'longrope' also rescale attention)")


def _llama_config(hf: _HfConfig, qkv_bias: bool = False, window: int | None = None) -> dict:
    hf.expect(hidden_act="silu", attention_bias=False, mlp_bias=False)
    E, H = hf.require("hidden_size"), hf.require("num_attention_heads")
    max_len = hf.require("max_position_embeddings")
    if window is not None:  # within the window, sliding-window attention is full attention
        max_len = min(max_len, window)
    return {"family": "llama", "n_layers": hf.require("num_hidden_layers"), "d_model": E,
            "d_ff": hf.require("intermediate_size"), "n_heads": H,
            "n_kv_heads": hf.get("num_key_value_heads", H), "d_head": hf.get("head_dim", E // H),
            "vocab_size": hf.require("vocab_size"), "max_len": max_len,
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "parallel_block": False,
            "norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "bias": False,
            "qkv_bias": qkv_bias, "tie_embeddings": False, **_rope_fields(hf)}


def _qwen2_config(hf: _HfConfig) -> dict:
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    return _llama_config(hf, qkv_bias=True, window=window)


# ---- tensors --------------------------------------------------------------------------------

class _Tensors:
    """Checkpoint tensors by name (under the family's prefix), each checked against the shape
    config.json implies; remembers which were used so leftovers can be reported."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, hf: _HfConfig, prefix: str):
        self.checkpoint, self.hf, self.prefix = checkpoint, hf, prefix
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...], fields: str, top: bool = False) -> Stored:
        key = name if top else self.prefix + name
        if key not in self.checkpoint:
            raise CheckpointError(
                f"tensor {key!r} is missing from the checkpoint in {self.checkpoint.directory} "
                f"(config.json {fields} call for it with shape {shape})")
        actual = self.checkpoint.shape(key)
        if actual != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {actual}, but config.json implies {tuple(shape)} "
                f"(from {fields})")
        self.used.add(key)
        return Stored(self.checkpoint, key)


@dataclass(frozen=True)
class _Architecture:
    model_type: str  # Hugging Face's name
    config: Callable[[_HfConfig], dict]  # config.json -> TransformerConfig fields
    tensors: Callable[[TransformerConfig, _Tensors], tuple[dict, list[dict]]]  # top, layers
    prefixes: tuple[str, ...]  # where the base model's tensors live ("" for a bare base model)
    embedding: str  # a tensor every checkpoint has, to find the prefix
    ignored: str  # regex of stored tensors that are buffers, not weights
    tied_head: str = "lm_head.weight"  # ignored when the embeddings are tied


def _gpt2_tensors(config: TransformerConfig, t: _Tensors, *, conv1d: bool,
                  fused_per_head: bool = False) -> tuple[dict, list[dict]]:
    """GPT-2 (Conv1D: weights (in, out)) or GPT-BigCode (Linear: (out, in))."""
    E, F, V, H, K, D = (config.d_model, config.d_ff, config.vocab_size, config.n_heads,
                        config.n_kv_heads, config.d_head)
    fields = "n_embd, n_head, n_inner"
    # GPT-BigCode without multi_query stores c_attn per head as [q_h | k_h | v_h]; ours is
    # [Q | K | V]: row (part p, head h, d) of ours is row h*3D + p*D + d of theirs.
    per_head = (np.arange(H)[None, :, None] * 3 * D + np.arange(3)[:, None, None] * D
                + np.arange(D)[None, None, :]).reshape(-1)

    def linear(name: str, fan_in: int, fan_out: int, reorder: bool = False) -> dict:
        w = t.get(f"{name}.weight", (fan_in, fan_out) if conv1d else (fan_out, fan_in), fields)
        b = t.get(f"{name}.bias", (fan_out,), fields)
        if reorder:
            w, b = Gathered(w, 0, per_head), Gathered(b, 0, per_head)
        return {"w": w if conv1d else Transposed(w), "b": b}

    def layer_norm(name: str) -> dict:
        return {"scale": t.get(f"{name}.weight", (E,), "n_embd"),
                "bias": t.get(f"{name}.bias", (E,), "n_embd")}

    wpe = t.get("wpe.weight", (t.hf.require("n_positions"), E), "n_positions, n_embd")
    if config.max_len < wpe.shape[0]:
        wpe = Gathered(wpe, 0, np.arange(config.max_len))
    top = {"wte": t.get("wte.weight", (V, E), "vocab_size, n_embd"), "wpe": wpe,
           "ln_f": layer_norm("ln_f")}
    layers = [{
        "ln_1": layer_norm(f"h.{i}.ln_1"),
        "attn": {"c_attn": linear(f"h.{i}.attn.c_attn", E, (H + 2 * K) * D,
                                  reorder=fused_per_head and K == H),
                 "c_proj": linear(f"h.{i}.attn.c_proj", H * D, E)},
        "ln_2": layer_norm(f"h.{i}.ln_2"),
        "mlp": {"c_fc": linear(f"h.{i}.mlp.c_fc", E, F),
                "c_proj": linear(f"h.{i}.mlp.c_proj", F, E)},
    } for i in range(config.n_layers)]
    return top, layers


def _rotate_half_to_interleaved(n_heads: int, d_head: int) -> np.ndarray:
    """Row order taking Hugging Face's rotate-half q/k rows to interleaved pairs: our row
    h*D + 2i + j is their row h*D + j*D/2 + i (the inverse of transformers' Llama conversion
    script `permute`)."""
    h, i, j = np.meshgrid(np.arange(n_heads), np.arange(d_head // 2), np.arange(2),
                          indexing="ij")  # (H, D/2, 2): our order
    return (h * d_head + j * (d_head // 2) + i).reshape(-1)


def _llama_tensors(config: TransformerConfig, t: _Tensors,
                   tied: bool) -> tuple[dict, list[dict]]:
    E, F, V, H, K, D = (config.d_model, config.d_ff, config.vocab_size, config.n_heads,
                        config.n_kv_heads, config.d_head)
    q_rows, k_rows = _rotate_half_to_interleaved(H, D), _rotate_half_to_interleaved(K, D)
    heads = "hidden_size, num_attention_heads, head_dim"
    kv_heads = "hidden_size, num_key_value_heads, head_dim"
    ffn = "hidden_size, intermediate_size"

    def layer(i: int) -> dict:
        at = f"layers.{i}."
        p = {
            "attention_norm": t.get(at + "input_layernorm.weight", (E,), "hidden_size"),
            "wq": Transposed(Gathered(t.get(at + "self_attn.q_proj.weight", (H * D, E), heads),
                                      0, q_rows)),
            "wk": Transposed(Gathered(t.get(at + "self_attn.k_proj.weight", (K * D, E),
                                            kv_heads), 0, k_rows)),
            "wv": Transposed(t.get(at + "self_attn.v_proj.weight", (K * D, E), kv_heads)),
            "wo": Transposed(t.get(at + "self_attn.o_proj.weight", (E, H * D), heads)),
            "ffn_norm": t.get(at + "post_attention_layernorm.weight", (E,), "hidden_size"),
            "w1": Transposed(t.get(at + "mlp.gate_proj.weight", (F, E), ffn)),
            "w3": Transposed(t.get(at + "mlp.up_proj.weight", (F, E), ffn)),
            "w2": Transposed(t.get(at + "mlp.down_proj.weight", (E, F), ffn)),
        }
        if config.qkv_bias:
            p["bq"] = Gathered(t.get(at + "self_attn.q_proj.bias", (H * D,), heads), 0, q_rows)
            p["bk"] = Gathered(t.get(at + "self_attn.k_proj.bias", (K * D,), kv_heads), 0,
                               k_rows)
            p["bv"] = t.get(at + "self_attn.v_proj.bias", (K * D,), kv_heads)
        return p

    embedding = t.get("embed_tokens.weight", (V, E), "vocab_size, hidden_size")
    head = embedding if tied else t.get("lm_head.weight", (V, E),
                                        "vocab_size, hidden_size, tie_word_embeddings=false",
                                        top=True)
    top = {"tok_embeddings": embedding, "norm": t.get("norm.weight", (E,), "hidden_size"),
           "output": Transposed(head)}
    return top, [layer(i) for i in range(config.n_layers)]


def _tied(hf: _HfConfig, default: bool) -> bool:
    return bool(hf.get("tie_word_embeddings", default))


_GPT2_BUFFERS = r"\.attn\.(masked_)?bias$"  # causal-mask buffers in old GPT-2 checkpoints
_ROPE_BUFFERS = r"rotary_emb\.inv_freq$"  # RoPE frequency buffers in old Llama checkpoints

ARCHITECTURES: dict[str, _Architecture] = {
    "GPT2LMHeadModel": _Architecture(
        "gpt2", lambda hf: _gpt2_config(hf, multiquery=False),
        lambda c, t: _gpt2_tensors(c, t, conv1d=True),
        ("transformer.", ""), "wte.weight", _GPT2_BUFFERS),
    "GPTBigCodeForCausalLM": _Architecture(
        "gpt_bigcode", lambda hf: _gpt2_config(hf, multiquery=hf.get("multi_query", True)),
        lambda c, t: _gpt2_tensors(c, t, conv1d=False, fused_per_head=True),
        ("transformer.", ""), "wte.weight", _GPT2_BUFFERS),
    "LlamaForCausalLM": _Architecture(
        "llama", _llama_config, lambda c, t: _llama_tensors(c, t, _tied(t.hf, False)),
        ("model.", ""), "embed_tokens.weight", _ROPE_BUFFERS),
    "MistralForCausalLM": _Architecture(
        "mistral", lambda hf: _llama_config(hf, window=hf.get("sliding_window")),
        lambda c, t: _llama_tensors(c, t, _tied(t.hf, False)),
        ("model.", ""), "embed_tokens.weight", _ROPE_BUFFERS),
    "Qwen2ForCausalLM": _Architecture(
        "qwen2", _qwen2_config, lambda c, t: _llama_tensors(c, t, _tied(t.hf, False)),
        ("model.", ""), "embed_tokens.weight", _ROPE_BUFFERS),
}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
_TIED_BY_DEFAULT = {"gpt2", "gpt_bigcode"}


def _read_hf_config(directory: Path) -> tuple[_HfConfig, _Architecture]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json (not a Hugging Face checkpoint "
                              "directory)")
    hf = _HfConfig(path, read_json(path))
    names = hf.get("architectures", [])
    for name in names:
        if name in ARCHITECTURES:
            return hf, ARCHITECTURES[name]
    if not names and hf.model_type in _BY_MODEL_TYPE:
        return hf, _BY_MODEL_TYPE[hf.model_type]
    raise CheckpointError(
        f"{path}: architectures={names} (model_type {hf.model_type!r}) is not supported; "
        f"meshwright loads {', '.join(ARCHITECTURES)} (model_type "
        f"{', '.join(sorted(_BY_MODEL_TYPE))})")


def _config_from(directory: Path, hf: _HfConfig, arch: _Architecture, dtype: Any,
                 max_len: int | None, scan_layers: bool,
                 checkpoint: SafetensorsCheckpoint | None) -> TransformerConfig:
    fields = arch.config(hf)
    if max_len is not None:
        if fields["positions"] == "learned" and max_len > fields["max_len"]:
            raise CheckpointError(f"max_len={max_len} is longer than the {fields['max_len']} "
                                  f"learned positions of {directory} (config.json n_positions)")
        fields["max_len"] = max_len
    if dtype is None:
        dtype = hf.get("dtype", hf.get("torch_dtype"))
    if dtype is None and checkpoint is not None:
        stored = [k for k in checkpoint.names() if k.endswith(arch.embedding)]
        dtype = checkpoint.dtype(stored[0]).name if stored else None
    fields["dtype"] = jnp.dtype(dtype or "float32").name
    fields["name"] = directory.resolve().name
    try:
        config = TransformerConfig(scan_layers=scan_layers, **fields)
        build(config)  # the family accepts it
    except ValueError as err:
        raise CheckpointError(f"{hf.path}: {err}") from None
    return config


def load_config(path: str | os.PathLike, *, dtype: Any = None, max_len: int | None = None,
                scan_layers: bool = False) -> TransformerConfig:
    """The TransformerConfig of a Hugging Face checkpoint directory, from its config.json alone
    (the tensors' headers only when config.json names no dtype). No weights are read.

    dtype: parameter dtype of the runnable model (default: config.json's `dtype` /
    `torch_dtype`, else the stored one). max_len: KV cache length (default: the model's
    maximum positions, capped by a sliding window).

        >>> cfg = load_config("path/to/Llama-3.1-8B", max_len=4096)       # doctest: +SKIP
        >>> cfg.n_kv_heads, cfg.rope_scaling
        (8, 'llama3')
    """
    directory = Path(path)
    hf, arch = _read_hf_config(directory)
    checkpoint = None
    if hf.get("dtype", hf.get("torch_dtype")) is None and dtype is None:
        try:
            checkpoint = SafetensorsCheckpoint(directory)
        except CheckpointError:
            checkpoint = None
    return _config_from(directory, hf, arch, dtype, max_len, scan_layers, checkpoint)


# ---- parameters -----------------------------------------------------------------------------

def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_sharding(x: Any) -> bool:
    return isinstance(x, (Sharding, PartitionSpec))


def _shardings_for(shapes: Any, mesh: jax.sharding.Mesh | None,
                   shardings: Shardings | None) -> list[Sharding]:
    """One Sharding per parameter leaf, in tree order."""
    paths_and_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    if shardings is None:
        default = (SingleDeviceSharding(jax.devices()[0]) if mesh is None
                   else NamedSharding(mesh, PartitionSpec()))
        return [default] * len(paths_and_shapes)
    if callable(shardings) and not _is_sharding(shardings):
        chosen = [shardings(_path_str(path), shape) for path, shape in paths_and_shapes]
    else:
        chosen = jax.tree.leaves(shardings, is_leaf=_is_sharding)
        if len(chosen) != len(paths_and_shapes):
            raise ValueError(f"shardings has {len(chosen)} leaves, the parameters "
                             f"{len(paths_and_shapes)}; give one per parameter (see "
                             "meshwright.models.param_shapes(config))")
    out = []
    for (path, _), s in zip(paths_and_shapes, chosen, strict=True):
        if isinstance(s, PartitionSpec):
            if mesh is None:
                raise ValueError(f"sharding of {_path_str(path)!r} is a PartitionSpec: pass "
                                 "mesh= too, or give NamedShardings")
            s = NamedSharding(mesh, s)
        if not isinstance(s, Sharding):
            raise TypeError(f"sharding of {_path_str(path)!r} is {s!r}, not a "
                            "jax.sharding.Sharding or PartitionSpec")
        out.append(s)
    return out


def from_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    shardings: Shardings | None = None, dtype: Any = None,
                    max_len: int | None = None, scan_layers: bool = False,
                    progress: bool = False) -> tuple[TransformerConfig, dict]:
    """Load a Hugging Face checkpoint directory: `(config, params)` for meshwright's models.

    path: a directory with config.json and model.safetensors, or safetensors shards with
    model.safetensors.index.json. Tensors are read lazily: each device reads only the block of
    each tensor that it holds.
    mesh: a jax.sharding.Mesh; without `shardings`, every parameter is replicated on it.
    shardings: per parameter, a Sharding (or PartitionSpec on `mesh`): a pytree shaped like
    the params (see `param_shapes(config)`), or a function (path, ShapeDtypeStruct) -> sharding
    with paths like "tok_embeddings", "layers/3/wq" (or "layers/wq" with scan_layers), e.g.
    `split_largest_axis(mesh)`. Default: one device (no mesh) or replicated (mesh).
    dtype, max_len: as in `load_config`. scan_layers: layers stacked for `jax.lax.scan`.
    progress: a progress bar over the bytes placed (on a terminal; else one line at the end).

    Raises CheckpointError (a ValueError) for an unknown architecture, a missing, unexpected or
    wrongly shaped tensor, or a config.json field meshwright does not implement.

        >>> config, params = from_pretrained("path/to/gpt2")               # doctest: +SKIP
        >>> meshwright.models.logits(config, params, jnp.array([[464, 3290]])).shape
        (1, 2, 50257)
    """
    config, lazy = _lazy_params(path, dtype, max_len, scan_layers)

    shapes = param_shapes(config)
    lazy_leaves, lazy_tree = jax.tree.flatten(lazy)
    if lazy_tree != jax.tree.structure(shapes):  # a converter bug, not a user error
        raise AssertionError(f"converter for {config.name} built {lazy_tree}, the "
                             f"{config.family} model needs {jax.tree.structure(shapes)}")
    shape_leaves = jax.tree.leaves(shapes)
    for (p, want), have in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], lazy_leaves,
                               strict=True):
        assert tuple(have.shape) == want.shape, (_path_str(p), have.shape, want.shape)

    placed = []
    bar = _progress(shape_leaves) if progress else None
    for leaf, want, sharding in zip(lazy_leaves, shape_leaves,
                                    _shardings_for(shapes, mesh, shardings), strict=True):
        placed.append(place(leaf, sharding, want.dtype))
        if bar is not None:
            bar.update(want.size * want.dtype.itemsize)
    if bar is not None:
        bar.close()
    return config, jax.tree.unflatten(lazy_tree, placed)


def _lazy_params(path: str | os.PathLike, dtype: Any, max_len: int | None,
                 scan_layers: bool) -> tuple[TransformerConfig, dict]:
    """(config, the parameter pytree with lazy arrays as leaves): checked, nothing read yet."""
    directory = Path(path)
    hf, arch = _read_hf_config(directory)
    checkpoint = SafetensorsCheckpoint(directory)
    config = _config_from(directory, hf, arch, dtype, max_len, scan_layers, checkpoint)
    prefixes = [p for p in arch.prefixes if p + arch.embedding in checkpoint]
    tensors = _Tensors(checkpoint, hf, prefixes[0] if prefixes else arch.prefixes[0])
    top, layers = arch.tensors(config, tensors)
    _check_all_used(checkpoint, tensors.used, arch, hf, config)
    lazy = dict(top)
    lazy["layers"] = (jax.tree.map(lambda *parts: Stacked(parts), *layers)
                      if config.scan_layers else layers)
    return config, lazy


def _progress(leaves: list):
    from meshwright.progress import bar

    total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    return bar(total=total, unit="B", unit_scale=True, desc="loading")


def _check_all_used(checkpoint: SafetensorsCheckpoint, used: set[str], arch: _Architecture,
                    hf: _HfConfig, config: TransformerConfig) -> None:
    tied = _tied(hf, arch.model_type in _TIED_BY_DEFAULT)
    for key in checkpoint.names():
        if key in used or re.search(arch.ignored, key) or (tied and key == arch.tied_head):
            continue
        layer = re.search(r"(?:layers|h)\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= config.n_layers:
            hint = (f"config.json has {config.n_layers} layer(s) (num_hidden_layers / "
                    "n_layer)")
        elif key.endswith(".bias"):
            hint = "biases are off in config.json (attention_bias / mlp_bias / bias)"
        elif key == arch.tied_head:
            hint = "tie_word_embeddings is set but the checkpoint has its own lm_head"
        else:
            hint = f"meshwright's {arch.model_type} loader knows no such tensor"
        raise CheckpointError(
            f"tensor {key!r} in {checkpoint.directory} is not used: {hint}. The checkpoint and "
            f"its config.json disagree, or the model has a part meshwright does not implement")


def _auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The mesh with Auto axes. `jax.make_mesh` makes Explicit ones, under which the models'
    embedding lookup (a gather from a table split by rows) fails for want of an out_sharding;
    with Auto axes XLA's partitioner places every op, as on meshwright's own meshes."""
    from jax.sharding import AxisType

    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def split_largest_axis(mesh: jax.sharding.Mesh,
                       axis: str | None = None) -> Callable[[str, jax.ShapeDtypeStruct],
                                                            NamedSharding]:
    """A simple `shardings` function: each parameter split over mesh axis `axis` (default: the
    mesh's first) along its largest dimension that divides evenly, else replicated.

    Not a plan (the planner chooses real layouts); it spreads the weights so that each device
    holds and reads about 1/n of them.
    """
    axis = axis or mesh.axis_names[0]
    n = mesh.shape[axis]
    mesh = _auto_axes(mesh)

    def sharding(path: str, shape: jax.ShapeDtypeStruct) -> NamedSharding:
        dims = [d for d in np.argsort(shape.shape, kind="stable")[::-1]
                if shape.shape[d] % n == 0 and shape.shape[d] >= n]
        spec = [None] * len(shape.shape)
        if dims:
            spec[dims[0]] = axis
        return NamedSharding(mesh, PartitionSpec(*spec))

    return sharding


# ---- tokenizer ------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` of a checkpoint directory's tokenizer.json, or None when it
    has none (then prompts are token ids).

        >>> tok = load_tokenizer("path/to/gpt2")                           # doctest: +SKIP
        >>> tok.encode("Hello world").ids, tok.decode([15496, 995])
        ([15496, 995], 'Hello world')
    """
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError(f"{file} needs the `tokenizers` package: pip install "
                          "'meshwright[hf]'") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception on a bad file)
        raise CheckpointError(f"{file} is not a readable tokenizer ({e}); fix or re-download "
                              "it, or remove it to pass token ids") from None


@dataclass(frozen=True)
class GenerationInfo:
    """What a checkpoint says about generating text, beyond its weights and tokenizer."""

    chat_template: str | None  # Jinja source of its chat template; None: it has none
    bos_token: str | None  # the strings its chat template may refer to
    eos_token: str | None
    eos_token_ids: tuple[int, ...]  # generation ends at any of these (generation_config.json,
    #                                 else config.json)


def load_generation_info(path: str | os.PathLike) -> GenerationInfo:
    """A checkpoint directory's chat template, special tokens and end-of-sequence ids, read
    from the files Hugging Face writes: `chat_template.jinja` or `tokenizer_config.json`'s
    "chat_template" (a string, or a list of named templates of which "default" is used),
    `generation_config.json` / `config.json` "eos_token_id" (an id or a list). Absent files
    and fields give None / (). The template is returned as text, never run here.

        >>> info = load_generation_info("path/to/llama")                    # doctest: +SKIP
        >>> info.eos_token_ids, info.chat_template[:40]
        ((2,), "{% for message in messages %}{{ '<|' + ...")
    """
    path = Path(path)

    def read_optional(name: str) -> dict:
        file = path / name
        return read_json(file) if file.exists() else {}

    tok_config = read_optional("tokenizer_config.json")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        template = jinja_file.read_text()

    def token_text(value) -> str | None:  # "</s>" or {"content": "</s>", ...}
        return value.get("content") if isinstance(value, dict) else value

    eos = read_optional("generation_config.json").get("eos_token_id")
    if eos is None:
        eos = read_optional("config.json").get("eos_token_id")
    eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return GenerationInfo(template if isinstance(template, str) else None,
                          token_text(tok_config.get("bos_token")),
                          token_text(tok_config.get("eos_token")), eos_ids)
