"""Plans across nodes: what crosses the slow network between nodes, and what it costs.

A job on more chips than one node (or TPU slice) holds runs on `nodes` equal nodes of
`chips_per_node` chips. Inside a node the paper's layouts run as before; between nodes the
profile's slower network (InfiniBand, the data-centre network, TCP) carries one of:

- **replicas**: each node group holds its own copy of the weights and runs its share of the
  batch; nothing crosses the slow network during a step. Every copy must fit its nodes.
- **pipeline**: a replica's layers are split into equal stages, one node each; only the
  activations between stages cross, one hop per stage boundary, and the outputs once from
  the last stage back. The batch runs as M microbatches so that the stages overlap; the
  pipeline fills and drains every step (sampling on the host sits between steps), which
  costs a bubble of (S-1) iterations.
- **stretched**: the paper's layouts on a mesh whose axes run over the nodes too
  (`Mesh.slow`), every collective over such an axis priced with the two-level network
  model (`passes/network.py`).

`replicas` x (`pipeline` | `stretched`) combine: 4 nodes may be 2 replicas of a 2-stage
pipeline. Each way of crossing is a `Crossing` object in `CROSSINGS` (a registry, so a new
one is one class); `price_crossings` prices every one on every split of the nodes and keeps
what could not run with its reason.

Pipeline step as `mw.shard` lowers it (passes/stages.py): one SPMD loop of M + S - 1
iterations, in each of which every stage receives the activations the stage before it
computed last iteration (none at the first) and runs its layers on them (the compute waits
for the hop, the next hop for the compute: they do not overlap).
S stages, M microbatches, t the step of one stage on one microbatch (its layers' compute,
weights, KV and in-node collectives), h one hop of a microbatch's activations
(B/M * L * E * a bytes through the node's chips' share of the slow network), o the outputs'
hop (B * L * V * a: the logits) from the last stage to each other:

    step = (M+S-1)*t + (M+S-2)*h + (S-1)*o + step_overhead
    bubble = (S-1)*(t + h)                # each stage idles while the pipe fills and drains
    slow network = (M+S-2)*h + (S-1)*o

In decode a microbatch streams its stage's weights again, so M > 1 only pays where compute
or the KV cache, not the weights, dominates; the planner tries every M that divides the batch.

    >>> from meshwright.models.config import get_config
    >>> from meshwright.passes.hardware import get_hardware
    >>> from meshwright.passes.cost_model import StepWorkload
    >>> costs, _ = price_crossings(get_config("llama3-405b"), get_hardware("h100"),
    ...                            NodeSplit(2, 8), StepWorkload(64, 2048, "decode", "bf16"))
    >>> best = min((c for c in costs if c.fits), key=lambda c: c.step_s)
    >>> best.kind in ("pipeline", "stretched")   # one node cannot hold 810 GB: no replicas
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from meshwright.models.config import TransformerConfig
from meshwright.passes.cost_model import (
    ACTIVATION_BYTES,
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    CandidateCost,
    CostOptions,
    LayoutNotApplicable,
    Mesh,
    StepWorkload,
    evaluate,
    factorizations,
)
from meshwright.passes.hardware import HardwareProfile
from meshwright.passes.network import transfer_seconds


@dataclass(frozen=True)
class NodeSplit:
    """`nodes` equal nodes (or TPU slices) of `chips_per_node` chips each."""

    nodes: int
    chips_per_node: int

    @property
    def chips(self) -> int:
        return self.nodes * self.chips_per_node

    def __str__(self) -> str:
        return f"{self.nodes} nodes of {self.chips_per_node}"


def split_nodes(hw: HardwareProfile, chips: int, nodes: int | None = None) -> NodeSplit:
    """How `chips` of this hardware sit in nodes. `nodes=None`: one node when they fit one,
    else the fewest equal nodes of at most `max_chips` each. Raises ValueError naming the
    numbers for chips that do not split into equal nodes, more nodes than the profile
    connects, or nodes larger than one node (or not a slice size of a TPU).

        >>> from meshwright.passes.hardware import get_hardware
        >>> split_nodes(get_hardware("h100"), 16)
        NodeSplit(nodes=2, chips_per_node=8)
    """
    if chips < 1:
        raise ValueError(f"chips must be >= 1, got {chips}")
    if nodes is not None and nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    per_node_max = hw.max_chips
    if nodes is None:
        nodes = -(-chips // per_node_max)
    if nodes > 1 and not hw.spans_nodes:
        raise ValueError(f"{hw.name} connects at most {per_node_max} chips in one "
                         f"slice/node and its profile has no network between nodes; got "
                         f"chips={chips}")
    if chips % nodes:
        lo, hi = chips // nodes * nodes, -(-chips // nodes) * nodes
        raise ValueError(
            f"{chips} chips do not split into {nodes} equal nodes ({chips / nodes:.3g} chips "
            f"each); every node must hold the same number of chips: use {lo or nodes} or "
            f"{hi} chips, or another node count")
    per_node = chips // nodes
    if per_node > per_node_max:
        raise ValueError(f"{hw.name} connects at most {per_node_max} chips in one slice/node; "
                         f"{chips} chips on {nodes} nodes would be {per_node} per node: use "
                         f"at least {-(-chips // per_node_max)} nodes")
    if nodes > hw.max_nodes:
        raise ValueError(f"{hw.name} jobs span at most {hw.max_nodes} nodes of {per_node_max} "
                         f"chips ({hw.max_nodes * per_node_max} chips); {chips} chips need "
                         f"{nodes}")
    if nodes > 1 and hw.slice_chips and per_node not in hw.slice_chips:
        raise ValueError(f"{hw.name} slices do not come in {per_node} chips ({chips} chips on "
                         f"{nodes} slices); slice sizes: "
                         f"{', '.join(map(str, hw.slice_chips))}")
    return NodeSplit(nodes, per_node)


@dataclass
class CrossNodeCost:
    """One way of running a step on several nodes, priced.

    `layout` is the paper's layout inside it: on one node (replicas; one pipeline stage at
    the microbatch), or on the replica's whole stretched mesh."""

    kind: str  # "replicas" | "pipeline" | "stretched": what a replica puts across nodes
    split: NodeSplit
    replicas: int  # copies of the weights, the batch split evenly between them
    stages: int  # pipeline stages of one replica (1: no pipeline)
    microbatches: int  # the replica's batch in this many pieces through the pipeline
    layers_per_stage: int
    layout: CandidateCost
    step_s: float
    compute_s: float  # one stage (or replica) over the whole step
    weight_load_s: float
    kv_load_s: float
    comm_s: float  # communication inside nodes, plus slow_network_s
    slow_network_s: float  # time on the network between nodes on the step's critical path
    bubble_s: float  # pipeline fill and drain (0 without stages)
    overhead_s: float
    slow_bytes_per_chip: float  # bytes one chip sends across nodes per step
    weight_bytes_per_chip: float
    gathered_weight_bytes_per_chip: float
    kv_cache_bytes_per_chip: float
    memory_bytes_per_chip: float
    fits: bool
    max_context: int
    mfu: float
    cost_per_token: float
    notes: list[str] = field(default_factory=list)

    @property
    def nodes_per_replica(self) -> int:
        return self.split.nodes // self.replicas

    @property
    def slow_axes(self) -> dict[str, int]:
        """The mesh axes that cross nodes and over how many nodes each runs: `replica` and
        `stage` (outside the layout's x, y, z), and any of x, y, z a stretched layout runs
        over nodes."""
        axes = {}
        if self.replicas > 1:
            axes["replica"] = self.replicas
        if self.stages > 1:
            axes["stage"] = self.stages
        axes.update(self.layout.mesh.slow_axes)
        return axes

    @property
    def label(self) -> str:
        """e.g. "2 replicas", "pipeline 2 stages x 4 mb", "2 replicas x stretched x/2"."""
        inner = {"replicas": "",
                 "pipeline": f"pipeline {self.stages} stages x {self.microbatches} mb",
                 "stretched": "stretched " + ",".join(
                     f"{a}/{n}" for a, n in self.layout.mesh.slow_axes.items())}[self.kind]
        reps = f"{self.replicas} replicas" if self.replicas > 1 else ""
        return " x ".join(p for p in (reps, inner) if p) or "one node"

    def stage_list(self) -> list[dict]:
        """The pipeline stages of replica 0: layers [first, last) and the node holding them."""
        if self.stages == 1:
            return []
        k = self.layers_per_stage
        return [{"stage": i, "layers": [i * k, (i + 1) * k], "node": i}
                for i in range(self.stages)]

    def breakdown(self) -> dict:
        return {"compute_s": self.compute_s, "weight_load_s": self.weight_load_s,
                "kv_load_s": self.kv_load_s, "comm_s": self.comm_s,
                "slow_network_s": self.slow_network_s, "bubble_s": self.bubble_s}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label": self.label, "nodes": self.split.nodes,
                "chips_per_node": self.split.chips_per_node, "replicas": self.replicas,
                "stages": self.stages, "microbatches": self.microbatches,
                "layers_per_stage": self.layers_per_stage, "slow_axes": self.slow_axes,
                "ffn_layout": self.layout.ffn_layout,
                "attention_layout": self.layout.attention_layout,
                "mesh": self.layout.mesh.to_dict(), "step_seconds": self.step_s,
                "breakdown": self.breakdown(), "slow_bytes_per_chip": self.slow_bytes_per_chip,
                "memory_bytes_per_chip": self.memory_bytes_per_chip, "fits": self.fits,
                "max_context": self.max_context, "mfu": self.mfu,
                "cost_chip_seconds_per_token": self.cost_per_token, "notes": self.notes}


