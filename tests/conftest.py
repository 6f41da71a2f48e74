"""Test set-up shared by every test module.

A simulated 8-device CPU mesh for the whole session (XLA reads the flag when jax first
initialises, so it is set here, before any test imports jax), and a persistent compilation
cache so repeated runs of the suite compile less.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax

_cache = os.environ.get("MESHWRIGHT_TEST_CACHE",
                        os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The slowest test files first (seconds on a cold cache, 2 cores, summed from --durations=0;
# 1,033 s of tests in all, 545 s on two workers in this order, 609 s in xdist's): with two
# workers that each take whole files (--dist loadfile, --no-loadscope-reorder in pyproject), a
# long file taken last leaves one worker running alone at the end. xdist hands each worker two
# files to start with, so the docs runner (first) and the server tests (third) run one after
# the other in one worker, never at once: with a warm cache, the docs' 8-device programs have
# died in XLA's CPU all-gather (a rendezvous timeout) while the three servers compiled. The
# rest keep their order.
SLOW_FILES_FIRST = (
    "test_docs.py",  # ~110 s: every block of README and docs/ in one subprocess
    "test_ir.py",  # ~110 s: many models traced and round-tripped
    "test_server.py",  # ~95 s: three live servers
    "test_distributed.py",  # ~90 s: 2x4 and 4x2 process jobs
    "test_lower.py",  # ~110 s
    "test_served_models.py",
    "test_runtime_engine.py",
    "test_collective_einsum.py",
    "test_export.py",
    "test_property_sweep.py",
    "test_hf_checkpoints.py",
    "test_runtime_layouts.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (a stable sort)
