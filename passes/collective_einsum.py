"""Pass `collective-einsum`: an all-gather before a matmul, or a reduce-scatter after it, as a
loop of `ppermute` steps that overlaps the transfers with partial matmuls (Wang et al., ASPLOS
2023; Pope et al. section 3.5). The loops read like the JAX shard_map docs' collective matmuls:

    all-gather -> dot_general                       dot_general -> reduce-scatter
    out = dot(block_in_hand, w[chunk(me)])          acc = dot(x, w[chunk(me + 1)])
    for step in 1 .. N-1:                           for step in 1 .. N-1:
        block_in_hand = ppermute(block_in_hand, +1)     acc = ppermute(acc, +1)
        out += dot(block_in_hand, w[chunk(me - step)])  acc += dot(x, w[chunk(me + 1 + step)])

A gathered dimension that the matmul contracts accumulates (the other operand is sliced to the
block's chunk); a gathered free or batch dimension writes the block's rows of the output. The
bidirectional variant sends half the blocks each way (ceil((N-1)/2) steps, two transfers in
flight); `unroll=False` writes the steps as one `fori_loop`.

How it works: the pass reads the spec propagation (`passes.propagate.propagate`: every
value's spec and every matmul's operand specs, from the graph and the mesh, nothing traced).
For each projection's `MatmulSite` it finds the collectives the matmul needs (a pure gather of
one operand, a pure reduce-scatter of the result onto one dimension), prices plain against
looped with the hardware profile (`plan_matmul`), and leaves a `Decision` in
`node.meta["collective_einsum"]`. At emission, lower's dot_general rule asks its registered
matmul lowerings (`lower.MATMUL_LOWERINGS`) first; this module's, `"collective-einsum"`,
writes the loop for every Decision that says so. A matmul needing both a gather
and a scatter loops the gather; its reduce-scatter stays plain. A gathered operand that other
matmuls read too (Q, K, V and the FFN input of one normed activation) is assembled from the
blocks as they pass and reused, so the bytes on the wire stay those of the one all-gather.

The price (per device, one matmul; `hw` the hardware profile, `o` its
`collective_matmul_overlap`): plain = latency + B(N-1)/N / bw + t_mm; looped =
t_mm/N + steps x (m + c - o min(m, c)) with m the per-step matmul time and c one transfer
(latency + B/N / bw). With o = 0 (the simulated CPU mesh: the "transfers" are memory copies
by the threads that run the matmuls) looping never pays and `mode="auto"` leaves the program
alone; on TPU v4 it pays once a matmul's block outlasts a ppermute's latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from meshwright.ir import Graph, Node, Value
from meshwright.passes.base import Pass, PassContext, register
from meshwright.passes.lower import bind, dot_output_spec, matmul_lowering, weight_operand
from meshwright.passes.propagate import MatmulSite, propagate
from meshwright.passes.sharding import MeshInfo, Spec

MESH_ORDER = ("x", "y", "z")
# "auto" loops a matmul when the model predicts at least this fraction saved: below it the
# prediction is within the model's own error (latencies are assumed, not measured).
MIN_SAVING = 0.05


@dataclass(frozen=True)
class Candidate:
    """The pass's options as the survey prices a matmul with them (`plan_matmul`)."""

    mode: str  # "auto" | "on"
    direction: str  # "auto" | "uni" | "bidi"
    unroll: bool
    hardware: Any  # HardwareProfile

    def __str__(self) -> str:
        return f"collective-einsum: candidate ({self.mode})"