class NotApplicable(ValueError):
    """This way of crossing nodes cannot run the step (the message names the numbers)."""


@dataclass(frozen=True)
class PricingContext:
    """Everything a Crossing needs to price itself."""

    cfg: TransformerConfig
    hw: HardwareProfile
    split: NodeSplit
    work: StepWorkload
    ffns: Sequence[str] = FFN_LAYOUTS
    attentions: Sequence[str] = ATTENTION_LAYOUTS
    options: CostOptions = field(default_factory=CostOptions)
    kv_memory_fraction: float = 0.3
    microbatches: int | None = None  # a pipeline's, pinned (None: every divisor of the batch)

    def model_flops(self) -> float:
        return 2.0 * self.cfg.n_params() * self.work.tokens

    def mfu(self, step_s: float) -> float:
        peak = self.hw.peak_flops(self.work.weights)
        return self.model_flops() / (self.split.chips * peak * step_s)

    def layouts(self, cfg: TransformerConfig, meshes: Sequence[Mesh],
                work: StepWorkload) -> list[CandidateCost]:
        """Every applicable layout of `cfg` on these meshes, cheapest first, priced as in a
        job over the split's nodes (one node's meshes too: on CPU every collective of a job
        over processes is a gloo exchange, `HardwareProfile.multinode_collective_s`)."""
        out = []
        for mesh in meshes:
            for ffn in self.ffns:
                for att in self.attentions:
                    try:
                        out.append(evaluate(cfg, self.hw, mesh, work, ffn, att, self.options,
                                            self.kv_memory_fraction, nodes=self.split.nodes))
                    except LayoutNotApplicable:
                        pass
        out.sort(key=lambda c: (c.step_s, FFN_LAYOUTS.index(c.ffn_layout),
                                ATTENTION_LAYOUTS.index(c.attention_layout),
                                (c.mesh.x, c.mesh.y, c.mesh.z)))
        return out


