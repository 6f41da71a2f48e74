"""Meshes over nodes (the processes of a multi-process job): how mw.make_mesh lays the axes
over them, and the clear errors for what cannot be laid out. The multi-process runs are in
test_distributed.py."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest
from meshwright.passes.compiler import node_factors, node_groups

import meshwright as mw


@dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int


def test_outer_axes_take_the_nodes_first():
    assert node_factors((2, 2, 2), 2) == (2, 1, 1)
    assert node_factors((1, 2, 4), 4) == (1, 2, 2)
    assert node_factors((1, 1, 16), 2) == (1, 1, 2)
    assert node_factors((6, 2, 1), 4) == (2, 2, 1)
    with pytest.raises(ValueError, match="2x2x1 mesh does not split over 3 nodes"):
        node_factors((2, 2, 1), 3)


def test_a_mesh_axis_over_nodes_keeps_each_node_whole():
    """x over 2 nodes of 4 devices: x's outer factor is the node, y (and x's inner factor)
    stay inside it, as jax's create_hybrid_device_mesh lays out ICI x DCN axes."""
    devices = jax.devices()[:8]
    mesh = mw.make_mesh({"x": 4, "y": 2}, slow={"x": 2})
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
    assert ids.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    mesh = mw.make_mesh({"x": 2, "y": 4}, slow={"y": 2})
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
    assert ids.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]  # node 0: devices 0-3
    assert set(mesh.devices.flat) == set(devices)


def test_bad_meshes_over_nodes_are_clear_errors():
    with pytest.raises(ValueError, match=r"mesh 3x2x1: axis x=3 cannot run over 2 nodes"):
        mw.make_mesh({"x": 3, "y": 2}, devices=jax.devices()[:6], slow={"x": 2})
    # processes with unequal device counts: named with their counts
    devices = [FakeDevice(0, 0), FakeDevice(1, 0), FakeDevice(2, 0), FakeDevice(3, 1)]
    with pytest.raises(ValueError, match=r"unequal numbers .*\(process 0: 3, process 1: 1\)"):
        node_groups(devices)
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    assert [len(g) for g in node_groups(devices)] == [4, 4]
    with pytest.raises(ValueError, match=r"slow=\{'x': 4, 'y': 1, 'z': 1\} spans 4 nodes; "
                                         r"its devices are on 2 processes"):
        mw.make_mesh({"x": 4, "y": 2}, devices=devices, slow={"x": 4})
