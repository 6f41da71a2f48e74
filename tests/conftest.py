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
