"""Pipeline stages across nodes, lowered: a replica's layers split between nodes, microbatched,
in one SPMD program.

When the planner's best way across nodes (`passes/multinode.py`) is a pipeline -- S stages of
L/S layers, one node each, the batch in M microbatches so that the stages overlap --
`mw.shard` lowers it on a mesh with a fourth axis, `stage`, outside the layout's x, y, z:

- the mesh: stage s is node s (a process of a multi-process job, or a block of one process's
  devices when the hardware profile's nodes are smaller than the mesh), laid out inside as
  the plan lays out one stage; with R replicas of the pipeline, a fifth axis `replica`
  outside `stage` splits the batch R ways first (as `passes/replicas.py` does), replica r's
  stage s on node r S + s;
- the weights and the KV cache: the function's layers must run in one `jax.lax.scan` over
  stacked arrays (`scan_layers`); every stacked array the scan slices layer by layer (its
  weights, its cache) is split over `stage` along the layer dimension, so stage s holds the
  weights and the cache of layers [s L/S, (s+1) L/S) and nothing of the others. Arrays the
  layers do not slice (the embedding, the final norm) are held by every stage;
- the program: the function traced and lowered at the microbatch (B / M rows) with the
  planned layout on x, y, z, run M + S - 1 times in a loop. At iteration t stage s works on
  microbatch t - s: stage 0 embeds it, the others receive what stage s - 1 computed at
  iteration t - 1 (the scan's carry, a collective-permute over `stage`: the only
  activations that cross nodes during the loop, each device of a stage sending its share and
  the receiving node gathering the shares); the stage runs its L/S layers (the scan over its
  local slices, writing the microbatch's rows of its cache). The last stage's results (the
  logits) are passed along the stages once at the end, so every stage returns them.

Every stage runs the function's code outside the layers (the embedding lookup, the final
norm and unembedding) for its microbatch and keeps only what it needs of it: stage 0 the
embedded activations, the last stage the outputs. Iterations where a stage has no microbatch
(the pipeline filling and draining) compute on a clamped index and write nothing.

The layers run the function on their rows only, which is the function on all rows when rows
do not mix (a Transformer's decode step and prefill): every output must carry the batch, and
the per-layer outputs of the scan (the updated cache) must be returned as they are.
`lowerable(g, stages)` says why a traced function cannot run as a pipeline; `mw.shard` then
runs the best way across nodes that does lower, and says so in the plan's notes.

    hw = mw.passes.hardware.get_hardware("cpu").replace(max_chips=4)
    step = mw.shard(model.decode_step, hardware=hw, force={"cross_node": "pipeline"})
    step.compiled(*args).jax_mesh.shape                   # 2 stages of one node each
    # {'stage': 2, 'x': 1, 'y': 1, 'z': 4}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh as JaxMesh
from meshwright.passes.replicas import (
    AXES,
    REPLICA_AXIS,
    _with_replica,
    assemble,
    batch_dim,
    compile_share,
    node_devices,
)
from meshwright.passes.sharding import Spec

STAGE_AXIS = "stage"


def _layer_scan(g):
    """The one scan over the layers in `g` (the scan slicing stacked weights), or None."""
    from meshwright.passes.analysis import analyze

    scans = list(dict.fromkeys(analyze(g).layer_scans))
    return scans[0] if len(scans) == 1 else None


def _xs_inputs(g, scan) -> dict[int, int]:
    """graph input index -> scan operand index, for every graph input the scan slices layer by
    layer and nothing else reads (the arrays split over `stage`)."""
    first_xs = scan.params["num_consts"] + scan.params["num_carry"]
    position = {v.id: i for i, v in enumerate(g.inputs)}
    out = {}
    for k, v in enumerate(scan.inputs[first_xs:], first_xs):
        if getattr(v, "id", None) in position and all(u is scan for u in g.users(v)):
            out[position[v.id]] = k
    return out


def lowerable(g, stages: int, roles: bool = True) -> str | None:
    """Why the traced function `g` (after infer-axes) cannot run as `stages` pipeline stages,
    or None when it can. `roles`: also check that every output carries the batch (read from
    infer-axes' roles, which a batch of 1 row does not show)."""
    scan = _layer_scan(g)
    if scan is None:
        return ("a pipeline needs the layers in one jax.lax.scan over stacked weights (as "
                "scan_layers=True writes them); this function "
                + ("has several" if _has_scans(g) else "has none"))
    length = scan.params["length"]
    if length % stages:
        return f"its scan of {length} layers does not split into {stages} equal stages"
    first_ys = scan.params["num_carry"]
    for v in scan.outputs[first_ys:]:
        if g.users(v) or not g.is_output(v):
            return ("a per-layer output of the layer scan is used after it; a pipeline "
                    "returns it only as it is (each stage its layers)")
    if not _xs_inputs(g, scan):
        return "the layer scan slices no argument of the function"
    if not roles:
        return None
    for k, v in enumerate(g.outputs):
        if batch_dim(v) is None:
            return (f"output {k} {list(getattr(v, 'shape', ()))} does not carry the batch "
                    "(a pipeline splits the batch in microbatches)")
    return None


def _has_scans(g) -> bool:
    return any(n.op == "scan" for n in g.nodes)


def stage_meshes(devices, plan) -> list[list[JaxMesh]]:
    """Each stage's x, y, z mesh over its node, laid out as the plan's layout, by replica:
    replica r's stage s is node r * S + s."""
    from meshwright.passes.compiler import make_mesh

    best = plan.best
    shape = {"x": best.mesh.x, "y": best.mesh.y, "z": best.mesh.z}
    nodes = [make_mesh(shape, node) for node in node_devices(devices, plan)]
    S = plan.cross_node.stages
    return [nodes[r * S:(r + 1) * S] for r in range(len(nodes) // S)]


def stage_mesh(meshes: list[list[JaxMesh]]) -> JaxMesh:
    """The one mesh of the program: (stage, x, y, z), or (replica, stage, x, y, z) with
    several replicas."""
    grid = np.stack([np.stack([np.asarray(m.devices) for m in row]) for row in meshes])
    if len(meshes) == 1:
        return JaxMesh(grid[0], (STAGE_AXIS, *AXES), axis_types=(AxisType.Auto,) * 4)
    return JaxMesh(grid, (REPLICA_AXIS, STAGE_AXIS, *AXES), axis_types=(AxisType.Auto,) * 5)


def _on_stage(spec: Spec) -> Spec:
    """`spec` with the layer dimension (0) split over `stage` first."""
    dims = list(spec.dims)
    dims[0] = (STAGE_AXIS, *dims[0])
    return spec.with_dims(dims)


def _rows(x, dim: int, start, size: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=dim)


def _put_rows(buf, new, dim: int, start, keep):
    """`buf` with rows [start, start + n) along `dim` replaced by `new` where `keep`."""
    old = jax.lax.dynamic_slice_in_dim(buf, start, new.shape[dim], axis=dim)
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep, new, old), start, axis=dim)


def _hop(emitter, x, spec: Spec, shape: dict, perm: list, note: str):
    """x (identical on the devices of a stage that differ only along the axes `spec` does not
    split) sent over `stage` by `perm`: each of those devices sends its share of the array,
    and the receiving stage gathers the shares inside its node. The slow network carries the
    array once per stage, not once per device."""
    spare = tuple(a for a in AXES if shape[a] > 1 and a not in spec.used())
    n = int(np.prod([shape[a] for a in spare])) if spare else 1
    if n == 1 or x.size % n:
        return emitter.ppermute(x, (STAGE_AXIS,), perm, note)
    pieces = x.reshape(n, x.size // n)
    mine = jax.lax.dynamic_index_in_dim(pieces, jax.lax.axis_index(spare), keepdims=False)
    sent = emitter.ppermute(mine, (STAGE_AXIS,), perm, note)
    return emitter.all_gather(sent[None], spare, 0, note + " (inside the node)").reshape(x.shape)


def _from_last_stage(emitter, x, spec: Spec, shape: dict, stages: int, s):
    """x as the last stage holds it, on every stage: passed along the ring of stages."""
    for j in range(stages - 1):
        src, dst = (stages - 1 + j) % stages, j % stages
        got = _hop(emitter, x, spec, shape, [(src, dst)], "pipeline outputs")
        x = jnp.where(s == dst, got, x)
    return x


def emit(ig, shape: dict, stages: int, microbatches: int, in_dims: list, out_dims: list):
    """The per-device function of the pipeline over the lowered microbatch graph `ig` (its
    inputs' and outputs' batch dimensions `in_dims`, `out_dims`), the emitter recording its
    collectives, the record of what ran replicated, the inputs split over `stage` and the
    scan output each graph output is."""
    from meshwright.passes.lower import LowerContext, Lowered, _scan, lower_graph
    from meshwright.passes.sharding import Emitter, MeshInfo

    info = MeshInfo(shape)
    emitter, result = Emitter(info), Lowered()
    in_specs, out_specs = ig.meta["in_specs"], ig.meta["out_specs"]
    scan = _layer_scan(ig)
    n_consts, n_carry = scan.params["num_consts"], scan.params["num_carry"]
    xs_in = _xs_inputs(ig, scan)
    ys_ids = {v.id: k for k, v in enumerate(scan.outputs[n_carry:])}
    ys_out = [ys_ids.get(getattr(v, "id", None)) for v in ig.outputs]
    # the per-layer inputs and outputs are (layers, ...): their batch one dimension further in
    in_local = [info.local_shape(v.shape, s) for v, s in zip(ig.inputs, in_specs)]
    out_local = [info.local_shape(v.shape, s) for v, s in zip(ig.outputs, out_specs)]
    S, M = stages, microbatches
    perm = [(i, i + 1) for i in range(S - 1)]

    def per_device(*flat):
        emitter.records.clear()
        s = jax.lax.axis_index(STAGE_AXIS)
        flat = list(flat)
        # the output buffers: the stage's layers' outputs, the last stage's results. A
        # per-layer output takes over a per-layer input of its shape (the cache it updates):
        # the loop reads the input's rows from the buffer before it writes them, so the
        # update is in place when the input is donated.
        free = [i for i in xs_in if in_dims[i] is not None]
        bufs, buffer_of = [], {}
        for k, v in enumerate(ig.outputs):
            local = list(out_local[k])
            if ys_out[k] is not None:
                local[0] //= S
            local[out_dims[k]] *= M
            same = [i for i in free if tuple(flat[i].shape) == tuple(local)
                    and flat[i].dtype == v.dtype] if ys_out[k] is not None else []
            if same:
                free.remove(same[0])
                buffer_of[same[0]] = k
                bufs.append(flat[same[0]])
            else:
                bufs.append(jnp.zeros(local, v.dtype))
        layers = scan.params["length"] // S
        carry_specs: list[Spec] = []  # of the carries one iteration hands the next

        def iteration(t, state, trips):
            previous, bufs = state
            m = t - s
            valid = (m >= 0) & (m < M)
            mc = jnp.clip(m, 0, M - 1)
            ins = []
            for i, x in enumerate(flat):
                x = bufs[buffer_of[i]] if i in buffer_of else x
                d = in_dims[i]
                if d is not None:
                    n = in_local[i][d]
                    x = _rows(x, d, mc * n, n)
                ins.append(x)
            sent: list = []
            ctx = LowerContext.for_graph(ig, info, emitter, result)

            def stage_scan(ctx, node, operands):
                operands = list(operands)
                for k in range(n_carry):
                    x, spec = ctx.resolved(*operands[n_consts + k], "pipeline carry")
                    mine = received[k] if received is not None else jnp.zeros_like(x)
                    operands[n_consts + k] = (jnp.where(s == 0, x, mine), spec)
                for k in range(n_consts + n_carry, len(operands)):
                    x, spec = operands[k]
                    if x.shape[0] == layers * S:  # computed per-layer operand: this stage's
                        if spec.dims[0]:
                            raise ValueError("pipeline: a per-layer operand of the layer scan"
                                             " is split along its layers inside a stage")
                        operands[k] = (jax.lax.dynamic_slice_in_dim(x, s * layers, layers),
                                       spec)
                outs = _scan(ctx, node, operands)
                sent[:] = outs[:n_carry]
                return outs

            ctx.overrides[id(scan)] = stage_scan
            before, emitter.trips = emitter.trips, emitter.trips * trips
            try:
                # what the stage before computed last iteration (none to receive at first)
                received = None if previous is None else [
                    _hop(emitter, x, sp, shape, perm, "pipeline activations")
                    for x, sp in zip(previous, carry_specs)]
                outs, specs = lower_graph(ctx, ig, ins, in_specs)
                outs = [ctx.to(o, sp, want, "output")
                        for o, sp, want in zip(outs, specs, out_specs)]
            finally:
                emitter.trips = before
            new = []
            for k, (buf, o) in enumerate(zip(bufs, outs)):
                d = out_dims[k]
                n = o.shape[d]
                keep = valid if ys_out[k] is not None else valid & (s == S - 1)
                new.append(_put_rows(buf, o.astype(buf.dtype), d, mc * n, keep))
            carry_specs[:] = [sp for _, sp in sent]
            return [x for x, _ in sent], new

        # iteration 0 (only stage 0 has a microbatch, nothing to receive) traced alone: it
        # gives the carries' local shapes, which the loop over the other M + S - 2 carries;
        # each of those first receives what the stage before computed (M + S - 2 sends)
        state = iteration(0, (None, bufs), 1)
        if M + S - 1 > 1:
            state = jax.lax.fori_loop(1, M + S - 1,
                                      lambda t, st: iteration(t, st, M + S - 2), state)
        bufs = state[1]
        return [buf if ys_out[k] is not None else  # the last stage's results, everywhere
                _from_last_stage(emitter, buf, out_specs[k], shape, S, s)
                for k, buf in enumerate(bufs)]

    return per_device, emitter, result, xs_in, ys_out


def compile_stages(sf, plan, g, args: tuple, kwargs: dict, printer=None):
    """`mw.shard`'s compilation when the plan splits a replica's layers into pipeline stages
    (see the module's docstring): a `Compiled` record on the (stage, x, y, z) mesh, or None
    when the plan has no pipeline (or the caller pinned a mesh).

    `sf` is the ShardedFunction, `g` the function traced at the whole batch (after the
    analyses: its inputs carry their roles)."""
    x = getattr(plan, "cross_node", None)
    if x is None or x.kind != "pipeline" or sf.force.get("mesh") is not None:
        if sf.force.get("microbatches") is not None:
            raise ValueError(f"force['microbatches'] pins a pipeline's microbatches, but this "
                             f"runs {x.label if x is not None else 'on one node'}; add "
                             "force['cross_node'] = 'pipeline' (on 2 or more nodes)")
        return None
    why = lowerable(g, x.stages)
    if why is not None:
        raise ValueError(f"{x.label}: {why}")
    S, M, R = x.stages, x.microbatches, x.replicas
    meshes = stage_meshes(sf.devices, plan)
    best = plan.best
    shape, c = compile_share(sf, plan, [m for row in meshes for m in row], g, args, kwargs,
                             R * M, "microbatches", printer)
    ig = c.graph
    why = lowerable(ig, S, roles=False)
    if why is not None:
        raise ValueError(f"{x.label}: at the microbatch, {why}")
    # where the batch is, from the function traced at the whole batch (a microbatch of one
    # row does not show it)
    in_dims = [batch_dim(v) for v in g.inputs]
    out_dims = [batch_dim(v) for v in g.outputs]
    per_device, emitter, result, xs_in, ys_out = emit(ig, shape, S, M, in_dims, out_dims)
    in_specs = [_on_stage(s) if i in xs_in else s for i, s in enumerate(c.in_specs)]
    out_specs = [_on_stage(s) if ys_out[k] is not None else s
                 for k, s in enumerate(c.out_specs)]
    if R > 1:  # the batch split between the replicas first (outermost), as replicas do
        in_specs = [_with_replica(s, d) for s, d in zip(in_specs, in_dims)]
        out_specs = [_with_replica(s, d) for s, d in zip(out_specs, out_dims)]
    where = (f"{R} replicas of {S} pipeline stages on a (replica, stage, x, y, z) mesh (the "
             f"batch split {R} ways over the replica axis; replica r's stage s on node "
             f"{S}r+s)" if R > 1 else
             f"{S} pipeline stages on a (stage, x, y, z) mesh (stage s on node s)")
    whose = "each replica's batch" if R > 1 else "the batch"
    plan.notes.append(
        f"lowered as {where}: stage s holds layers [{x.layers_per_stage}s, "
        f"{x.layers_per_stage}(s+1)) of the scan (their weights and KV cache); {whose} "
        f"in {M} microbatch{'es' if M > 1 else ''} of {g_batch(g, R * M)} rows, "
        f"{M + S - 1} iterations, each but the first receiving the activations the stage "
        f"before computed; each stage runs FFN {best.ffn_layout}, "
        f"attention {best.attention_layout} on {'x'.join(str(shape[a]) for a in AXES)}")
    mesh_shape = {**({REPLICA_AXIS: R} if R > 1 else {}), STAGE_AXIS: S, **shape}
    return assemble(sf, plan, c, args, kwargs, per_device, emitter, result, stage_mesh(meshes),
                    mesh_shape, in_specs, out_specs, in_dims, R * M, "stage")


def g_batch(g, m: int) -> int:
    """The microbatch's rows: the traced batch over `m`."""
    for v in g.inputs:
        d = batch_dim(v)
        if d is not None:
            return int(v.shape[d]) // m
    return 0


__all__ = ["STAGE_AXIS", "compile_stages", "lowerable", "stage_mesh",
           "stage_meshes"]
