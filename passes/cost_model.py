"""The analytical cost model of Pope et al., "Efficiently Scaling Transformer Inference".

One forward step of a Transformer on `n = X*Y*Z` chips is costed for a choice of

- FFN layout (Sec. 3.2.1): `ws-1d` (weights E F_xyz), `ws-2d` (E_x F_yz), and the
  weight-gathered `wg-x`, `wg-xy`, `wg-xyz` (weights all-gathered over N = X, XY, XYZ chips,
  activations B_N L E_rest);
- attention layout (Sec. 3.3): `heads` (Q/K/V and the KV cache sharded over heads; with
  multiquery every chip keeps the whole K/V) or `batch` (sharded over sequences, with
  all-to-alls in and out).

Notation follows the paper: B sequences, L tokens per sequence in this step (prefill: the
prompt, decode: 1), S the KV length attended over, E d_model, F d_ff, H heads, K kv heads,
D head dim. Every collective is listed explicitly (kind, mesh axes, bytes per chip), which
gives both its bandwidth time and its count for the latency term; see `layer_collectives`.

Step time = max(compute, weight load + KV load)      # roofline: matmuls overlap HBM streaming
          + exposed communication                     # see CostOptions for what overlaps
          + collective latency + fixed step overhead.

    >>> from meshwright.models.config import get_config
    >>> from meshwright.passes.hardware import get_hardware
    >>> c = evaluate(get_config("palm-540b"), get_hardware("tpu-v4"), Mesh(4, 4, 4),
    ...              StepWorkload(batch=64, context=2048, phase="decode", weights="int8"),
    ...              "ws-2d", "batch")
    >>> round(c.step_s * 1e3)  # ms per decode step; the paper measured 28.5
    29
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from meshwright.models.config import TransformerConfig
from meshwright.passes.hardware import HardwareProfile
from meshwright.passes.layouts import (
    ATTENTION_NAMES,
    FFN_NAMES,
    Collective,
    LayoutNotApplicable,  # noqa: F401 (imported from here by the planner and others)
    attention_layout,
    ffn_layout,
    padded_heads,
)
from meshwright.passes.mesh import Mesh, factorizations  # noqa: F401 (passes/mesh.py)
from meshwright.passes.network import CollectiveTime, two_level_collective

# The layouts are objects in `passes/layouts.py`; these are their names (live: a layout
# registered there is priced from then on), in the planner's tie-break order.
FFN_LAYOUTS = FFN_NAMES
ATTENTION_LAYOUTS = ATTENTION_NAMES
PHASES = ("prefill", "decode")
WEIGHT_BYTES = {"bf16": 2, "int8": 1, "fp32": 4}
# Activations and the KV cache are bf16 with bf16 or int8 weights (int8 is weight-only).
ACTIVATION_BYTES = {"bf16": 2, "int8": 2, "fp32": 4}

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class StepWorkload:
    """What one step does: B sequences, their KV length, the phase and the weight format.

    The workload of one compiled step, as the planner prices it; not a served workload
    (requests arriving over time: `runtime.workload.Workload`). Both are described in
    docs/overview.md, "One description of each thing".
    """

    batch: int
    context: int  # prefill: prompt tokens per sequence; decode: tokens of KV per sequence
    phase: Phase = "decode"
    weights: str = "bf16"  # "bf16" | "int8" (weight-only) | "fp32"

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.context < 1:
            raise ValueError(f"context must be >= 1, got {self.context}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.weights not in WEIGHT_BYTES:
            raise ValueError(
                f"weights must be one of {tuple(WEIGHT_BYTES)}, got {self.weights!r}")

    @property
    def tokens_per_sequence(self) -> int:
        """L: tokens each sequence processes in this step."""
        return self.context if self.phase == "prefill" else 1

    @property
    def tokens(self) -> int:
        """B * L: tokens processed by the step."""
        return self.batch * self.tokens_per_sequence


Workload = StepWorkload  # the old name (tests/test_multinode.py still uses it)


@dataclass(frozen=True)
class CostOptions:
    """Modelling assumptions that are not properties of the chip.

    Overlap: weight all-gathers of the weight-gathered layouts do not depend on activations,
    so they are issued a layer ahead and hidden behind that layer's compute
    (`prefetch_weight_gathers`); what is left over is exposed. Activation collectives sit
    between dependent matmuls; a fraction `activation_comm_overlap` of them is hidden (looped
    CollectiveEinsum). Latency is never hidden.
    """

    activation_comm_overlap: float = 0.0
    prefetch_weight_gathers: bool = True
    # Multiply collective volumes by (K-1)/K (a ring over K chips moves (K-1)/K of the data);
    # False gives the paper's leading-order formulas (e.g. 2D WS: 8BLE/(sqrt(n) bw)).
    ring_correction: bool = True
    # Count attention's QK^T and AV FLOPs in MFU (the paper does not: MFU uses 2N per token).
    attention_flops_in_mfu: bool = False
    # Pad query heads to a multiple of the chips they are split over (whole heads per chip);
    # PaLM 540B's 48 heads become 64 on 64 chips (Pope et al. Sec. 4).
    pad_heads: bool = True
    # Heads layout is refused when padding would more than double the heads.
    max_head_padding: float = 2.0


@dataclass
class CandidateCost:
    """The predicted cost of one (mesh, FFN layout, attention layout) for one step."""

    ffn_layout: str
    attention_layout: str
    mesh: Mesh
    step_s: float  # one forward step
    compute_s: float  # matmul + attention FLOPs at the achievable rate
    weight_load_s: float  # streaming the weights this chip uses from HBM
    kv_load_s: float  # reading (decode) or writing (prefill) this chip's KV cache
    comm_s: float  # exposed communication: bandwidth not hidden + collective latency
    comm_total_s: float  # all communication, hidden or not (bandwidth + latency)
    overhead_s: float  # fixed per-step cost
    weight_bytes_per_chip: float  # resident weights (stored layout E_x F_yz, fully sharded)
    gathered_weight_bytes_per_chip: float  # transient buffer of one gathered layer (WG)
    kv_cache_bytes_per_chip: float
    weight_bytes_read_per_chip: float  # weights streamed per step (weight_load_s's bytes)
    memory_bytes_per_chip: float  # weights + gathered buffer + KV cache
    fits: bool
    max_context: int  # longest KV length that fits the KV budget at this batch and layout
    mfu: float
    model_flops: float  # 2 * n_params * B * L (plus attention if options say so)
    hardware_flops: float  # what the chips actually compute, padded heads included
    cost_per_token: float  # chip-seconds per token
    padded_heads: int
    collectives_per_layer: int
    comm_bytes_per_chip: float  # bytes through each chip's links per step
    bound: str  # "compute" | "memory": which side of the roofline
    notes: list[str] = field(default_factory=list)
    # The part of comm_s spent on the network between nodes (0 inside one node): bandwidth
    # not hidden and the ring steps across nodes of the collectives over axes that cross.
    slow_network_s: float = 0.0
    slow_bytes_per_chip: float = 0.0  # bytes each chip sends across nodes per step

    @property
    def name(self) -> str:
        return f"{self.ffn_layout}/{self.attention_layout} {self.mesh}"

    def breakdown(self) -> dict:
        return {"compute_s": self.compute_s, "weight_load_s": self.weight_load_s,
                "kv_load_s": self.kv_load_s, "comm_s": self.comm_s,
                "slow_network_s": self.slow_network_s}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mesh"] = self.mesh.to_dict()
        return d


# ---------------------------------------------------------------------------------------------
# Layout geometry: each layout's own (`passes/layouts.py`)


def batch_shards(ffn: str, mesh: Mesh) -> int:
    """Chips the batch is split over by the FFN layout (1 for weight-stationary)."""
    return ffn_layout(ffn).batch_shards(mesh)


def head_shards(ffn: str, attention: str, mesh: Mesh) -> int:
    """Chips the query heads are split over in the attention computation."""
    return attention_layout(attention).head_shards(ffn_layout(ffn), mesh)


def check_layout(cfg: TransformerConfig, mesh: Mesh, work: StepWorkload, ffn: str, attention: str,
                 options: CostOptions) -> None:
    """Raise LayoutNotApplicable if this layout cannot run this step on this mesh (each
    layout's `check`), ValueError for a name no layout is registered under."""
    f, a = ffn_layout(ffn), attention_layout(attention)
    f.check(mesh, work)
    a.check(cfg, mesh, work, f, options)


# ---------------------------------------------------------------------------------------------
# Communication


def layer_collectives(cfg: TransformerConfig, mesh: Mesh, work: StepWorkload, ffn: str,
                      attention: str, heads: int) -> list[Collective]:
    """Every collective of one Transformer layer for this layout (Pope et al. Sec. 3, App. A).

    Weight-stationary layouts move activations: 1D all-gathers the input over all chips and
    reduce-scatters the output; 2D (E_x F_yz) all-gathers B L E/X over yz, reduce-scatters the
    hidden B L F/YZ over x, all-gathers it back, and reduce-scatters B L E/X over yz:
    (2BL/bw)(E/X + F/YZ). Weight-gathered layouts all-gather the layer's weights over N chips
    (2EFN/(n bw) for two matrices) and move B L E / N of activations over the other axes.
    A parallel block shares the E-side collectives of attention and FFN; a serial block pays
    them twice. SwiGLU has two input projections, so its hidden reduce-scatter carries 2F.
    """
    a = ACTIVATION_BYTES[work.weights]
    t = work.tokens
    e, f, d, k = cfg.d_model, cfg.d_ff, cfg.d_head, cfg.n_kv_heads
    n_in = cfg.ffn_matrices - 1  # input projections of the FFN: gelu 1, swiglu 2
    q_width = heads * d  # query (and attention output) width
    kv_width = 2 * k * d  # K and V projections
    lay, att = ffn_layout(ffn), attention_layout(attention)
    out: list[Collective] = []

    def sub_block(tag: str, in_width: float, out_width: float) -> None:
        """E-side and hidden-side collectives of one block whose hidden widths are given."""
        out.extend(lay.block_collectives(mesh, t, e, a, tag, in_width, out_width))

    ffn_in, ffn_out = n_in * f, f
    att_in, att_out = q_width + kv_width, q_width
    if cfg.parallel_block:
        sub_block("block", ffn_in + att_in, ffn_out + att_out)
    else:
        sub_block("attention", att_in, att_out)
        sub_block("ffn", ffn_in, ffn_out)
    # Attention layout: batch sharding moves Q/K/V to sequences and the output back; heads
    # with fewer K/V heads than chips gathers them.
    out.extend(att.collectives(mesh, lay, t, q_width, kv_width, k, d, a))
    # Weight-gathered: all-gather the layer's weights over the gathered axes.
    out.extend(lay.weight_collectives(
        mesh, _layer_weight_elems(cfg, heads) * WEIGHT_BYTES[work.weights]))
    return out


def step_collectives(cfg: TransformerConfig, mesh: Mesh, work: StepWorkload,
                     ffn: str) -> list[Collective]:
    """Once-per-step collectives: embedding lookup into the residual layout, and gathering the
    final activations for the vocabulary-sharded unembedding."""
    a = ACTIVATION_BYTES[work.weights]
    rows = work.tokens / batch_shards(ffn, mesh)
    return [Collective("reduce-scatter", "xyz", rows * cfg.d_model * a, "embedding lookup"),
            Collective("all-gather", "xyz", rows * cfg.d_model * a, "unembedding input")]


def collective_time(c: Collective, mesh: Mesh, hw: HardwareProfile,
                    options: CostOptions) -> CollectiveTime:
    """How long one collective takes, split into the fast and the slow network's parts.

    A collective whose axes stay inside a node is priced by `collective_seconds`; one over
    axes that cross nodes is hierarchical (`network.two_level_collective`): its part inside
    a node priced the same way on the node's share of the mesh, plus the slow network's."""
    k_slow = mesh.slow_size(c.axes)
    if k_slow == 1:
        bw_s, lat_s = collective_seconds(c, mesh, hw, options)
        return CollectiveTime(fast_s=bw_s, slow_s=0.0, latency_s=lat_s, slow_latency_s=0.0)
    node = mesh.inside_node()
    k_fast = node.size(c.axes)

    def fast(kind: str, nbytes: float) -> tuple[float, float]:
        return collective_seconds(Collective(kind, c.axes, nbytes, c.what, c.weights), node,
                                  hw, options)

    fast_s, slow_s, slow_lat = two_level_collective(c.kind, c.bytes_per_chip, k_fast, k_slow,
                                                    fast, hw, options.ring_correction)
    lat = (hw.collective_latency_s + hw.collective_step_latency_s * node.ring_steps(c.axes))
    return CollectiveTime(fast_s=fast_s, slow_s=slow_s, latency_s=lat, slow_latency_s=slow_lat)


def weight_tensors_per_layer(cfg: TransformerConfig) -> int:
    """The weight matrices of one layer, each its own array: q, k, v, o and the FFN's."""
    return 4 + cfg.ffn_matrices


def issued_latency(c: Collective, mesh: Mesh, hw: HardwareProfile,
                   cfg: TransformerConfig) -> tuple[float, float]:
    """(latency, the part of it across nodes) of `c` in a job over nodes on a profile whose
    collectives then cost a fixed `multinode_collective_s` each (CPU: a gloo exchange, inside
    a process too; measured over a whole node's devices), scaled by the ring steps of a group
    larger than a node (K chips: (K-1) / (node's chips - 1)), plus `dcn_latency_s` for each
    ring step across nodes; a layer's weight all-gather is one collective per weight matrix
    (`weight_tensors_per_layer`), as the lowering gathers each array. A job of one node never
    gets here: its latency is `collective_time`'s."""
    k = mesh.size(c.axes)
    if k <= 1:
        return 0.0, 0.0
    scale = max(1.0, (k - 1) / max(1, mesh.chips_per_node - 1))
    slow = hw.dcn_latency_s * (mesh.slow_size(c.axes) - 1)
    count = weight_tensors_per_layer(cfg) if c.weights else 1
    return count * (hw.multinode_collective_s * scale + slow), count * slow


def norm_latency(cfg: TransformerConfig, mesh: Mesh, hw: HardwareProfile,
                 ffn: str) -> tuple[float, float]:
    """(latency, the part across nodes) of the norms' statistics in a job whose every
    collective costs `multinode_collective_s` (see `issued_latency`): with the residual
    stream split over E (`FFNLayout.residual`), each norm all-reduces its sums over those
    axes -- two (mean and variance) for a layernorm, one for an RMS norm -- once per block
    norm (one a layer in a parallel block, two in a serial one) and once for the final
    norm. Their bytes (a few per token) are left out."""
    axes = "".join(ffn_layout(ffn).residual.get("embed", ()))
    if mesh.size(axes) <= 1:
        return 0.0, 0.0
    norms = cfg.n_layers * (1 if cfg.parallel_block else 2) + 1
    reduces = norms * (2 if cfg.norm == "layernorm" else 1)
    lat, slow = issued_latency(Collective("all-reduce", axes, 0.0, "norm statistics"), mesh,
                               hw, cfg)
    return reduces * lat, reduces * slow


def slow_bytes(c: Collective, mesh: Mesh, options: CostOptions) -> float:
    """Bytes one chip sends across nodes for this collective (0 inside a node)."""
    k_slow = mesh.slow_size(c.axes)
    if k_slow == 1:
        return 0.0
    ring = (k_slow - 1) / k_slow if options.ring_correction else 1.0
    share = 1.0 if c.kind == "all-to-all" else 1.0 / mesh.inside_node().size(c.axes)
    return c.bytes_per_chip * share * ring


def collective_seconds(c: Collective, mesh: Mesh, hw: HardwareProfile,
                       options: CostOptions) -> tuple[float, float]:
    """(bandwidth time, latency) of one collective inside a node (see `collective_time` for
    collectives that cross nodes).

    All-gather / reduce-scatter over K chips: D/bw * (K-1)/K (the paper's model: a chip's
    links are all usable). All-to-all on a torus: with uniform traffic a byte travels on
    average k/4 hops along each of the d dimensions of a k^d group, and each dimension has
    2 of the 2d links, so the time is D * d * k / (4 bw) (3D/bw for 4x4x4); on a switch it
    is D/bw * (K-1)/K. Latency: a fixed launch cost plus one step per neighbour exchange.
    """
    k = mesh.size(c.axes)
    if k <= 1:
        return 0.0, 0.0
    bw = hw.ici_bandwidth * hw.ici_efficiency
    ring = (k - 1) / k if options.ring_correction else 1.0
    if c.kind == "all-to-all" and hw.torus_dims:
        d = hw.torus_dims
        factor = max(ring, d * k ** (1 / d) / 4)
    else:
        factor = ring
    latency = hw.collective_latency_s + hw.collective_step_latency_s * mesh.ring_steps(c.axes)
    return c.bytes_per_chip * factor / bw, latency


# ---------------------------------------------------------------------------------------------
# Parameters, FLOPs and bytes


def _layer_weight_elems(cfg: TransformerConfig, heads: int) -> int:
    """Weights of one layer with `heads` query heads (padded heads are real weights)."""
    e, d, k = cfg.d_model, cfg.d_head, cfg.n_kv_heads
    return 2 * e * heads * d + 2 * e * k * d + cfg.ffn_params_per_layer()


def _embedding_elems(cfg: TransformerConfig) -> int:
    """Every embedding parameter: token table(s), learned positions (memory held)."""
    return cfg.n_params() - cfg.n_layers * cfg.layer_params()


def _unembedding_elems(cfg: TransformerConfig) -> int:
    """The embedding parameters a step multiplies with: the (V, E) unembedding, tied or not.
    An untied input table and learned positions are only looked up, a few rows a step."""
    return cfg.vocab_size * cfg.d_model


def attention_flops(cfg: TransformerConfig, work: StepWorkload, heads: int) -> float:
    """QK^T and AV: 4 * B * L * S * H * D per layer. Prefill computes the full L x L scores
    with a causal mask (as an XLA einsum does), so S = L; decode attends over `context`."""
    return 4.0 * work.tokens * work.context * heads * cfg.d_head * cfg.n_layers


def kv_bytes_per_chip_per_token(cfg: TransformerConfig, mesh: Mesh, work: StepWorkload, ffn: str,
                                attention: str) -> float:
    """KV cache bytes on one chip per token of context, for this batch and layout.

    Over batch: ceil(B/n) sequences with all K heads. Over heads: the sequences of this chip's
    batch group with ceil(K / head shards) KV heads; multiquery keeps the whole K/V on every
    chip, which is why decode prefers the batch layout (Pope et al. Sec. 3.3)."""
    from meshwright.models.cache import KVCacheShape

    per_head = KVCacheShape.of(cfg).bytes_per_token(ACTIVATION_BYTES[work.weights], kv_heads=1)
    kv_heads, sequences = attention_layout(attention).kv_share(cfg, mesh, work.batch,
                                                               ffn_layout(ffn))
    return per_head * kv_heads * sequences


# ---------------------------------------------------------------------------------------------
# The model


def evaluate(cfg: TransformerConfig, hw: HardwareProfile, mesh: Mesh, work: StepWorkload,
             ffn: str, attention: str, options: CostOptions | None = None,
             kv_memory_fraction: float = 0.3, nodes: int = 1) -> CandidateCost:
    """Cost one forward step of `cfg` under one layout. Raises LayoutNotApplicable.

    `nodes`: the nodes the job spans when `mesh` is one node's (a replica's, a pipeline
    stage's); a mesh over nodes says so itself."""
    options = options or CostOptions()
    check_layout(cfg, mesh, work, ffn, attention, options)
    # A job over several nodes (the mesh's, or `nodes` for one node's mesh of a replica or a
    # pipeline stage) on a profile whose in-node collectives then cost otherwise (CPU:
    # gloo): their bytes at its in-node rate, every collective's latency as issued.
    per_collective = hw.multinode_collective_s if max(nodes, mesh.nodes) > 1 else 0.0
    if per_collective:
        hw = hw.in_multinode_job()
    n = mesh.n
    notes: list[str] = []
    heads = padded_heads(cfg, head_shards(ffn, attention, mesh), options)
    if heads != cfg.n_heads:
        notes.append(f"{cfg.n_heads} heads padded to {heads}")
    wbytes = WEIGHT_BYTES[work.weights]

    # ---- compute: every matmul split evenly over the chips
    layer_elems = _layer_weight_elems(cfg, heads)
    emb_elems = _embedding_elems(cfg)
    unemb_elems = _unembedding_elems(cfg)
    matmul_flops = 2.0 * work.tokens * (cfg.n_layers * layer_elems + unemb_elems)
    att_flops = attention_flops(cfg, work, heads)
    hardware_flops = matmul_flops + att_flops
    peak = hw.peak_flops(work.weights)
    compute_s = hardware_flops / n / (peak * hw.matmul_efficiency)

    # ---- memory traffic: weights this chip multiplies with, and its KV cache
    gathered = batch_shards(ffn, mesh)  # N for weight-gathered, 1 for weight-stationary
    weight_bytes = (cfg.n_layers * layer_elems + emb_elems) * wbytes / n  # held
    streamed = (cfg.n_layers * layer_elems * gathered + unemb_elems) * wbytes / n  # read
    hbm = hw.hbm_bandwidth * hw.hbm_efficiency
    weight_load_s = streamed / hbm
    kv_per_token = kv_bytes_per_chip_per_token(cfg, mesh, work, ffn, attention)
    kv_bytes = kv_per_token * work.context
    kv_load_s = kv_bytes / hbm
    memory_s = weight_load_s + kv_load_s
    # Roofline: the shorter of compute and memory is hidden behind the longer only partly.
    roofline_s = (max(compute_s, memory_s)
                  + (1 - hw.compute_memory_overlap) * min(compute_s, memory_s))

    # ---- communication
    per_layer = layer_collectives(cfg, mesh, work, ffn, attention, heads)
    per_step = step_collectives(cfg, mesh, work, ffn)
    act_bw = weight_bw = latency = comm_bytes = 0.0
    slow_act = slow_weights = slow_latency = slow_sent = 0.0  # parts of the above across nodes
    for coll, times in ((per_layer, cfg.n_layers), (per_step, 1)):
        for c in coll:
            t = collective_time(c, mesh, hw, options)
            if c.weights:
                weight_bw += t.bandwidth_s * times
                slow_weights += t.slow_s * times
            else:
                act_bw += t.bandwidth_s * times
                slow_act += t.slow_s * times
            if per_collective:
                lat, slow_lat = issued_latency(c, mesh, hw, cfg)
                latency += lat * times
                slow_latency += slow_lat * times
            else:
                latency += t.total_latency_s * times
                slow_latency += t.slow_latency_s * times
            if mesh.size(c.axes) > 1:
                comm_bytes += c.bytes_per_chip * times
                slow_sent += slow_bytes(c, mesh, options) * times
    if per_collective:  # the norms' statistics over a residual stream split over E
        lat, slow_lat = norm_latency(cfg, mesh, hw, ffn)
        latency += lat
        slow_latency += slow_lat
    hidden_weights = min(weight_bw, roofline_s) if options.prefetch_weight_gathers else 0.0
    comm_s = (act_bw * (1 - options.activation_comm_overlap) + weight_bw - hidden_weights
              + latency)
    comm_total_s = act_bw + weight_bw + latency
    # The slow network's share of comm_s; prefetched weight gathers hide in proportion.
    exposed_weights = (weight_bw - hidden_weights) / weight_bw if weight_bw else 0.0
    slow_network_s = (slow_act * (1 - options.activation_comm_overlap)
                      + slow_weights * exposed_weights + slow_latency)

    step_s = roofline_s + comm_s + hw.step_overhead_s

    # ---- memory capacity
    gathered_buffer = layer_elems * wbytes * gathered / n if ffn_layout(ffn).gathered else 0.0
    memory = weight_bytes + gathered_buffer + kv_bytes
    fits = memory <= hw.hbm_bytes
    kv_budget = min(kv_memory_fraction * hw.hbm_bytes,
                    hw.hbm_bytes - weight_bytes - gathered_buffer)
    max_context = int(max(0.0, kv_budget) // kv_per_token) if kv_per_token else 0
    if not fits:
        notes.append(f"needs {memory / 2**30:.1f} GiB per chip, has {hw.hbm_bytes / 2**30:.1f}")

    model_flops = 2.0 * cfg.n_params() * work.tokens
    if options.attention_flops_in_mfu:
        model_flops += attention_flops(cfg, work, cfg.n_heads)
    mfu = model_flops / (n * peak * step_s)
    return CandidateCost(
        ffn_layout=ffn, attention_layout=attention, mesh=mesh, step_s=step_s,
        compute_s=compute_s, weight_load_s=weight_load_s, kv_load_s=kv_load_s, comm_s=comm_s,
        comm_total_s=comm_total_s, overhead_s=hw.step_overhead_s,
        weight_bytes_per_chip=weight_bytes, gathered_weight_bytes_per_chip=gathered_buffer,
        weight_bytes_read_per_chip=streamed,
        kv_cache_bytes_per_chip=kv_bytes, memory_bytes_per_chip=memory, fits=fits,
        max_context=max_context, mfu=mfu, model_flops=model_flops,
        hardware_flops=hardware_flops, cost_per_token=n * step_s / work.tokens,
        padded_heads=heads, collectives_per_layer=sum(mesh.size(c.axes) > 1 for c in per_layer),
        comm_bytes_per_chip=comm_bytes, bound="compute" if compute_s >= memory_s else "memory",
        notes=notes, slow_network_s=slow_network_s, slow_bytes_per_chip=slow_sent)


def ffn_comm_seconds(layout: str, batch_tokens: float, d_model: float, d_ff: float,
                     mesh: Mesh, bandwidth: float, ring_correction: bool = False,
                     n_matrices: int = 2) -> float:
    """Bandwidth time of one FFN block's collectives in a layout: the closed forms of Sec. 3.2.

    Elements are counted as bytes (multiply `batch_tokens` by the element size if needed).
    With `ring_correction=False`:

    - ws-1d: 2BLE/bw
    - ws-2d: (2BL/bw)(E/X + F/YZ)             # optimum X = sqrt(nE/F), 8BLE/(sqrt(n) bw)
    - wg-*:  2EFN/(n bw) + 2BLE/(N bw)         # optimum N = sqrt(BLn/F)

        >>> ffn_comm_seconds("ws-2d", 1, 1, 4, Mesh(4, 4, 4), 1.0) * 8 / 8  # 8/sqrt(64)
        1.0
    """
    return ffn_layout(layout).closed_form(batch_tokens, d_model, d_ff, mesh, bandwidth,
                                          ring_correction, n_matrices)
