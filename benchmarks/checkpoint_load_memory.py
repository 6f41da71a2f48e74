"""Host memory while loading a ~1 GB checkpoint split 8 ways: meshwright's loader vs two others.

    python benchmarks/checkpoint_load_memory.py      # table; results/checkpoint_load_memory.json

Writes a random Llama-style checkpoint (float32, untied, GQA; 4 safetensors shards + index) to
a temporary directory, then loads it in a fresh process per method onto a simulated 8-device
CPU mesh, every parameter split 8 ways along its largest dimension (`split_largest_axis`):

- `meshwright`: `from_pretrained(dir, mesh=..., shardings=...)`: each device's block is read
  from the memory-mapped file, put on its device, dropped.
- `make_array_from_callback`: the same lazy reads through `jax.make_array_from_callback`,
  which reads every local block of a tensor before transferring any.
- `load_file + device_put`: every tensor read whole into host memory (as
  `safetensors.numpy.load_file` does), converted, then `jax.device_put` with its sharding.

On simulated CPU devices the device buffers are themselves host memory, so after any load the
process holds ~1x the checkpoint. What differs is the *transient*: anonymous memory above
(baseline + the parameters the devices finally hold). On a host with real accelerators that
transient is the host memory the load needs. A parent process samples the child's RssAnon and
RssFile (memory-mapped file pages: page cache, shared and reclaimable) every millisecond from
/proc; VmHWM is the kernel's exact peak of the sum.

Each method runs twice: with glibc's default malloc, which after freeing a large block raises
its mmap threshold (up to 32 MiB) and then keeps freed heap memory in the process (so RSS
counts it), and with MALLOC_MMAP_THRESHOLD_=1 MiB, where every large buffer is its own
mapping, returned to the kernel when freed: closer to the memory the loader really holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("meshwright", "make_array_from_callback", "load_file + device_put")
ALLOCATORS = {"glibc default": {}, "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
# Llama-style, ~1.07 GB in float32: 3 layers, d_model 2048, GQA 16/4 heads, vocab 32000.
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 3, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
             "tie_word_embeddings": False, "dtype": "float32"}
MiB = 2 ** 20


def write_checkpoint(directory: Path, n_files: int = 4) -> int:
    """Random weights in Hugging Face's Llama layout, sharded over n_files; returns bytes."""
    from safetensors.numpy import save_file

    c = HF_CONFIG
    E, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = E // c["num_attention_heads"]
    KD = c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, E), "model.norm.weight": (E,),
              "lm_head.weight": (V, E)}
    for i in range(c["num_hidden_layers"]):
        at = f"model.layers.{i}."
        shapes |= {at + "input_layernorm.weight": (E,),
                   at + "post_attention_layernorm.weight": (E,),
                   at + "self_attn.q_proj.weight": (E, E), at + "self_attn.k_proj.weight": (KD, E),
                   at + "self_attn.v_proj.weight": (KD, E), at + "self_attn.o_proj.weight": (E, E),
                   at + "mlp.gate_proj.weight": (F, E), at + "mlp.up_proj.weight": (F, E),
                   at + "mlp.down_proj.weight": (E, F)}
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    rng = np.random.default_rng(0)
    files, weight_map, current, size = [], {}, {}, 0

    def flush():
        nonlocal current, size
        name = f"model-{len(files) + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(current, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in current})
        files.append(name)
        current, size = {}, 0

    for key, shape in shapes.items():
        current[key] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        size += current[key].nbytes
        if size >= total / n_files and len(files) < n_files - 1:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return total


