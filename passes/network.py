"""Collectives and transfers on a two-level network: fast inside a node, slow between nodes.

Chips inside one node (a GPU server, a TPU slice) talk over the fast interconnect the
cost model always priced (`ici_bandwidth`: NVLink, ICI); chips of different nodes talk over
the profile's slower network (`dcn_bandwidth` per chip: InfiniBand, the data-centre network,
TCP between processes). A mesh axis may cross nodes: `Mesh.slow` says over how many nodes
each axis runs, its outer factor, as `jax.experimental.mesh_utils.create_hybrid_device_mesh`
lays the devices out (DCN axes outside the ICI axes).

A collective over a group of K = k_fast * k_slow chips (k_slow nodes, k_fast chips of the
group in each) is done hierarchically, as NCCL and XLA do across nodes, so that the fewest
bytes cross the slow network:

- all-gather (output D per chip): first across nodes, each chip gathering the k_slow pieces
  of its own position (D/k_fast after it), then inside the node:
      T = D/k_fast * (k_slow-1)/k_slow / dcn_bw  +  fast(D over k_fast)
- reduce-scatter (input D per chip): the mirror image, inside the node first (to D/k_fast),
  then across nodes: the same T.
- all-to-all (D held per chip): a chip's data for the (k_slow-1)/k_slow of the group in other
  nodes leaves through its own share of the node's network; the rest moves inside the node:
      T = D * (k_slow-1)/k_slow / dcn_bw  +  fast(all-to-all of D/k_slow over k_fast)
- latency: the fast collective's launch and ring steps, plus `dcn_latency_s` for each of the
  (k_slow - 1) ring steps across nodes.

`fast(...)` is the single-level formula of `cost_model.collective_seconds`; with
`ring_correction=False` the (k-1)/k factors are dropped as there. A point-to-point transfer
between nodes (pipeline stages) sends its bytes through every chip's share of the network.

    >>> from meshwright.passes.hardware import get_hardware
    >>> h100 = get_hardware("h100")
    >>> slow = transfer_seconds(64 * 16384 * 2, senders=8, hw=h100)  # 2 MiB of activations
    >>> round(slow * 1e6, 1)  # us: 2 MiB over 8 x 50 GB/s at 80%, plus 10 us
    16.6
"""

from __future__ import annotations

from dataclasses import dataclass

from meshwright.passes.hardware import HardwareProfile


@dataclass(frozen=True)
class CollectiveTime:
    """How long one collective takes, split by network."""

    fast_s: float  # bandwidth time inside nodes
    slow_s: float  # bandwidth time across nodes
    latency_s: float  # launch and ring steps inside nodes
    slow_latency_s: float  # ring steps across nodes

    @property
    def bandwidth_s(self) -> float:
        return self.fast_s + self.slow_s

    @property
    def total_latency_s(self) -> float:
        return self.latency_s + self.slow_latency_s

    @property
    def slow_network_s(self) -> float:
        """Everything spent on the slow network: its bandwidth time and its ring steps."""
        return self.slow_s + self.slow_latency_s


def slow_bandwidth(hw: HardwareProfile) -> float:
    """Achievable bytes/s per chip across nodes."""
    if hw.dcn_bandwidth <= 0:
        raise ValueError(f"{hw.name} has no network between nodes (dcn_bandwidth is 0); "
                         "plan one node")
    return hw.dcn_bandwidth * hw.dcn_efficiency


def two_level_collective(kind: str, bytes_per_chip: float, k_fast: int, k_slow: int,
                         fast_time, hw: HardwareProfile, ring_correction: bool = True,
                         ) -> tuple[float, float, float]:
    """(fast bandwidth time, slow bandwidth time, slow latency) of one hierarchical collective.

    `fast_time(kind, bytes_per_chip)` prices the part inside the node over k_fast chips (the
    single-level model); it returns (bandwidth time, latency)."""
    ring = (k_slow - 1) / k_slow if ring_correction else 1.0
    bw = slow_bandwidth(hw)
    if kind == "all-to-all":
        slow_s = bytes_per_chip * ring / bw
        fast_s = fast_time(kind, bytes_per_chip / k_slow)[0] if k_fast > 1 else 0.0
    else:  # all-gather, reduce-scatter: the slow leg carries one node-share of the data
        slow_s = bytes_per_chip / k_fast * ring / bw
        fast_s = fast_time(kind, bytes_per_chip)[0] if k_fast > 1 else 0.0
    return fast_s, slow_s, hw.dcn_latency_s * (k_slow - 1)


def transfer_seconds(total_bytes: float, senders: int, hw: HardwareProfile) -> float:
    """One point-to-point transfer of `total_bytes` from a node to the next, split over
    `senders` chips that each send their share through their own share of the network."""
    return total_bytes / senders / slow_bandwidth(hw) + hw.dcn_latency_s
