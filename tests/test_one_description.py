"""One description of each thing (docs/overview.md): the mesh (`passes/mesh.py`), the KV cache
(`models/cache.py`), a step's workload against a served one. Plain data: no compiles."""

import jax
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.models.cache import CacheAxes, KVCacheShape
from meshwright.passes.mesh import Mesh, factorizations, node_factors

from meshwright.validate import InvalidArgument


@pytest.mark.parametrize("spelling", ["2x4", "2x4x1", {"x": 2, "y": 4}, (2, 4), [2, 4, 1],
                                      Mesh(2, 4, 1)])
def test_every_spelling_of_a_mesh_parses_to_one_mesh(spelling):
    m = Mesh.parse(spelling)
    assert m == Mesh(2, 4, 1)
    assert (m.shape, m.sizes, m.text, m.n) == ((2, 4, 1), {"x": 2, "y": 4, "z": 1}, "2x4x1", 8)
    assert Mesh.parse(m.text) == Mesh.parse(m.sizes) == Mesh.parse(m.shape) == m


@pytest.mark.parametrize("bad", ["2x0", {"w": 2}, (1, 2, 3, 4), "two"])
def test_a_bad_mesh_is_one_clear_error(bad):
    with pytest.raises(InvalidArgument, match="mesh"):
        Mesh.parse(bad)


def test_a_jax_mesh_converts_both_ways():
    m = Mesh(2, 1, 4)  # conftest simulates 8 devices
    jmesh = m.jax(jax.devices())
    assert dict(jmesh.shape) == m.sizes
    assert tuple(jmesh.axis_names) == ("x", "y", "z")
    assert Mesh.of_jax(jmesh) == Mesh.parse(jmesh) == m


def test_shard_counts_local_shapes_and_nodes():
    from meshwright.passes.sharding import MeshInfo, Spec

    m = Mesh(4, 2, 2, slow=(2, 1, 1))
    assert (m.count(("x", "y")), m.size("xy"), m.slow_size("xz")) == (8, 8, 2)
    assert m.local_shape((8, 12), Spec((("x",), ("y", "z")))) == (2, 3)
    assert (m.fits(6, ("y",)), m.fits(6, ("x",))) == (True, False)
    assert (m.nodes, m.chips_per_node, str(m), m.text) == (2, 8, "[2*2]x2x2", "4x2x2")
    assert Mesh(4, 2, 2).over_nodes(2) == m
    assert node_factors((1, 2, 4), 4) == (1, 2, 2)
    with pytest.raises(ValueError, match="does not split over 3 nodes"):
        Mesh(2, 2, 2).over_nodes(3)
    # the lowering's MeshInfo is the same description, built from its sizes
    info = MeshInfo({"x": 2, "y": 2, "z": 2})
    assert isinstance(info, Mesh) and info.shape == (2, 2, 2) and info.sizes["y"] == 2


def test_the_cost_model_prices_on_the_same_mesh():
    from meshwright.passes import cost_model

    assert cost_model.Mesh is Mesh and cost_model.factorizations is factorizations
    assert [m.text for m in factorizations(4)] == ["1x1x4", "1x2x2", "1x4x1", "2x1x2",
                                                   "2x2x1", "4x1x1"]


@pytest.mark.parametrize("name,scan", [("llama-tiny", False), ("palm-tiny", True),
                                       ("gpt2-tiny", False)])
def test_the_kv_cache_description_is_what_the_model_builds(name, scan):
    cfg = get_config(name).replace(scan_layers=scan)
    kv = KVCacheShape.of(cfg)
    model = build(cfg)
    cache = jax.eval_shape(lambda: model.init_cache(3, 16))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), cache) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), kv.shapes(3, 16))
    leaves = jax.tree.leaves(cache)
    want = (cfg.n_layers, 3, cfg.n_kv_heads, 16, cfg.d_head) if scan else \
        (3, cfg.n_kv_heads, 16, cfg.d_head)
    assert {s.shape for s in leaves} == {want}
    axes = jax.tree.leaves(kv.axes(), is_leaf=lambda a: isinstance(a, CacheAxes))
    assert all(s.shape[a.slot] == 3 and s.shape[a.length] == 16 for s, a in zip(leaves, axes))
    assert model.cache_axes() == kv.axes() and model.kv_cache == kv
    # bytes per token: what the arrays hold, per sequence and position
    per_token = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in leaves) // (3 * 16)
    assert kv.bytes_per_token(np.dtype(cfg.dtype).itemsize) == per_token
    assert cfg.kv_bytes_per_token(2) == kv.bytes_per_token(2)
    assert kv.bytes_per_token(2, kv_heads=1) * cfg.n_kv_heads == kv.bytes_per_token(2)


def test_a_step_workload_and_a_served_workload_are_different_things():
    from meshwright.passes.cost_model import StepWorkload, Workload
    from meshwright.runtime.workload import Workload as Served
    from meshwright.runtime.workload import make_workload

    step = StepWorkload(batch=8, context=128, phase="prefill")
    assert (step.tokens, Workload is StepWorkload) == (8 * 128, True)  # the old name kept
    served = make_workload(3, rate=10.0, vocab_size=16, max_len=32)
    assert isinstance(served, Served) and len(served) == 3 and served.output_tokens > 0