def _replica_batch(ctx: PricingContext, replicas: int) -> int:
    if ctx.work.batch % replicas:
        raise NotApplicable(f"batch {ctx.work.batch} does not split over {replicas} replicas "
                            f"({ctx.work.batch / replicas:.3g} sequences each)")
    return ctx.work.batch // replicas


def _no_fit(layouts: list[CandidateCost], where: str, hw: HardwareProfile) -> NotApplicable:
    if not layouts:
        return NotApplicable(f"no layout applies {where}")
    small = min(layouts, key=lambda c: c.memory_bytes_per_chip)
    return NotApplicable(
        f"does not fit {where}: the smallest layout ({small.ffn_layout}/"
        f"{small.attention_layout} {small.mesh}) needs {small.memory_bytes_per_chip / 2**30:.1f}"
        f" GiB per chip (weights {small.weight_bytes_per_chip / 2**30:.1f}, KV cache "
        f"{small.kv_cache_bytes_per_chip / 2**30:.1f}); a chip has "
        f"{hw.hbm_bytes / 2**30:.1f} GiB")


class Crossing:
    """One way of putting a replica across its nodes. `price` returns the best candidate for
    a number of replicas, or raises NotApplicable saying why it cannot run; `layouts` the
    layouts it chose among for that candidate (for `Plan.explain()`)."""

    kind: str = ""
    # Whether a replica of one node is this crossing (only `replicas` is: the others need a
    # replica to span nodes).
    single_node_replicas: bool = False

    def price(self, ctx: PricingContext, replicas: int) -> CrossNodeCost:
        raise NotImplementedError

    def layouts(self, ctx: PricingContext, cost: CrossNodeCost) -> list[CandidateCost]:
        """Every layout this crossing priced for `cost`'s replicas (and microbatch)."""
        work = StepWorkload(ctx.work.batch // cost.replicas // cost.microbatches, ctx.work.context,
                        ctx.work.phase, ctx.work.weights)
        return ctx.layouts(self._config(ctx, cost), self._meshes(ctx, cost), work)

    def _config(self, ctx: PricingContext, cost: CrossNodeCost) -> TransformerConfig:
        return ctx.cfg

    def _meshes(self, ctx: PricingContext, cost: CrossNodeCost) -> list[Mesh]:
        return factorizations(ctx.split.chips_per_node)