@dataclass(frozen=True)
class Decision:
    """What the survey found for one matmul and what the lowering does about it."""

    kind: str  # "all-gather" | "reduce-scatter"
    axes: tuple[str, ...]  # the ring
    dims: tuple[int, ...]  # gathered operand dims, or the scattered result dim
    operand: int | None  # the gathered operand (all-gather)
    bytes: int  # of the collective per device (all-gather output, reduce-scatter input)
    looped: bool
    direction: str  # "uni" | "bidi"
    unroll: bool
    plain_s: float  # predicted seconds, plain collective + matmul
    looped_s: float  # predicted seconds, the looped form
    why: str
    kept: tuple[str, ...] = ()  # collectives of this matmul left plain

    @property
    def steps(self) -> int:
        n = self.ring_size
        return n - 1 if self.direction == "uni" else -(-(n - 1) // 2)

    ring_size: int = 1
    trips: int = 1  # executions per call (a matmul in a scan body: the scan's length)

    def __str__(self) -> str:
        ring = ",".join(self.axes)
        what = f"{self.kind}({ring}) {self.bytes}B"
        if not self.looped:
            return f"collective-einsum: plain {what}: {self.why}"
        form = f"{'bidirectional' if self.direction == 'bidi' else 'one-way'}, " \
               f"{'unrolled' if self.unroll else 'fori_loop'}"
        kept = f"; kept {', '.join(self.kept)}" if self.kept else ""
        return (f"collective-einsum: looped {what} -> {self.ring_size - 1} ppermutes "
                f"({self.steps} steps, {form}); {self.why}{kept}")


# ---- the pass ---------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class CollectiveEinsum(Pass):
    """Looped collective einsums where the cost model says overlap pays (`mode="auto"`),
    everywhere they apply (`"on"`), or nowhere (`"off"`).

        >>> get_pass("collective-einsum", mode="on", direction="bidi", unroll=False)
    """

    name: ClassVar[str] = "collective-einsum"
    mode: str = "auto"  # "auto": where the cost model says it pays; "on": wherever it applies
    direction: str = "auto"  # "uni", "bidi", or "auto": the faster by the cost model
    unroll: bool = True  # straight-line steps (XLA schedules them freely); False: a fori_loop

    def __post_init__(self):
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"collective-einsum mode is 'auto', 'on' or 'off', got {self.mode!r}")
        if self.direction not in ("auto", "uni", "bidi"):
            raise ValueError(f"collective-einsum direction is 'auto', 'uni' or 'bidi', got "
                             f"{self.direction!r}")

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        mesh = ctx.results.mesh
        if mesh is None or "in_specs" not in graph.meta:
            raise ValueError("collective-einsum needs 'annotate' first (and the mesh 'plan' "
                             "chose)")
        collective_einsum(graph, mesh, self, ctx.hardware)
        return graph


def collective_einsum(g: Graph, mesh: MeshInfo, options: CollectiveEinsum | None = None,
                      hardware="cpu") -> list[Decision]:
    """Survey g (annotated) on `mesh`; leave a Decision on every matmul that gathers an operand
    or scatters its result. Returns the decisions (also `g.meta["collective_einsum"]`)."""
    from meshwright.passes.hardware import get_hardware

    options = options or CollectiveEinsum()
    hw = get_hardware(hardware)
    for node, _ in g.walk():
        node.meta.pop("collective_einsum", None)
    g.meta["collective_einsum"] = []
    if options.mode == "off":
        g.meta["collective_einsum_note"] = "collective-einsum: off (the caller's choice)"
        return []
    if all(n == 1 for n in mesh.sizes.values()):
        g.meta["collective_einsum_note"] = "collective-einsum: one device, nothing to loop"
        return []
    if options.mode == "auto" and hw.collective_matmul_overlap == 0:
        # With nothing overlapped a loop only adds N-1 transfer latencies: no need to survey.
        g.meta["collective_einsum_note"] = (
            f"collective-einsum: plain collectives everywhere: on {hw.name} transfers do not "
            f"overlap matmuls (collective_matmul_overlap = 0), so looping never pays; "
            f"collective_einsum='on' forces it")
        return []
    candidate = Candidate(options.mode, options.direction, options.unroll, hw)
    _survey(g, mesh, candidate)
    decisions = [node.meta["collective_einsum"] for node, _ in g.walk()
                 if node.op == "dot_general" and "collective_einsum" in node.meta]
    g.meta["collective_einsum"] = decisions
    looped = sum(d.looped for d in decisions)
    g.meta["collective_einsum_note"] = (
        f"collective-einsum ({options.mode}, {hw.name}): {looped} of {len(decisions)} "
        f"matmuls with a gather or scatter looped")
    return decisions


def _survey(g: Graph, mesh: MeshInfo, candidate: Candidate) -> None:
    """A Decision on every projection that gathers an operand or scatters its result, from
    the spec propagation (nothing traced, nothing else written on the graph)."""
    from meshwright.passes.analysis import analyze

    if "weight_values" not in g.meta:
        g.meta["weight_values"] = set(analyze(g).weights)
    for site in propagate(g, mesh).matmuls:
        decision = plan_matmul(site, mesh, candidate)
        if decision is not None:
            site.node.meta["collective_einsum"] = decision


