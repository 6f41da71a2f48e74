"""Model configurations: one dataclass for every decoder-only Transformer meshwright knows.

The same field names are used everywhere: in the reference models, in the planner, in
`meshwright plan --set key=value`, and in checkpoint loaders.

    >>> from meshwright.models.config import get_config
    >>> cfg = get_config("palm-540b")
    >>> cfg.n_layers, cfg.d_model, cfg.n_kv_heads
    (118, 18432, 1)
    >>> round(cfg.n_params() / 1e9)
    540
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Family = Literal["gpt2", "palm", "llama"]


@dataclass(frozen=True)
class TransformerConfig:
    name: str = "custom"  # preset name, for messages
    family: Family = "gpt2"  # which reference implementation runs it
    n_layers: int = 2  # number of Transformer blocks
    d_model: int = 64  # E: width of the residual stream
    d_ff: int = 256  # F: hidden width of the feed-forward block
    n_heads: int = 4  # H: query heads
    n_kv_heads: int = 4  # K: key/value heads (== n_heads: MHA, 1: MQA, between: GQA)
    d_head: int = 16  # D: width of one head
    vocab_size: int = 256  # V: tokens in the vocabulary
    max_len: int = 128  # longest sequence (prompt + generated) the model supports
    parallel_block: bool = False  # y = x + attn(norm(x)) + mlp(norm(x)) (PaLM) instead of serial
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    activation: Literal["gelu", "swiglu"] = "gelu"  # swiglu has three FFN matrices, gelu two
    positions: Literal["learned", "rope"] = "learned"
    bias: bool = True  # biases on projections and norms
    tie_embeddings: bool = True  # unembedding is the transposed embedding
    scan_layers: bool = False  # layers as a jax.lax.scan over stacked weights (else a Python loop)
    rope_theta: float = 10000.0  # RoPE base frequency
    # RoPE frequency scaling for long contexts (Hugging Face `rope_type`): "linear" divides every
    # frequency by rope_scaling_factor; "llama3" divides the low frequencies only, with a smooth
    # ramp between rope_original_max_len / rope_low_freq_factor and / rope_high_freq_factor.
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0  # "linear" and "llama3": how much longer the context gets
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_len: int = 8192  # "llama3" only: the context length of pre-training
    qkv_bias: bool = False  # biases on the Q, K and V projections only (Qwen2), with bias=False
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    dtype: str = "float32"  # parameter and activation dtype of the runnable model

    def __post_init__(self) -> None:
        problems = []
        for field in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head",
                      "vocab_size", "max_len"):
            if getattr(self, field) < 1:
                problems.append(f"{field}={getattr(self, field)} must be >= 1")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.positions == "rope" and self.d_head % 2:
            problems.append(f"RoPE needs an even d_head, got {self.d_head}")
        if self.rope_scaling not in ("none", "linear", "llama3"):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be 'none', 'linear' or "
                            "'llama3'")
        if problems:
            raise ValueError(f"invalid config {self.name!r}: " + "; ".join(problems))

    # ---- derived quantities used by the planner -------------------------------------------
    @property
    def ffn_matrices(self) -> int:
        """Weight matrices in one feed-forward block (SwiGLU: gate, up, down)."""
        return 3 if self.activation == "swiglu" else 2

    def attention_params_per_layer(self) -> int:
        e, h, k, d = self.d_model, self.n_heads, self.n_kv_heads, self.d_head
        return e * h * d * 2 + e * k * d * 2  # Q and O, K and V

    def ffn_params_per_layer(self) -> int:
        return self.ffn_matrices * self.d_model * self.d_ff

    def layer_params(self) -> int:
        """Weights of one block (matrices only; biases and norm scales are negligible)."""
        return self.attention_params_per_layer() + self.ffn_params_per_layer()

    def n_params(self, include_embeddings: bool = True) -> int:
        total = self.n_layers * self.layer_params()
        if include_embeddings:
            emb = self.vocab_size * self.d_model
            total += emb if self.tie_embeddings else 2 * emb
            if self.positions == "learned":
                total += self.max_len * self.d_model
        return total

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of K and V cache for one token of one sequence, over all layers
        (`models.cache.KVCacheShape.bytes_per_token`)."""
        from meshwright.models.cache import KVCacheShape

        return KVCacheShape.of(self).bytes_per_token(bytes_per_element)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed; unknown field names are an error that lists the known."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise KeyError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> TransformerConfig:
        """Apply `key=value` strings (the CLI's `--set`), converting to each field's type."""
        changes = {}
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in types:
                raise KeyError(f"unknown config field {key!r}; known fields: {sorted(types)}")
            current = getattr(self, key)
            if isinstance(current, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{key} expects true/false, got {raw!r}")
                changes[key] = raw.lower() in ("true", "1")
            elif isinstance(current, int):
                changes[key] = int(raw)
            elif isinstance(current, float):
                changes[key] = float(raw)
            else:
                changes[key] = raw
        return self.replace(**changes)


def _palm(name: str, n_layers: int, d_model: int, n_heads: int) -> TransformerConfig:
    # PaLM (Chowdhery et al. 2022, Table 1): F = 4E, D = 256, multiquery, parallel blocks,
    # SwiGLU, RoPE, no biases, shared input/output embeddings, 256k SentencePiece vocabulary.
    return TransformerConfig(
        name=name, family="palm", n_layers=n_layers, d_model=d_model, d_ff=4 * d_model,
        n_heads=n_heads, n_kv_heads=1, d_head=256, vocab_size=256_000, max_len=2048,
        parallel_block=True, norm="layernorm", activation="swiglu", positions="rope",
        bias=False, tie_embeddings=True, dtype="bfloat16")


def _gpt2(name: str, n_layers: int, d_model: int, n_heads: int) -> TransformerConfig:
    # GPT-2 (Radford et al. 2019): F = 4E, D = 64, MHA, LayerNorm, GELU, learned positions.
    return TransformerConfig(
        name=name, family="gpt2", n_layers=n_layers, d_model=d_model, d_ff=4 * d_model,
        n_heads=n_heads, n_kv_heads=n_heads, d_head=d_model // n_heads, vocab_size=50257,
        max_len=1024, parallel_block=False, norm="layernorm", activation="gelu",
        positions="learned", bias=True, tie_embeddings=True, norm_eps=1e-5)


def _llama(name: str, n_layers: int, d_model: int, d_ff: int, n_heads: int, n_kv_heads: int,
           vocab: int = 32000, max_len: int = 4096, theta: float = 10000.0) -> TransformerConfig:
    # Llama (Touvron et al. 2023): RMSNorm, SwiGLU, RoPE, no biases, untied embeddings.
    return TransformerConfig(
        name=name, family="llama", n_layers=n_layers, d_model=d_model, d_ff=d_ff,
        n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_model // n_heads, vocab_size=vocab,
        max_len=max_len, parallel_block=False, norm="rmsnorm", activation="swiglu",
        positions="rope", bias=False, tie_embeddings=False, rope_theta=theta, norm_eps=1e-5,
        dtype="bfloat16")


PRESETS: dict[str, TransformerConfig] = {
    # ---- real sizes: used by the planner; never allocated here ----
    "palm-8b": _palm("palm-8b", 32, 4096, 16),
    "palm-62b": _palm("palm-62b", 64, 8192, 32),
    # 48 heads in the paper's model, padded to 64 for serving (Pope et al. section 4)
    "palm-540b": _palm("palm-540b", 118, 18432, 48),
    # Megatron-Turing NLG 530B (Smith et al. 2022): serial blocks, multihead, GELU.
    "megatron-530b": TransformerConfig(
        name="megatron-530b", family="gpt2", n_layers=105, d_model=20480, d_ff=81920,
        n_heads=128, n_kv_heads=128, d_head=160, vocab_size=51200, max_len=2048,
        parallel_block=False, norm="layernorm", activation="gelu", positions="learned",
        bias=True, tie_embeddings=True, dtype="bfloat16"),
    "gpt2-small": _gpt2("gpt2-small", 12, 768, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 1024, 16),
    "gpt2-large": _gpt2("gpt2-large", 36, 1280, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 1600, 25),
    "llama-7b": _llama("llama-7b", 32, 4096, 11008, 32, 32),
    "llama-13b": _llama("llama-13b", 40, 5120, 13824, 40, 40),
    "llama-70b": _llama("llama-70b", 80, 8192, 28672, 64, 8),  # Llama 2 70B: GQA, 8 kv heads
    "llama3-8b": _llama("llama3-8b", 32, 4096, 14336, 32, 8, vocab=128256, max_len=8192,
                        theta=500000.0),
    # Llama 3.1 405B (meta-llama/Llama-3.1-405B config.json): 126 layers, E 16384, F 53248,
    # 128 heads of 128, 8 KV heads, 128k context with llama3 RoPE scaling (factor 8 of 8192).
    # 810 GB of bf16 weights: more than one node of 8 x 80 GB.
    "llama3-405b": _llama("llama3-405b", 126, 16384, 53248, 128, 8, vocab=128256,
                          max_len=131072, theta=500000.0).replace(
        rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_len=8192),
    # ---- small sizes that run on this machine (tests, demos) ----
    "gpt2-tiny": TransformerConfig(
        name="gpt2-tiny", family="gpt2", n_layers=2, d_model=64, d_ff=256, n_heads=4,
        n_kv_heads=4, d_head=16, vocab_size=256, max_len=128),
    "palm-tiny": TransformerConfig(
        name="palm-tiny", family="palm", n_layers=2, d_model=64, d_ff=256, n_heads=8,
        n_kv_heads=1, d_head=16, vocab_size=256, max_len=128, parallel_block=True,
        norm="layernorm", activation="swiglu", positions="rope", bias=False),
    "llama-tiny": TransformerConfig(
        name="llama-tiny", family="llama", n_layers=2, d_model=64, d_ff=192, n_heads=8,
        n_kv_heads=2, d_head=8, vocab_size=256, max_len=128, norm="rmsnorm",
        activation="swiglu", positions="rope", bias=False, tie_embeddings=False),
}

DEFAULT_MODEL = "palm-tiny"


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset called `name`, with field overrides; unknown names list the known ones."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(PRESETS))}") from None
    return cfg.replace(**overrides) if overrides else cfg
