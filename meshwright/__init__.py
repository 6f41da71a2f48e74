"""meshwright: shard Transformer inference across device meshes, on JAX.

    >>> import meshwright as mw
    >>> g = mw.trace(fn, *example_args)     # a dataflow graph of fn; g(*args) == fn(*args)
"""

__version__ = "0.1.0"

from meshwright import ir, models  # noqa: E402
from meshwright.api import trace, trace_model  # noqa: E402

__all__ = ["__version__", "ir", "models", "trace", "trace_model"]