# ---- what a matmul needs --------------------------------------------------------------------


def pure_gather(src: Spec, want: Spec) -> list[tuple[int, tuple[str, ...]]] | None:
    """[(dim, axes)] when `reshard(src -> want)` only gathers minor axes of some dims."""
    if src.partial or want.partial or src == want:
        return None
    groups = []
    for d, (have, need) in enumerate(zip(src.dims, want.dims)):
        if tuple(have[:len(need)]) != tuple(need):
            return None
        if len(have) > len(need):
            groups.append((d, tuple(have[len(need):])))
    return groups or None


def pure_scatter(out: Spec, target: Spec) -> tuple[int, tuple[str, ...]] | None:
    """(dim, axes) when reducing `out`'s partial sums toward `target` is one reduce-scatter
    of all of them onto one dimension (the rest, if any, is left to the lowering)."""
    if not out.partial or any(op != "sum" for _, op in out.partial):
        return None
    dims = [tuple(d) for d in out.dims]
    placed = None
    for axis, _ in out.partial:
        hit = next((d for d in range(len(dims)) if tuple(target.dims[d][:len(dims[d]) + 1])
                    == dims[d] + (axis,)), None)
        if hit is None or (placed is not None and hit != placed):
            return None
        placed = hit
        dims[hit] = dims[hit] + (axis,)
    return placed, tuple(a for a, _ in out.partial)


# ---- the cost model -------------------------------------------------------------------------