def _status(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def child(method: str, directory: str) -> None:
    """One load in this process; prints a JSON line with its memory and time."""
    import jax
    from meshwright.models import from_pretrained, param_shapes, split_largest_axis
    from meshwright.models.checkpoint_io import full_index, normalize_index
    from meshwright.models.hf import _lazy_params

    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings_fn = split_largest_axis(mesh)
    jax.block_until_ready(jax.device_put(np.zeros(8), shardings_fn("x", np.zeros(8))))
    base = _status()
    t0 = time.perf_counter()
    if method == "meshwright":
        _, params = from_pretrained(directory, mesh=mesh, shardings=shardings_fn)
        leaves = jax.tree.leaves(params)
    else:
        config, lazy = _lazy_params(directory, None, None, False)
        paths = jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]
        shardings = [shardings_fn("/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                           for k in p), s) for p, s in paths]
        lazy_leaves = jax.tree.leaves(lazy)
        if method == "make_array_from_callback":
            leaves = [jax.make_array_from_callback(
                tuple(leaf.shape), sharding,
                lambda index, leaf=leaf: leaf.read(normalize_index(index, tuple(leaf.shape))))
                for leaf, sharding in zip(lazy_leaves, shardings, strict=True)]
        else:  # every tensor on the host first, then onto the devices
            host = [leaf.read(full_index(tuple(leaf.shape))) for leaf in lazy_leaves]
            leaves = [jax.device_put(x, s) for x, s in zip(host, shardings, strict=True)]
            jax.block_until_ready(leaves)
            del host
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    device_bytes = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    print(json.dumps({"seconds": seconds, "device_bytes": device_bytes, "base": base,
                      "final": _status()}), flush=True)


def measure(method: str, directory: Path, allocator: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", **ALLOCATORS[allocator])
    proc = subprocess.Popen([sys.executable, __file__, "--child", method, str(directory)],
                            stdout=subprocess.PIPE, env=env, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        try:
            now = _status(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = {k: max(v, now.get(k, 0)) for k, v in peak.items()}
        time.sleep(0.001)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{method}: child failed with code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    base, final = result["base"]["RssAnon"], result["final"]["RssAnon"]
    return {"method": method, "allocator": allocator, "seconds": result["seconds"],
            "device_bytes": result["device_bytes"],
            "peak_anon_above_baseline": peak["RssAnon"] - base,
            "transient_anon": peak["RssAnon"] - base - result["device_bytes"],
            "final_anon_above_baseline": final - base,
            "peak_file_pages": peak["RssFile"], "vmhwm": result["final"]["VmHWM"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "checkpoint_load_memory.json"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="mw-ckpt-") as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        total = write_checkpoint(directory)
        print(f"wrote a {total / MiB:.0f} MiB Llama-style checkpoint "
              f"({len(list(directory.glob('*.safetensors')))} files) in "
              f"{time.perf_counter() - t0:.1f} s")
        rows = [measure(method, directory, allocator) for allocator in ALLOCATORS
                for method in METHODS]
    largest = 32000 * 2048 * 4  # embed_tokens / lm_head
    print(f"\ncheckpoint {total / MiB:.0f} MiB, largest tensor {largest / MiB:.0f} MiB, "
          f"split 8 ways (block {largest / 8 / MiB:.0f} MiB); memory in MiB\n")
    header = (f"{'method':<26} {'malloc':<20} {'load s':>6} {'on devices':>10} {'peak anon':>9} "
              f"{'transient':>10} {'transient/ckpt':>14} {'file pages':>10} {'VmHWM':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<26} {r['allocator']:<20} {r['seconds']:>6.2f} "
              f"{r['device_bytes'] / MiB:>10.0f} "
              f"{r['peak_anon_above_baseline'] / MiB:>9.0f} {r['transient_anon'] / MiB:>10.0f} "
              f"{r['transient_anon'] / total:>14.2f} {r['peak_file_pages'] / MiB:>10.0f} "
              f"{r['vmhwm'] / MiB:>7.0f}")
    record = {"command": "python benchmarks/checkpoint_load_memory.py",
              "checkpoint_bytes": total, "largest_tensor_bytes": largest, "devices": 8,
              "config": HF_CONFIG, "machine": platform.platform(),
              "cpus": os.cpu_count(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
