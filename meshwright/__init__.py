"""meshwright: shard Transformer inference across device meshes, on JAX."""

__version__ = "0.1.0"