def price(hw, nbytes: int, n: int, flops: float, dtype) -> dict[str, float]:
    """Predicted seconds of plain, one-way looped and bidirectional looped (see module doc)."""
    bw = hw.ici_bandwidth * hw.ici_efficiency
    peak = hw.peak_flops("fp32" if np.dtype(dtype) == np.float32 else "bf16")
    t_mm = flops / (peak * hw.matmul_efficiency)
    latency = hw.collective_latency_s + hw.collective_step_latency_s * (n - 1)
    plain = latency + nbytes * (n - 1) / n / bw + t_mm
    o = hw.collective_matmul_overlap
    c = hw.collective_latency_s + hw.collective_step_latency_s + nbytes / n / bw
    m = t_mm / n
    uni = m + (n - 1) * (m + c - o * min(m, c))
    # two transfers in flight share the links (a plain collective on a torus already uses
    # both directions): what bidirectional saves is half the steps' latency
    fwd = -(-(n - 1) // 2)
    c2 = c + nbytes / n / bw
    bidi = m + fwd * (2 * m + c2 - o * min(2 * m, c2))
    return {"plain": plain, "uni": uni, "bidi": bidi}


def _decide(cand: Candidate, kind, axes, dims, operand, nbytes, n, flops, dtype,
            kept=(), trips=1) -> Decision:
    t = price(cand.hardware, nbytes, n, flops, dtype)
    if cand.direction == "auto":
        direction = "bidi" if t["bidi"] < t["uni"] and n > 2 else "uni"
    else:
        direction = cand.direction if n > 2 else "uni"
    looped_s = t[direction]
    if cand.mode == "on":
        looped, why = True, "forced on"
    elif looped_s < (1 - MIN_SAVING) * t["plain"]:
        looped = True
        why = f"pays on {cand.hardware.name}: {t['plain'] * 1e6:.2f} -> {looped_s * 1e6:.2f} us"
    else:
        looped = False
        why = (f"does not pay on {cand.hardware.name}: {t['plain'] * 1e6:.2f} us plain, "
               f"{looped_s * 1e6:.2f} us looped")
    return Decision(kind, tuple(axes), tuple(dims), operand, int(nbytes), looped, direction,
                    cand.unroll, t["plain"], looped_s, why, tuple(kept), n, trips)


# ---- the lowering ---------------------------------------------------------------------------


def _needs(site: MatmulSite, mesh: MeshInfo):
    """The collectives one matmul needs: (gathers [(bytes, operand, groups)], biggest first,
    of operands no other matmul gathered already; the looped one (operand, groups) or None;
    whether every operand arrives as wanted or by a pure gather; the result's spec; the pure
    reduce-scatter toward its target (dim, axes) or None)."""
    node, specs, wants = site.node, site.arrived, site.wants
    gathers = []  # (bytes gathered, operand, groups); the bigger one is looped
    for k in (0, 1):
        groups = pure_gather(specs[k], wants[k])
        if groups is None or site.reused[k]:  # reused: a sibling matmul already gathered it
            continue
        size = math.prod(mesh.local_shape(node.inputs[k].shape, wants[k]))
        gathers.append((size * np.dtype(node.inputs[k].dtype).itemsize, k, groups))
    gathers.sort(key=lambda t: -t[0])
    gather = (gathers[0][1], gathers[0][2]) if gathers else None
    others_ok = all(specs[k] == wants[k] or pure_gather(specs[k], wants[k]) is not None
                    for k in (0, 1))
    out_spec = dot_output_spec(node, *wants)
    targets = node.meta.get("target")
    scatter = pure_scatter(out_spec, targets[0]) if targets and targets[0] is not None else None
    return gathers, gather, others_ok, out_spec, scatter


def plan_matmul(site: MatmulSite, mesh: MeshInfo, cand: Candidate) -> Decision | None:
    """The Decision for one propagated matmul: what its gather (else its reduce-scatter)
    costs plain and looped. None: not a projection, or it needs neither."""
    node, specs, wants = site.node, site.arrived, site.wants
    gathers, gather, others_ok, out_spec, scatter = _needs(site, mesh)
    # projections only: attention's activation-activation matmuls move by all-to-all
    if not others_ok or weight_operand(node) is None:
        return None
    local = [mesh.local_shape(v.shape, w) for v, w in zip(node.inputs, wants)]
    flops = _flops(node, local)
    dtype = node.out.dtype
    if gather is not None:
        k, groups = gather
        axes = tuple(a for _, g in groups for a in g)
        n = mesh.count(axes)
        nbytes = math.prod(local[k]) * np.dtype(node.inputs[k].dtype).itemsize
        kept = tuple(f"all-gather({','.join(a for _, g in groups_ for a in g)})"
                     for _, _, groups_ in gathers[1:])
        kept += (f"reduce-scatter({','.join(scatter[1])})",) if scatter else ()
        return _decide(cand, "all-gather", axes, [d for d, _ in groups], k, nbytes, n, flops,
                       dtype, kept, site.trips)
    if scatter is not None and all(specs[k] == wants[k] or site.reused[k] for k in (0, 1)):
        d, axes = scatter
        n = mesh.count(axes)
        nbytes = math.prod(mesh.local_shape(node.out.shape, out_spec)) * np.dtype(dtype).itemsize
        return _decide(cand, "reduce-scatter", axes, [d], None, nbytes, n, flops, dtype,
                       trips=site.trips)
    return None


@matmul_lowering("collective-einsum")
def lower_looped(ctx, site: MatmulSite, ins) -> list | None:
    """lower's matmul lowering for a dot_general whose Decision says looped: the loop of
    ppermutes and partial matmuls. None: lower it plainly."""
    node, specs, wants = site.node, site.arrived, site.wants
    meta = node.meta.get("collective_einsum")
    if not isinstance(meta, Decision) or not meta.looped:
        return None
    _, gather, _, out_spec, scatter = _needs(site, ctx.mesh)
    if meta.kind == "all-gather":
        if gather is None or gather[0] != meta.operand:
            return None
        k, groups = gather
        o = 1 - k
        ox, os_ = ctx.resolved(ins[o][0], specs[o], "matmul operand")
        ox = ctx.to(ox, os_, wants[o], "matmul operand")
        out = _allgather_loop(ctx, node, k, ins[k][0], specs[k], wants[k], groups, ox, meta)
        return [(out, out_spec)]
    if scatter is None:
        return None
    arrays = []
    for k in (0, 1):
        x, s = ins[k]
        x, s = ctx.resolved(x, s, "matmul operand") if s != wants[k] else (x, s)
        arrays.append(ctx.to(x, s, wants[k], "matmul operand"))
    d, axes = scatter
    out = _scatter_loop(ctx, node, arrays, out_spec, d, axes, meta)
    dims = list(out_spec.dims)
    dims[d] = tuple(dims[d]) + tuple(axes)
    rest = tuple(p for p in out_spec.partial if p[0] not in axes)
    return [(out, Spec(tuple(dims), rest))]


def _flops(node: Node, local_shapes) -> float:
    """2 x (output elements) x (contracted length) on local shapes."""
    (lc, rc), (_, rb) = node.params["dimension_numbers"]
    lhs, rhs = local_shapes
    contracted = math.prod(lhs[i] for i in lc)
    rhs_free = math.prod(rhs) // max(1, math.prod(rhs[j] for j in (*rc, *rb)))
    return 2.0 * math.prod(lhs) // max(1, contracted) * rhs_free * contracted


def ring_perm(mesh: MeshInfo, axes: tuple[str, ...], shift: int) -> list[tuple[int, int]]:
    """ppermute pairs sending ring position p to p + shift, where ring positions count over
    `axes` in the given order (as `axis_index(axes)` and `all_gather(axes)` do) and ppermute
    numbers devices over the same axes in mesh order."""
    n = mesh.count(axes)
    order = [a for a in MESH_ORDER if a in axes]

    def device(p: int) -> int:
        coords = {}
        for a in reversed(axes):
            coords[a] = p % mesh.sizes[a]
            p //= mesh.sizes[a]
        q = 0
        for a in order:
            q = q * mesh.sizes[a] + coords[a]
        return q

    return [(device(p), device((p + shift) % n)) for p in range(n)]


def _chunk(mesh: MeshInfo, ring: tuple[str, ...], sub: tuple[str, ...], r):
    """Index of ring position r's block along a dimension gathered over `sub` (a part of
    `ring`): r's digits over `sub`, major first."""
    idx = 0
    stride = 1
    digits = {}
    for a in reversed(ring):
        digits[a] = (r // stride) % mesh.sizes[a]
        stride *= mesh.sizes[a]
    for a in sub:
        idx = idx * mesh.sizes[a] + digits[a]
    return idx


def _streams(n: int, direction: str) -> tuple[int, int]:
    """(forward steps, backward steps): N-1 blocks, half each way when bidirectional."""
    if direction == "uni" or n <= 2:
        return n - 1, 0
    return -(-(n - 1) // 2), (n - 1) // 2


def _run_steps(ctx, steps_common: int, tail: int, body, carry, unroll: bool):
    """Steps 1..steps_common of `body(step, carry, both=True)`, then `tail` forward-only
    steps; rolled steps record their ppermutes once per trip."""
    if unroll or steps_common <= 1:
        for s in range(1, steps_common + 1):
            carry = body(s, carry, True)
    else:
        em = ctx.em
        trips = em.trips
        em.trips = trips * steps_common
        try:
            carry = jax.lax.fori_loop(1, steps_common + 1,
                                      lambda s, c: tuple(body(s, c, True)), tuple(carry))
        finally:
            em.trips = trips
    for s in range(steps_common + 1, steps_common + tail + 1):
        carry = body(s, carry, False)
    return carry


def _allgather_loop(ctx, node, k, a, src: Spec, want: Spec, groups, other, meta: Decision):
    """out = dot(gather(a), other) as ppermute steps over the ring of `groups`' axes."""
    mesh, em = ctx.mesh, ctx.em
    ring = tuple(ax for _, g in groups for ax in g)
    n = mesh.count(ring)
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    kc, kb, oc, ob = (lc, lb, rc, rb) if k == 0 else (rc, rb, lc, lb)
    rank = len(node.out.shape)
    # where operand k's dims land in the output: batch dims first, then lhs free, rhs free
    k_free = [i for i in range(len(src.dims)) if i not in kc and i not in kb]
    n_lhs_free = len(node.inputs[0].shape) - len(lc) - len(lb)
    out_pos = {b: i for i, b in enumerate(kb)}
    for j, i in enumerate(k_free):
        out_pos[i] = len(lb) + j + (0 if k == 0 else n_lhs_free)
    placed = [(d, g) for d, g in groups if d not in kc]  # gathered free/batch dims
    me = jax.lax.axis_index(ring[0] if len(ring) == 1 else ring)

    def product(r, block):
        o = other
        for d, g in groups:
            if d in kc or d in kb:
                e = oc[kc.index(d)] if d in kc else ob[kb.index(d)]
                size = block.shape[d]
                o = jax.lax.dynamic_slice_in_dim(o, _chunk(mesh, ring, g, r) * size, size, e)
        return bind(node, [block, o] if k == 0 else [o, block])[0]

    def add(out, r, y):
        if not placed:
            return y if out is None else out + y
        starts = [0] * rank
        for d, g in placed:
            starts[out_pos[d]] = _chunk(mesh, ring, g, r) * y.shape[out_pos[d]]
        if out is None:
            shape = list(y.shape)
            for d, g in placed:
                shape[out_pos[d]] *= mesh.count(g)
            out = jnp.zeros(shape, y.dtype)
        cur = jax.lax.dynamic_slice(out, starts, y.shape)
        return jax.lax.dynamic_update_slice(out, cur + y, starts)

    # The gathered operand, assembled as the blocks pass, when other matmuls read it too.
    share = isinstance(node.inputs[k], Value) and len(node.graph.users(node.inputs[k])) > 1

    def keep(full, r, block):
        if not share:
            return full
        starts = [0] * block.ndim
        for d, g in groups:
            starts[d] = _chunk(mesh, ring, g, r) * block.shape[d]
        return jax.lax.dynamic_update_slice(full, block, starts)

    full = jnp.zeros((), a.dtype)  # a placeholder in the loop carry when nothing is shared
    if share:
        shape = list(a.shape)
        for d, g in groups:
            shape[d] *= mesh.count(g)
        full = keep(jnp.zeros(shape, a.dtype), me, a)
    out = add(None, me, product(me, a))
    fwd, bwd = _streams(n, meta.direction)
    ahead, back = ring_perm(mesh, ring, 1), ring_perm(mesh, ring, -1)
    note = "collective-einsum"

    def body(s, carry, both):
        out, bf, bb, full = carry
        bf = em.ppermute(bf, ring, ahead, note)  # now holding block me - s
        r = (me - s) % n
        out = add(out, r, product(r, bf))
        full = keep(full, r, bf)
        if both and bwd:
            bb = em.ppermute(bb, ring, back, note)  # block me + s
            r = (me + s) % n
            out = add(out, r, product(r, bb))
            full = keep(full, r, bb)
        return out, bf, bb, full

    common = bwd if bwd else fwd
    out, _, _, full = _run_steps(ctx, common, fwd - common, body, (out, a, a, full),
                                 meta.unroll)
    if share:
        ctx.remember(a, src, want, full)
    return out


def _scatter_loop(ctx, node, arrays, out_spec: Spec, d: int, axes, meta: Decision):
    """reduce_scatter(dot(*arrays), axes, onto dim d) as partial sums passed around the ring."""
    mesh, em = ctx.mesh, ctx.em
    n = mesh.count(axes)
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    n_lhs_free = len(node.inputs[0].shape) - len(lc) - len(lb)
    # the operand dims that make output dim d
    if d < len(lb):
        sources = [(0, lb[d]), (1, rb[d])]
    elif d < len(lb) + n_lhs_free:
        free = [i for i in range(len(node.inputs[0].shape)) if i not in lc and i not in lb]
        sources = [(0, free[d - len(lb)])]
    else:
        free = [j for j in range(len(node.inputs[1].shape)) if j not in rc and j not in rb]
        sources = [(1, free[d - len(lb) - n_lhs_free])]
    size = arrays[sources[0][0]].shape[sources[0][1]] // n
    me = jax.lax.axis_index(axes[0] if len(axes) == 1 else tuple(axes))

    def part(j):
        args = list(arrays)
        for k, dim in sources:
            args[k] = jax.lax.dynamic_slice_in_dim(args[k], (j % n) * size, size, dim)
        return bind(node, args)[0]

    fwd, bwd = _streams(n, meta.direction)
    ahead, back = ring_perm(mesh, tuple(axes), 1), ring_perm(mesh, tuple(axes), -1)
    note = "collective-einsum"
    acc_f = part(me + fwd)  # forward: ends with this device's own part
    acc_b = jnp.zeros_like(acc_f)  # backward: the parts of the next `bwd` devices

    def body(s, carry, both):
        acc_f, acc_b = carry
        acc_f = em.ppermute(acc_f, tuple(axes), ahead, note) + part(me + fwd - s)
        if both and bwd:
            acc_b = em.ppermute(acc_b + part(me - bwd + s - 1), tuple(axes), back, note)
        return acc_f, acc_b

    common = bwd if bwd else fwd
    acc_f, acc_b = _run_steps(ctx, common, fwd - common, body, (acc_f, acc_b), meta.unroll)
    return acc_f + acc_b if bwd else acc_f
