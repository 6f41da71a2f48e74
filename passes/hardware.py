"""Hardware profiles: the numbers the analytical cost model needs about one kind of chip.

A profile is a frozen dataclass. Every field has a comment saying where its value comes from:
a vendor datasheet, the Pope et al. paper ("Efficiently Scaling Transformer Inference", MLSys
2023), a measurement (`meshwright calibrate`), or a fit to the paper's Table 2 (only the
"honest overhead" fields: achievable fractions of peak, collective latency, fixed step cost).

    >>> from meshwright.passes.hardware import get_hardware
    >>> hw = get_hardware("tpu-v4")
    >>> hw.peak_flops_bf16 / 1e12, hw.ici_bandwidth / 1e9, hw.topology
    (275.0, 270.0, 'torus3d')
    >>> h100 = get_hardware("h100")  # 8 GPUs per node, InfiniBand between nodes
    >>> h100.max_chips, h100.dcn_bandwidth / 1e9, h100.max_nodes
    (8, 50.0, 128)

The CPU profile (`cpu`) is read from the file `meshwright calibrate` saves
(`$MESHWRIGHT_CACHE/cpu.json`, default `~/.cache/meshwright/cpu.json`) when it exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Topology = Literal["torus3d", "torus2d", "switch"]

GiB = 1024**3


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator chip and the network between chips, as the cost model sees it.

    Rates are per chip. "Achievable" fractions turn datasheet peaks into what real kernels
    reach; they are the only fields tuned against measurements.
    """

    name: str
    peak_flops_bf16: float  # dense bf16 matmul FLOP/s per chip (datasheet)
    peak_flops_int8: float  # dense int8 matmul OP/s per chip (datasheet; == bf16 where no gain)
    peak_flops_fp32: float  # fp32 matmul FLOP/s per chip (datasheet or emulation cost)
    hbm_bytes: float  # memory per chip, bytes (datasheet)
    hbm_bandwidth: float  # memory bandwidth per chip, bytes/s (datasheet)
    ici_bandwidth: float  # chip-to-chip bandwidth per chip, all links, one direction, bytes/s
    topology: Topology  # how chips are wired: a 3D / 2D torus, or a switch (NVLink, host)
    matmul_efficiency: float  # achievable fraction of peak for large matmuls
    hbm_efficiency: float  # achievable fraction of HBM bandwidth for streaming weights / KV
    ici_efficiency: float  # achievable fraction of ici_bandwidth in ring collectives
    compute_memory_overlap: float  # fraction of the shorter of (matmuls, HBM streaming) hidden
    collective_latency_s: float  # fixed cost of launching and synchronising one collective
    collective_step_latency_s: float  # latency of one neighbour exchange (ring step) of a collective
    step_overhead_s: float  # fixed cost per forward step (dispatch, sampling, host sync)
    max_chips: int  # chips in one slice / node that the interconnect above connects
    source: str = ""  # one line: where the numbers come from
    # ---- The network between nodes (GPU servers) or slices (TPU Multislice). `max_chips`
    # above is the limit of one node / slice; a job spans up to `max_nodes` equal ones, and
    # a byte to a chip of another node crosses this slower network. max_nodes 1: none.
    max_nodes: int = 1  # nodes / slices one job can span
    dcn_bandwidth: float = 0.0  # per chip, one direction, bytes/s, to chips of other nodes
    dcn_efficiency: float = 1.0  # achievable fraction of dcn_bandwidth in collectives
    dcn_latency_s: float = 0.0  # one exchange between nodes (a ring step across nodes)
    dcn_name: str = ""  # what that network is, for explain() ("InfiniBand NDR", "DCN")
    # While a job spans several nodes, a collective inside a node may cost otherwise than in
    # a job of one node. XLA on CPU in a job over processes runs every collective through
    # gloo over TCP, those among one process's devices too: each then costs a fixed
    # `multinode_collective_s` (its launch and exchanges; 0: as in one node) and moves its
    # bytes at `multinode_bandwidth` per device (0: ici_bandwidth). NCCL and ICI keep their
    # in-node links: both 0 for the GPU and TPU profiles. See cost_model.issued_latency.
    multinode_collective_s: float = 0.0
    multinode_bandwidth: float = 0.0
    # Fraction of a looped collective einsum's transfers that can run while its matmuls do
    # (collective-einsum's cost model). 0 unless a profile says so: a calibrated CPU profile
    # saved before this field existed must not claim overlap.
    collective_matmul_overlap: float = 0.0
    # The chip counts one slice comes in, smallest first (vendor docs); empty: any count up to
    # max_chips. Checked where a user names chips for this hardware (`meshwright plan`).
    slice_chips: tuple[int, ...] = ()

    def peak_flops(self, weights: str) -> float:
        """Matmul peak for a weight format: int8 weights are dequantised, matmuls stay bf16."""
        return self.peak_flops_fp32 if weights == "fp32" else self.peak_flops_bf16

    @property
    def spans_nodes(self) -> bool:
        """Whether a job may span several nodes / slices of this hardware."""
        return self.max_nodes > 1 and self.dcn_bandwidth > 0

    def in_multinode_job(self) -> HardwareProfile:
        """The profile a job over several nodes sees inside a node: `ici_bandwidth` at
        `multinode_bandwidth` where that is set (the cost model reads it for one node's part
        of every collective; `multinode_collective_s` prices their latency).

            >>> CPU_DEFAULT.in_multinode_job().ici_bandwidth / 1e6
            50.0
            >>> get_hardware("h100").in_multinode_job() == get_hardware("h100")
            True
        """
        if not self.multinode_bandwidth:
            return self
        return self.replace(ici_bandwidth=self.multinode_bandwidth, ici_efficiency=1.0)

    @property
    def torus_dims(self) -> int:
        """Dimensions of the torus (0 for a switch)."""
        return {"torus3d": 3, "torus2d": 2}.get(self.topology, 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        if "slice_chips" in fields:  # a JSON list
            fields["slice_chips"] = tuple(fields["slice_chips"])
        return cls(**fields)

    def replace(self, **changes) -> HardwareProfile:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Profiles. Datasheet numbers are as published; the efficiency / latency / overhead fields of
# tpu-v4 are fitted to the four columns of the paper's Table 2 (see docs/cost_model.md); the
# other accelerators reuse the same kind of values, marked "assumed", until someone calibrates.

TPU_V4 = HardwareProfile(
    name="tpu-v4",
    # 275 TFLOP/s bf16 and 275 TOP/s int8 (Google Cloud TPU v4 docs; Pope et al. Sec. 4).
    peak_flops_bf16=275e12,
    peak_flops_int8=275e12,
    # fp32 matmuls run as 6 bf16 passes at precision=HIGHEST.
    peak_flops_fp32=275e12 / 6,
    hbm_bytes=32 * GiB,  # 32 GiB HBM2 (Google Cloud TPU v4 docs)
    hbm_bandwidth=1.2e12,  # 1.2 TB/s (Pope et al. Sec. 4; Cloud docs: 1200 GBps)
    ici_bandwidth=270e9,  # 6 ICI links x 45 GB/s (Pope et al. Sec. 4)
    topology="torus3d",
    # Fitted (Table 2, col. 3): the large prefill reaches 76% MFU while also computing padded
    # heads and attention; big bf16 matmuls on the MXUs run at ~3/4 of peak.
    matmul_efficiency=0.75,
    # Fitted: int8 vs bf16 weights at decode batch 64 (28.5 vs 36.9 ms/token, Sec. 5) differ
    # by half the weight bytes: 7.1 ms of ideal load took 8.4 ms -> ~0.85 of 1.2 TB/s.
    hbm_efficiency=0.85,
    # Fitted (cols. 1 and 4, 2D weight-stationary): the paper's formulas let a collective use
    # all 6 links, but a collective over one or two torus axes has only 2 or 4 of them (1/3 to
    # 2/3 of 270 GB/s) and a ring reaches ~80% of link speed: ~0.4 of 270 GB/s.
    ici_efficiency=0.4,
    # Fitted: a matmul streaming its weights from HBM hides only part of the shorter of the
    # two (pipeline fill/drain per weight tile, non-matmul ops between): a quarter.
    compute_memory_overlap=0.25,
    # Assumed: a few microseconds to launch and synchronise one collective.
    collective_latency_s=5e-6,
    # Fitted (col. 2: decode at batch 64 is ~3x its weight-load time): ~2 us per ring step
    # (one hop and one DMA handshake); a collective over mesh axes of sizes a_i takes
    # sum(a_i - 1) steps, so 1D and 2D layouts pay the same number of steps per layer.
    collective_step_latency_s=2e-6,
    # Assumed: host dispatch, sampling and synchronisation, once per step.
    step_overhead_s=1e-3,
    max_chips=4096,  # a TPU v4 pod (Cloud docs)
    # Cloud TPU v4 topologies: 2x2x1, 2x2x2, 2x2x4, 2x4x4, then AxBxC with A, B, C multiples
    # of 4 up to 16x16x16 (4x4x4 = 64 chips, 4x4x8, ...)
    slice_chips=(4, 8, 16, 32, *sorted({64 * a * b * c for a in range(1, 5)
                                        for b in range(1, 5) for c in range(1, 5)})),
    # Assumed: ICI transfers are DMAs that run beside the MXUs (Wang et al., ASPLOS 2023,
    # overlap them fully with looped einsums on TPU v4).
    collective_matmul_overlap=1.0,
    # Between slices (Multislice): chips send through their hosts' NICs over the data-centre
    # network. Cloud docs publish no per-host NIC figure for v4: assumed the v5e's share,
    # 25 Gb/s per chip; latency assumed (a host round trip). Slices: no published limit on
    # how many one job spans; 64 assumed as the planner's bound.
    max_nodes=64,
    dcn_bandwidth=3.125e9,
    dcn_efficiency=0.8,  # assumed
    dcn_latency_s=25e-6,  # assumed
    dcn_name="DCN (Multislice)",
    source="Pope et al. 2023 Sec. 4; Google Cloud TPU v4 docs; overheads fitted to Table 2; "
           "DCN assumed like tpu-v5e",
)

TPU_V5E = HardwareProfile(
    name="tpu-v5e",
    peak_flops_bf16=197e12,  # Cloud TPU v5e docs: 197 TFLOP/s bf16
    peak_flops_int8=394e12,  # Cloud TPU v5e docs: 394 TOP/s int8
    peak_flops_fp32=197e12 / 6,  # fp32 as 6 bf16 passes
    hbm_bytes=16 * GiB,  # 16 GiB HBM2
    hbm_bandwidth=819e9,  # 819 GB/s
    ici_bandwidth=200e9,  # 1600 Gbps ICI per chip (4 links)
    topology="torus2d",
    matmul_efficiency=0.80,  # assumed like tpu-v4
    hbm_efficiency=0.85,  # assumed like tpu-v4
    ici_efficiency=0.5,  # assumed like tpu-v4
    compute_memory_overlap=0.5,  # assumed like tpu-v4
    collective_latency_s=2e-6,  # assumed like tpu-v4
    collective_step_latency_s=3e-6,  # assumed like tpu-v4
    step_overhead_s=1e-3,  # assumed like tpu-v4
    max_chips=256,  # a v5e pod slice is at most 16 x 16
    slice_chips=(1, 4, 8, 16, 32, 64, 128, 256),  # Cloud TPU v5e: v5litepod-1 ... -256
    collective_matmul_overlap=1.0,  # assumed like tpu-v4
    # Between slices (Multislice): Cloud TPU v5e docs: 2 x 100 Gbps NICs per 8-chip host, and
    # 6.4 Tbps of data-centre network per 256-chip pod: 25 Gb/s = 3.125 GB/s per chip.
    max_nodes=64,  # assumed: no published limit on slices per Multislice job
    dcn_bandwidth=3.125e9,
    dcn_efficiency=0.8,  # assumed
    dcn_latency_s=25e-6,  # assumed: chips reach the DCN through their host
    dcn_name="DCN (Multislice)",
    source="Google Cloud TPU v5e docs; overheads and DCN efficiency/latency assumed",
)

H100 = HardwareProfile(
    name="h100",
    peak_flops_bf16=989e12,  # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16
    peak_flops_int8=1979e12,  # 1979 TOP/s dense int8
    peak_flops_fp32=67e12,  # 67 TFLOP/s fp32 without TF32 (TF32 tensor cores: 495)
    hbm_bytes=80e9,  # 80 GB HBM3
    hbm_bandwidth=3.35e12,  # 3.35 TB/s
    ici_bandwidth=450e9,  # NVLink 4: 900 GB/s bidirectional -> 450 GB/s each way
    topology="switch",  # NVSwitch: every pair at full bandwidth
    matmul_efficiency=0.70,  # assumed: large bf16 GEMMs reach ~70% of dense peak
    hbm_efficiency=0.80,  # assumed: streaming kernels reach ~80% of HBM bandwidth
    ici_efficiency=0.80,  # assumed: NCCL ring bus bandwidth ~80% of NVLink
    compute_memory_overlap=0.5,  # assumed like tpu-v4
    collective_latency_s=5e-6,  # assumed: NCCL launch + sync
    collective_step_latency_s=2e-6,  # assumed: one NVLink step
    step_overhead_s=1e-3,  # assumed: kernel launches / host sync per step
    max_chips=8,  # one HGX node; beyond it the network is InfiniBand (below)
    collective_matmul_overlap=0.8,  # assumed: NCCL's copy kernels take some of the SMs
    # Between nodes: DGX H100/H200 (NVIDIA DGX BasePOD reference architecture) has eight
    # single-port ConnectX-7 for the compute fabric, one per GPU, up to 400 Gb/s InfiniBand
    # NDR: 50 GB/s per GPU each way. The NVIDIA HGX AI Factory reference architecture
    # (2-8-9-400: 400 Gb/s per GPU) is designed at 32, 64 and 128 nodes: 128 the bound.
    max_nodes=128,
    dcn_bandwidth=50e9,
    dcn_efficiency=0.8,  # assumed, as NVLink: NCCL bus bandwidth ~80% of the wire
    dcn_latency_s=10e-6,  # assumed: an RDMA exchange through NCCL's proxy, per ring step
    dcn_name="InfiniBand NDR",
    source="NVIDIA H100 SXM datasheet; DGX BasePOD reference architecture; overheads "
           "assumed",
)

H200 = H100.replace(
    name="h200",
    hbm_bytes=141e9,  # NVIDIA H200 SXM datasheet: 141 GB HBM3e
    hbm_bandwidth=4.8e12,  # 4.8 TB/s; compute and NVLink as H100
    source="NVIDIA H200 SXM datasheet; compute, NVLink and InfiniBand as H100 (DGX H200); "
           "overheads assumed",
)

A100 = HardwareProfile(
    name="a100",
    peak_flops_bf16=312e12,  # NVIDIA A100 SXM datasheet: 312 TFLOP/s dense bf16
    peak_flops_int8=624e12,  # 624 TOP/s dense int8
    peak_flops_fp32=19.5e12,  # 19.5 TFLOP/s fp32 without TF32 (TF32: 156)
    hbm_bytes=80e9,  # 80 GB HBM2e
    hbm_bandwidth=2.039e12,  # 2.039 TB/s
    ici_bandwidth=300e9,  # NVLink 3: 600 GB/s bidirectional -> 300 GB/s each way
    topology="switch",
    matmul_efficiency=0.70,  # assumed, as h100
    hbm_efficiency=0.80,  # assumed, as h100
    ici_efficiency=0.80,  # assumed, as h100
    compute_memory_overlap=0.5,  # assumed, as h100
    collective_latency_s=5e-6,  # assumed, as h100
    collective_step_latency_s=2e-6,  # assumed, as h100
    step_overhead_s=1e-3,  # assumed, as h100
    max_chips=8,  # one HGX node
    collective_matmul_overlap=0.8,  # assumed, as h100
    # Between nodes: DGX A100 has eight single-port ConnectX-6 for the compute fabric, one
    # per GPU, 200 Gb/s InfiniBand HDR: 25 GB/s per GPU each way (DGX A100 user guide). The
    # DGX SuperPOD reference architecture for A100 spans 140 nodes.
    max_nodes=140,
    dcn_bandwidth=25e9,
    dcn_efficiency=0.8,  # assumed, as h100
    dcn_latency_s=10e-6,  # assumed, as h100
    dcn_name="InfiniBand HDR",
    source="NVIDIA A100 SXM 80GB datasheet; DGX A100 user guide; overheads assumed",
)

# Conservative defaults for this machine's simulated devices (8 XLA host devices sharing the
# CPU), used until `meshwright calibrate` saves a measured profile. Deliberately low, so plans
# made before calibrating do not promise more than a 2-core laptop-class machine delivers.
CPU_DEFAULT = HardwareProfile(
    name="cpu",
    peak_flops_bf16=5e9,  # per simulated device: ~40 GFLOP/s f32 shared by 8 devices
    peak_flops_int8=5e9,
    peak_flops_fp32=5e9,
    hbm_bytes=2 * GiB,  # a share of host RAM per simulated device
    hbm_bandwidth=1e9,  # per device: ~8 GB/s of DRAM bandwidth shared by 8
    ici_bandwidth=1e9,  # "collectives" are memory copies between devices in one process
    topology="switch",
    matmul_efficiency=1.0,  # measured rates already are achievable rates
    hbm_efficiency=1.0,
    ici_efficiency=1.0,
    compute_memory_overlap=0.0,  # one thread pool does both
    collective_latency_s=50e-6,  # a host collective is a thread rendezvous
    collective_step_latency_s=0.0,  # not a ring: one rendezvous per collective
    step_overhead_s=1e-3,  # jit dispatch
    max_chips=8,
    # The simulated devices' "transfers" are memory copies by the same threads that run the
    # matmuls: nothing overlaps (the benchmark benchmarks/collective_einsum.py agrees).
    collective_matmul_overlap=0.0,
    # Between processes (`meshwright launch`, or hosts): gloo over TCP. From
    # benchmarks/distributed.py on this 2-core machine (docs/distributed.md): the same programs
    # over 2 processes x 4 devices cost 3-9 ms more per collective than in one process, and
    # the layout moving 1.8 MB more per device ~36 ms more (~50 MB/s). Rough, under load.
    max_nodes=16,  # assumed: processes on one machine or a few hosts
    dcn_bandwidth=50e6,
    dcn_efficiency=1.0,  # a measured rate
    dcn_latency_s=3e-3,
    dcn_name="gloo over TCP",
    # In a job over processes every collective is a gloo exchange, those among one process's
    # devices too: on this 2-core machine at load 5-17 an all-gather over a process's 4
    # devices took 3-4 ms (`meshwright calibrate` under `meshwright launch` measures it), and
    # decode steps over 2 processes x 4 spent 2-3 ms per collective, whatever its group.
    multinode_collective_s=3e-3,
    multinode_bandwidth=50e6,  # as dcn_bandwidth: TCP on loopback either way
    source="conservative defaults; run `meshwright calibrate` to measure this machine",
)

HARDWARE: dict[str, HardwareProfile] = {
    p.name: p for p in (TPU_V4, TPU_V5E, H100, H200, A100, CPU_DEFAULT)
}


def cache_dir() -> Path:
    """Where calibrated profiles live: `$MESHWRIGHT_CACHE`, else `~/.cache/meshwright`."""
    env = os.environ.get("MESHWRIGHT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshwright"


def calibrated_profile_path(name: str = "cpu") -> Path:
    return cache_dir() / f"{name}.json"


# What `meshwright calibrate` does not measure: a profile saved without these fields (or
# before they existed) takes them from the defaults.
_NETWORK_FIELDS = ("max_nodes", "dcn_bandwidth", "dcn_efficiency", "dcn_latency_s", "dcn_name",
                   "multinode_collective_s", "multinode_bandwidth")


def load_calibrated(name: str = "cpu") -> HardwareProfile | None:
    """The profile saved by `meshwright calibrate`, or None if there is none (or it is bad)."""
    path = calibrated_profile_path(name)
    try:
        data = dict(json.loads(path.read_text()))
        return saved_profile(dict(data.get("profile", data)))
    except (OSError, ValueError, TypeError):
        return None


def saved_profile(data: dict) -> HardwareProfile:
    """A profile from its saved dict; a `cpu` one saved without the network fields (or
    before one existed) takes those from the defaults."""
    if data.get("name") == "cpu":
        data = {**{f: getattr(CPU_DEFAULT, f) for f in _NETWORK_FIELDS}, **data}
    return HardwareProfile.from_dict(data)


def get_hardware(name: str | HardwareProfile) -> HardwareProfile:
    """The profile called `name` (`cpu` prefers a calibrated file); unknown names list the known.

        >>> get_hardware("h100").hbm_bytes / 1e9
        80.0
    """
    if isinstance(name, HardwareProfile):
        return name
    if name == "cpu":
        return load_calibrated("cpu") or CPU_DEFAULT
    try:
        return HARDWARE[name]
    except KeyError:
        close = difflib.get_close_matches(name, HARDWARE, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown hardware {name!r}.{hint} "
                       f"Known hardware: {', '.join(sorted(HARDWARE))}") from None