class Replicas(Crossing):
    """Every node a replica: the batch split, nothing crosses the slow network."""

    kind = "replicas"
    single_node_replicas = True

    def price(self, ctx: PricingContext, replicas: int) -> CrossNodeCost:
        return _one_layout(self.kind, ctx, replicas, factorizations(ctx.split.chips_per_node),
                           f"one node of {ctx.split.chips_per_node} x {ctx.hw.name}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Pipeline(Crossing):
    """A replica's layers in equal stages, one node each; activations hop between them."""

    kind = "pipeline"

    def _config(self, ctx: PricingContext, cost: CrossNodeCost) -> TransformerConfig:
        return ctx.cfg.replace(n_layers=cost.layers_per_stage)

    def price(self, ctx: PricingContext, replicas: int) -> CrossNodeCost:
        stages = ctx.split.nodes // replicas
        layers = ctx.cfg.n_layers
        if stages < 2:
            raise NotApplicable("a pipeline needs 2 or more nodes per replica")
        if layers % stages:
            raise NotApplicable(f"{layers} layers do not split into {stages} equal pipeline "
                                f"stages ({layers / stages:.3g} each)")
        b = _replica_batch(ctx, replicas)
        stage_cfg = ctx.cfg.replace(n_layers=layers // stages)
        c_node = ctx.split.chips_per_node
        meshes = factorizations(c_node)
        hw, work = ctx.hw, ctx.work
        a = ACTIVATION_BYTES[work.weights]
        best: CrossNodeCost | None = None
        tried: list[CandidateCost] = []
        if ctx.microbatches is not None and b % ctx.microbatches:
            raise NotApplicable(f"the batch {b} does not split into {ctx.microbatches} "
                                "microbatches")
        for m in [ctx.microbatches] if ctx.microbatches else _divisors(b):
            micro = StepWorkload(b // m, work.context, work.phase, work.weights)
            hop = transfer_seconds(micro.tokens * ctx.cfg.d_model * a, c_node, hw)
            iterations = m + stages - 1  # the lowered loop: every stage computes, all but
            hops = iterations - 1  # the first receive
            out_bytes = m * micro.tokens * ctx.cfg.vocab_size * a  # the logits, returned
            back = (stages - 1) * transfer_seconds(out_bytes, c_node, hw)
            for c in ctx.layouts(stage_cfg, meshes, micro):
                tried.append(c)
                kv = c.kv_cache_bytes_per_chip * m  # every microbatch's cache on the stage
                held = c.weight_bytes_per_chip + c.gathered_weight_bytes_per_chip
                memory = held + kv
                if memory > hw.hbm_bytes:
                    continue
                t = c.step_s - c.overhead_s
                step = iterations * t + hops * hop + back + c.overhead_s
                if best is not None and step >= best.step_s:
                    continue
                slow = hops * hop + back
                per_token = kv / work.context
                budget = min(ctx.kv_memory_fraction * hw.hbm_bytes, hw.hbm_bytes - held)
                best = CrossNodeCost(
                    kind=self.kind, split=ctx.split, replicas=replicas, stages=stages,
                    microbatches=m, layers_per_stage=stage_cfg.n_layers, layout=c,
                    # a stage works every iteration (on a clamped microbatch while the
                    # pipe fills and drains): its time is the loop's, not the M useful ones
                    step_s=step, compute_s=iterations * c.compute_s,
                    weight_load_s=iterations * c.weight_load_s,
                    kv_load_s=iterations * c.kv_load_s, comm_s=iterations * c.comm_s + slow,
                    slow_network_s=slow, bubble_s=(stages - 1) * (t + hop),
                    overhead_s=c.overhead_s,
                    # every stage but the last sends its activations each hop, and one
                    # stage after another passes the outputs on: per chip, averaged
                    slow_bytes_per_chip=(stages - 1) / stages * (
                        hops * micro.tokens * ctx.cfg.d_model * a + out_bytes) / c_node,
                    weight_bytes_per_chip=c.weight_bytes_per_chip,
                    gathered_weight_bytes_per_chip=c.gathered_weight_bytes_per_chip,
                    kv_cache_bytes_per_chip=kv, memory_bytes_per_chip=memory, fits=True,
                    max_context=int(max(0.0, budget) // per_token) if per_token else 0,
                    mfu=ctx.mfu(step), cost_per_token=ctx.split.chips * step / work.tokens)
        if best is None:
            raise _no_fit(tried, f"as {stages} stages of {stage_cfg.n_layers} layers on "
                                 f"{c_node} x {hw.name} at batch {b}", hw)
        return best


def stretched_meshes(chips_per_node: int, nodes: int) -> list[Mesh]:
    """Every mesh of nodes x chips_per_node chips whose axes' node counts multiply to `nodes`
    (each node count dividing its axis), in a fixed order.

        >>> [str(m) for m in stretched_meshes(2, 2)][:3]
        ['1x1x[2*2]', '1x2x[2*1]', '1x[2*1]x2']
    """
    out = []
    for mesh in factorizations(chips_per_node * nodes):
        for sx in _divisors(nodes):
            for sy in _divisors(nodes // sx):
                sz = nodes // sx // sy
                if mesh.x % sx or mesh.y % sy or mesh.z % sz:
                    continue
                out.append(Mesh(mesh.x, mesh.y, mesh.z, slow=(sx, sy, sz)))
    return out


class Stretched(Crossing):
    """The paper's layouts on one mesh over all of a replica's nodes; the collectives over
    axes that cross nodes pay the slow network."""

    kind = "stretched"

    def _meshes(self, ctx: PricingContext, cost: CrossNodeCost) -> list[Mesh]:
        return stretched_meshes(ctx.split.chips_per_node, ctx.split.nodes // cost.replicas)

    def price(self, ctx: PricingContext, replicas: int) -> CrossNodeCost:
        group = ctx.split.nodes // replicas
        if group < 2:
            raise NotApplicable("a stretched layout needs 2 or more nodes per replica")
        return _one_layout(self.kind, ctx, replicas,
                           stretched_meshes(ctx.split.chips_per_node, group),
                           f"over {group} nodes of {ctx.split.chips_per_node} x {ctx.hw.name}")


def _one_layout(kind: str, ctx: PricingContext, replicas: int, meshes: list[Mesh],
                where: str) -> CrossNodeCost:
    """A replica of the job as one of the paper's layouts on `meshes` (one node's, or a mesh
    stretched over nodes): the best that fits, its slow-network time as the layout prices it
    (none on one node's mesh)."""
    b = _replica_batch(ctx, replicas)
    work = StepWorkload(b, ctx.work.context, ctx.work.phase, ctx.work.weights)
    layouts = ctx.layouts(ctx.cfg, meshes, work)
    fitting = [c for c in layouts if c.fits]
    if not fitting:
        raise _no_fit(layouts, f"{where} at batch {b}", ctx.hw)
    c = fitting[0]
    return CrossNodeCost(
        kind=kind, split=ctx.split, replicas=replicas, stages=1, microbatches=1,
        layers_per_stage=ctx.cfg.n_layers, layout=c, step_s=c.step_s,
        compute_s=c.compute_s, weight_load_s=c.weight_load_s, kv_load_s=c.kv_load_s,
        comm_s=c.comm_s, slow_network_s=c.slow_network_s, bubble_s=0.0,
        overhead_s=c.overhead_s, slow_bytes_per_chip=c.slow_bytes_per_chip,
        weight_bytes_per_chip=c.weight_bytes_per_chip,
        gathered_weight_bytes_per_chip=c.gathered_weight_bytes_per_chip,
        kv_cache_bytes_per_chip=c.kv_cache_bytes_per_chip,
        memory_bytes_per_chip=c.memory_bytes_per_chip, fits=True,
        max_context=c.max_context, mfu=ctx.mfu(c.step_s),
        cost_per_token=ctx.split.chips * c.step_s / ctx.work.tokens)


# The ways of crossing nodes, in the order ties are broken (fewest bytes over the network
# first).
CROSSINGS: dict[str, Crossing] = {c.kind: c for c in (Replicas(), Pipeline(), Stretched())}


def _splits(nodes: int, crossing: Crossing) -> Iterator[int]:
    """Replica counts to try: all nodes as replicas for `replicas`; for the others every
    replica count that leaves 2 or more nodes per replica."""
    if crossing.single_node_replicas:
        yield nodes
        return
    for r in _divisors(nodes):
        if nodes // r >= 2:
            yield r


def price_crossings(cfg: TransformerConfig, hw: HardwareProfile, split: NodeSplit,
                    work: StepWorkload, ffns: Sequence[str] = FFN_LAYOUTS,
                    attentions: Sequence[str] = ATTENTION_LAYOUTS,
                    options: CostOptions | None = None, kv_memory_fraction: float = 0.3,
                    kinds: Sequence[str] | None = None, microbatches: int | None = None,
                    ) -> tuple[list[CrossNodeCost], list[tuple[str, str]]]:
    """The best of every (crossing, replica count) that runs, cheapest first, and the
    (label, reason) of those that cannot. `microbatches` pins a pipeline's."""
    ctx = PricingContext(cfg, hw, split, work, tuple(ffns), tuple(attentions),
                         options or CostOptions(), kv_memory_fraction, microbatches)
    unknown = sorted(set(kinds or ()) - set(CROSSINGS))
    if unknown:
        raise ValueError(f"unknown way of crossing nodes {unknown[0]!r}; known: "
                         f"{', '.join(CROSSINGS)}")
    costs: list[CrossNodeCost] = []
    rejected: list[tuple[str, str]] = []
    for kind, crossing in CROSSINGS.items():
        if kinds and kind not in kinds:
            continue
        for r in _splits(split.nodes, crossing):
            label = (f"{r} replicas" if kind == "replicas" else
                     (f"{r} replicas x " if r > 1 else "") + f"{kind} over {split.nodes // r}"
                     " nodes")
            try:
                costs.append(crossing.price(ctx, r))
            except NotApplicable as e:
                rejected.append((label, str(e)))
    order = list(CROSSINGS)
    costs.sort(key=lambda c: (c.step_s, order.index(c.kind), -c.replicas))
    return costs, rejected


def min_memory_chips(cfg: TransformerConfig, work: StepWorkload) -> float:
    """A lower bound on the chips' memory the step needs: all weights once, plus the KV
    cache of the batch (bytes)."""
    wbytes = {"bf16": 2, "int8": 1, "fp32": 4}[work.weights]
    kv = cfg.kv_bytes_per_token(ACTIVATION_BYTES[work.weights]) * work.batch * work.context
    return cfg.n_params() * wbytes + kv


__all__ = ["CROSSINGS", "CrossNodeCost", "Crossing", "NodeSplit", "NotApplicable",
           "price_crossings", "split_nodes", "stretched_meshes"]
