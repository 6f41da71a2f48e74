"""One sharded decode step over every process's devices (docs/distributed.md).

    meshwright launch -n 2 --devices-per-process 4 -- python docs/examples/distributed_step.py

With `--steps N --die-after K`, runs N guarded steps and process 1 kills itself (SIGKILL)
after K of them, to show what the others do.
"""

import argparse
import os
import signal
import time

import meshwright as mw

info = mw.distributed.initialize()  # from the environment `meshwright launch` sets

import jax  # after initialize: it must run before JAX starts its backend
import numpy as np
from meshwright.models import build, get_config

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1)
parser.add_argument("--die-after", type=int, default=None)
args = parser.parse_args()

model = build(get_config("palm-tiny").replace(scan_layers=True))
inputs = model.example_args("decode", batch=8, key=jax.random.PRNGKey(0))  # same everywhere
step = mw.shard(model.decode_step, force={"ffn": "ws-2d", "attention": "batch",
                                          "mesh": (2, 2, 2)})
compiled = step.compiled(*inputs)
for i in range(args.steps):
    if args.die_after is not None and i == args.die_after and info.process_id == 1:
        print(f"process 1: killing myself at step {i}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.perf_counter()
    with mw.distributed.guard(f"decode step {i}"):
        logits, cache = step(*inputs)
        logits = mw.distributed.gather(logits)  # numpy, on every process
    ms = 1e3 * (time.perf_counter() - t0)
    if args.steps > 1:
        print(f"process {info.process_id}: step {i} in {ms:.0f} ms", flush=True)

want = np.asarray(jax.jit(model.decode_step)(*inputs)[0])  # unsharded, on one local device
up = compiled.place(jax.tree.leaves(inputs))[0]  # the first weight, as the program takes it
print(f"process {info.process_id} of {info.num_processes}: {jax.local_device_count()} of "
      f"{jax.device_count()} devices; layout {compiled.ffn_layout}/{compiled.attention_layout} "
      f"on {compiled.mesh_shape}; weight {up.shape} held here as "
      f"{len(up.addressable_shards)} blocks of {up.addressable_shards[0].data.shape}; "
      f"logits {logits.shape}, max |sharded - unsharded| = {np.abs(logits - want).max():.1e}")
mw.distributed.shutdown()
