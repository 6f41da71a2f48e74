"""The bundled demo model: a small byte-level PaLM-style decoder trained on the King James Bible.

    >>> from meshwright.models import load_demo_model, build
    >>> config, params = load_demo_model()
    >>> config.name, config.family, config.n_kv_heads, config.parallel_block
    ('palm-kjv', 'palm', 1, True)
    >>> decode(generate(config, params, encode("In the beginning God"), 24))  # doctest: +SKIP
    ' created the heaven and the'

Tokens are bytes (vocab 256): `encode(text)` is `list(text.encode())`, `decode(ids)` the
reverse. The weights (`data/demo_model.safetensors`, float32, the config JSON in its
metadata) are reproduced by `python models/train_demo.py`; the text it learns from,
`data/kjv_excerpt.txt`, is described in `data/README.md`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from meshwright.models.config import TransformerConfig

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TEXT_PATH = os.path.join(DATA_DIR, "kjv_excerpt.txt")
WEIGHTS_PATH = os.path.join(DATA_DIR, "demo_model.safetensors")
HELDOUT_EVERY = 25  # chapter i is held out of training when i % HELDOUT_EVERY == HELDOUT_AT
HELDOUT_AT = 12

# The architecture of the bundled model (the saved file carries its own copy of this).
DEMO_CONFIG = TransformerConfig(
    name="palm-kjv", family="palm", n_layers=4, d_model=128, d_ff=512, n_heads=8,
    n_kv_heads=1, d_head=16, vocab_size=256, max_len=256, parallel_block=True,
    norm="layernorm", activation="swiglu", positions="rope", bias=False,
    tie_embeddings=True, scan_layers=True, dtype="float32")


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text` as token ids."""
    return list(text.encode("utf-8"))


def decode(tokens: Sequence[int]) -> str:
    """Token ids (bytes) back to text; invalid UTF-8 becomes U+FFFD."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class ByteTokenizer:
    """The bundled model's tokenizer as an object (what `Engine(..., tokenizer=...)` and the
    HTTP server take): `encode` and `decode` above.

        >>> ByteTokenizer().encode("Hi"), ByteTokenizer().decode([72, 105])
        ([72, 105], 'Hi')
    """

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return decode(tokens)


def chapters() -> list[str]:
    """The excerpt as chapters, each "Book N\\n" and one verse per line."""
    with open(TEXT_PATH, encoding="utf-8") as f:
        return [c.strip("\n") + "\n" for c in f.read().split("\n\n") if c.strip()]


def demo_text(split: str = "train") -> str:
    """The training text ("train"), the held-out chapters ("heldout"), or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    parts = chapters()
    if split != "all":
        keep = split == "heldout"
        parts = [c for i, c in enumerate(parts) if (i % HELDOUT_EVERY == HELDOUT_AT) == keep]
    return "\n".join(parts)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = np.asarray(value)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_demo_model(config: TransformerConfig, params: dict, path: str = WEIGHTS_PATH,
                    metadata: dict[str, str] | None = None) -> None:
    """Write `params` (layers stacked: config.scan_layers) as safetensors, with the config as
    JSON in the file's metadata."""
    import dataclasses

    from safetensors.numpy import save_file

    if not config.scan_layers:
        raise ValueError("save_demo_model stores stacked layers: use scan_layers=True")
    meta = {"config": json.dumps(dataclasses.asdict(config), sort_keys=True)}
    meta.update(metadata or {})
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in _flatten(params).items()},
              path, metadata=meta)


def load_demo_model(path: str = WEIGHTS_PATH) -> tuple[TransformerConfig, dict]:
    """The bundled model: (config, params), params as float32 jax arrays on the default device.

    Layers are stacked (`config.scan_layers` is True). Pass `config.replace(max_len=...)` to
    `build` for longer contexts (RoPE); the model was trained on 256-byte windows.
    """
    import jax.numpy as jnp
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python models/train_demo.py` to "
                                "train the demo model (a few minutes on CPU)")
    with safe_open(path, framework="numpy") as f:
        config = TransformerConfig(**json.loads(f.metadata()["config"]))
        flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return config, _unflatten(flat)


def demo_metadata(path: str = WEIGHTS_PATH) -> dict[str, str]:
    """The training record saved with the weights (steps, losses, seconds, ...)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata())


def generate(config: TransformerConfig, params: dict, prompt: Sequence[int],
             max_tokens: int) -> list[int]:
    """Greedy continuation of one prompt, one device, no cache (a reference for tests):
    recomputes the whole sequence per token, so keep it short."""
    import jax
    import jax.numpy as jnp
    from meshwright.models.registry import build

    model = build(config)
    step = jax.jit(lambda p, t: model.logits(p, t))
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        window = tokens[-config.max_len:]
        # pad to a multiple of 32 so a handful of shapes compile, not one per length
        n = len(window)
        padded = np.zeros((1, -(-n // 32) * 32), np.int32)
        padded[0, :n] = window
        logits = step(params, jnp.asarray(padded))
        nxt = int(jnp.argmax(logits[0, n - 1]))
        tokens.append(nxt)
        out.append(nxt)
    return out
