"""Replicas across nodes, lowered: the batch split between node groups in one SPMD program.

When the planner's best way across nodes (`passes/multinode.py`) has several replicas —
every node a copy of the weights running its share of the batch, or R copies each
stretched over a group of nodes — `mw.shard` lowers it as one program on a mesh with a
fourth axis, `replica`, outside the layout's x, y, z:

- the mesh: replica r is the r-th group of `nodes / R` consecutive nodes (processes, or
  blocks of one process's devices when the hardware profile's nodes are smaller than the
  mesh), laid out inside as the plan lays out one replica (`make_mesh(..., slow=)`);
- the program: the function traced and lowered at the replica's batch (B / R) with the
  planned layout on x, y, z; every input and output dimension that carries the batch is
  split over `replica` first (outermost), then as the layout splits it inside the replica;
  the weights are replicated over `replica` (each replica holds its copy, laid out over its
  own devices). No collective names `replica`: nothing crosses between replicas during the
  step but the inputs going in and the outputs coming out.

The replica runs the function on its rows only, which is the function on all rows when
rows do not mix (a Transformer's decode step and prefill); every output must carry the
batch, and each output's shape must be the replica's with the batch R times larger, or
the lowering refuses (a ValueError saying so).

    hw = mw.passes.hardware.get_hardware("cpu").replace(max_chips=4)  # nodes of 4 devices
    step = mw.shard(model.decode_step, hardware=hw)      # on 8 devices: 2 nodes
    step.compiled(*args).jax_mesh.shape                  # planned: 2 replicas
    # {'replica': 2, 'x': 1, 'y': 1, 'z': 4}
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import Mesh as JaxMesh

REPLICA_AXIS = "replica"
AXES = ("x", "y", "z")


def replicas_of(plan) -> int:
    """How many replicas the plan splits the batch between (1: none, or one node)."""
    x = getattr(plan, "cross_node", None)
    return int(x.replicas) if x is not None else 1


def node_devices(devices, plan) -> list[list]:
    """The devices of each of the plan's nodes, in order: each process's devices in a job of
    several processes, else consecutive blocks of `chips_per_node` (the hardware profile's
    nodes simulated in one process)."""
    from meshwright.passes.compiler import node_groups

    groups = node_groups(devices)
    if len(groups) == plan.nodes:
        return groups
    if len(groups) != 1:
        raise ValueError(f"the plan spans {plan.nodes} nodes but the mesh's devices are on "
                         f"{len(groups)} processes")
    k = plan.split.chips_per_node
    return [list(devices[i * k:(i + 1) * k]) for i in range(plan.nodes)]


def replica_meshes(devices, plan) -> list[JaxMesh]:
    """Each replica's x, y, z mesh over its node group, laid out as the plan's layout
    (an axis stretched over the group's nodes runs over them with its outer factor)."""
    from meshwright.passes.compiler import make_mesh

    nodes = node_devices(devices, plan)
    r = replicas_of(plan)
    per = len(nodes) // r
    best = plan.best
    shape = {"x": best.mesh.x, "y": best.mesh.y, "z": best.mesh.z}
    slow = tuple(best.mesh.slow)
    out = []
    for i in range(r):
        group = [d for node in nodes[i * per:(i + 1) * per] for d in node]
        out.append(make_mesh(shape, group, slow=slow if per > 1 else None))
    return out


def replica_mesh(meshes: list[JaxMesh]) -> JaxMesh:
    """The one mesh of the program: (replica, x, y, z)."""
    grid = np.stack([np.asarray(m.devices) for m in meshes])
    return JaxMesh(grid, (REPLICA_AXIS, *AXES), axis_types=(AxisType.Auto,) * 4)


def batch_dim(v) -> int | None:
    """The dimension of a graph value that carries the batch (infer-axes' role), or None."""
    roles = (v.producer.meta.get("axes") or {})
    try:
        roles = roles[v.index]
    except (IndexError, KeyError, TypeError):
        return None
    found = [d for d, role in enumerate(roles or ()) if role == "batch"]
    return found[0] if len(found) == 1 else None


def _with_replica(spec, dim: int | None):
    """`spec` with the batch dimension split over `replica` first (outside its own axes)."""
    if dim is None:
        return spec
    dims = list(spec.dims)
    dims[dim] = (REPLICA_AXIS, *dims[dim])
    return spec.with_dims(dims)


def _scaled(shape, dim: int | None, r: int) -> tuple:
    if dim is None:
        return tuple(shape)
    return tuple(s * r if d == dim else s for d, s in enumerate(shape))


def replica_arguments(g, args: tuple, kwargs: dict, r: int, pieces: str = "replicas"):
    """The arguments of one replica (or one of `r` `pieces` of the batch: a pipeline's
    microbatches) as abstract values (jax.ShapeDtypeStruct): every dimension carrying the
    batch (in `g`, the function traced at the whole batch) r times smaller. A ValueError
    naming the sizes when the batch does not split r ways."""
    flat, tree = jax.tree_util.tree_flatten((args, kwargs))
    if len(flat) != len(g.inputs):
        raise ValueError(f"{pieces}: the traced function has {len(g.inputs)} inputs, the "
                         f"call {len(flat)} arguments")
    out = []
    for i, (x, v) in enumerate(zip(flat, g.inputs)):
        d = batch_dim(v)
        shape = tuple(np.shape(x))
        if d is not None:
            if shape[d] % r:
                name = v.producer.params.get("path") or f"argument {i}"
                raise ValueError(f"{pieces}: {name} has batch {shape[d]} (dimension {d}), "
                                 f"which does not split into {r} {pieces}")
            shape = tuple(s // r if k == d else s for k, s in enumerate(shape))
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        out.append(jax.ShapeDtypeStruct(shape, dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def emit(g, mesh_shape: dict):
    """The per-device function of a lowered graph (as `mw.shard` writes it), the emitter that
    records its collectives, and the record of what ran replicated."""
    from meshwright.passes.lower import LowerContext, Lowered, lower_graph
    from meshwright.passes.sharding import Emitter, MeshInfo

    info = MeshInfo(mesh_shape)
    emitter, result = Emitter(info), Lowered()
    in_specs, out_specs = g.meta["in_specs"], g.meta["out_specs"]

    def per_device(*flat_locals):
        emitter.records.clear()
        ctx = LowerContext.for_graph(g, info, emitter, result)
        outs, specs = lower_graph(ctx, g, list(flat_locals), in_specs)
        return [ctx.to(o, s, want, "output") for o, s, want in zip(outs, specs, out_specs)]

    return per_device, emitter, result


def compile_replicas(sf, plan, g, args: tuple, kwargs: dict, printer=None):
    """`mw.shard`'s compilation when the plan splits the batch between replicas (see the
    module's docstring): a `Compiled` record on the (replica, x, y, z) mesh, or None when the
    plan has no replicas (or the caller pinned a mesh: one layout over all the devices).

    `sf` is the ShardedFunction, `g` the function traced at the whole batch (after the
    analyses: its inputs carry their roles)."""
    r = replicas_of(plan)
    if r < 2 or sf.force.get("mesh") is not None or plan.cross_node.kind == "pipeline":
        return None  # (replicas of a pipeline: passes/stages.py)
    meshes = replica_meshes(sf.devices, plan)
    best = plan.best
    # one replica: the function at its share of the batch, with the planned layout pinned
    shape, c = compile_share(sf, plan, meshes, g, args, kwargs, r, "replicas", printer)
    ig = c.graph
    in_dims = [batch_dim(v) for v in ig.inputs]
    out_dims = [batch_dim(v) for v in ig.outputs]
    for k, (whole, one, d) in enumerate(zip(g.outputs, ig.outputs, out_dims)):
        if d is None or tuple(whole.shape) != _scaled(one.shape, d, r):
            raise ValueError(
                f"replicas: output {k} {list(whole.shape)} is not the replica's output "
                f"{list(one.shape)} with the batch {r} times larger (every output must carry "
                f"the batch); pin one layout over all the devices with force={{'ffn': ..., "
                f"'attention': ..., 'mesh': ...}}")
    in_specs = [_with_replica(s, d) for s, d in zip(c.in_specs, in_dims)]
    out_specs = [_with_replica(s, d) for s, d in zip(c.out_specs, out_dims)]
    per_device, emitter, result = emit(ig, shape)
    per = plan.nodes // r
    plan.notes.append(
        f"lowered as {r} replicas on a (replica, x, y, z) mesh: the batch split {r} ways "
        f"over the replica axis, {per} node{'s' if per > 1 else ''} of "
        f"{plan.split.chips_per_node} devices each, the weights copied to every replica; "
        f"each replica runs FFN {best.ffn_layout}, attention {best.attention_layout} on "
        f"{'x'.join(str(shape[a]) for a in AXES)}")
    return assemble(sf, plan, c, args, kwargs, per_device, emitter, result,
                    replica_mesh(meshes), {REPLICA_AXIS: r, **shape}, in_specs, out_specs,
                    in_dims, r, "replica")


def compile_share(sf, plan, meshes: list[JaxMesh], g, args: tuple, kwargs: dict, n: int,
                  pieces: str, printer=None):
    """The function compiled at one of `n` shares of the batch (`pieces`: a replica's, a
    pipeline's microbatches) on this process's node mesh among `meshes`, the planned layout
    pinned: (the node's x, y, z sizes, its Compiled record)."""
    from meshwright.passes.compiler import ShardedFunction

    here = jax.process_index()
    local = next((m for m in meshes if any(d.process_index == here
                                           for d in m.devices.flat)), meshes[0])
    best = plan.best
    shape = {a: int(local.shape[a]) for a in AXES}
    inner = ShardedFunction(sf.fn, mesh=local, phase=sf.phase, hardware=sf.hardware,
                            weights=sf.weights, passes=sf.passes,
                            force={"ffn": best.ffn_layout, "attention": best.attention_layout,
                                   "mesh": shape},
                            collective_einsum=sf.collective_einsum,
                            donate_argnums=sf.donate_argnums, strict=sf.strict)
    s_args, s_kwargs = replica_arguments(g, args, kwargs, n, pieces)
    return shape, inner._compile(s_args, s_kwargs, printer)


def assemble(sf, plan, c, args: tuple, kwargs: dict, per_device, emitter, result,
             mesh: JaxMesh, mesh_shape: dict, in_specs: list, out_specs: list,
             in_dims: list, n: int, what: str):
    """The Compiled record of a program over node groups (replicas, pipeline stages): the
    per-device function `per_device` on `mesh` with these specs, jitted (donating as `sf`
    does) and lowered at the whole batch (`n` shares of `c`'s, along `in_dims`); `c` the
    share's own compilation, whose timings are kept under `what`."""
    import time

    from meshwright.passes.compiler import Compiled

    program = jax.shard_map(per_device, mesh=mesh,
                            in_specs=tuple(s.partition_spec() for s in in_specs),
                            out_specs=[s.partition_spec() for s in out_specs], check_vma=False)
    donated = sf._donated(args, kwargs, c.load_transforms, len(in_specs))
    jitted = jax.jit(program, donate_argnums=donated)
    structs = [jax.ShapeDtypeStruct(_scaled(v.shape, d, n), v.dtype,
                                    sharding=NamedSharding(mesh, s.partition_spec()))
               for v, d, s in zip(c.graph.inputs, in_dims, in_specs)]
    t0 = time.perf_counter()
    lowered = jitted.lower(*structs)
    timings = {f"{what} {k}": t for k, t in c.timings.items()}
    timings["lower"] = time.perf_counter() - t0
    best = plan.best
    return Compiled(graph=c.graph, config=c.config, plan=plan, ffn_layout=c.ffn_layout,
                    attention_layout=c.attention_layout, mesh_shape=mesh_shape,
                    jax_mesh=mesh, in_specs=in_specs, out_specs=out_specs, jitted=jitted,
                    lowered=lowered, records=list(emitter.records),
                    fallbacks=list(c.fallbacks) + [f for f in result.fallbacks
                                                   if f not in c.fallbacks],
                    predicted=best, timings=timings, load_transforms=c.load_transforms,
                    slow=tuple(best.mesh.slow), arguments=c.arguments,
                    in_shapes=tuple(x.shape for x in structs))


__all__ = ["REPLICA_AXIS", "compile_replicas", "replica_arguments", "replica_mesh",
           "replica_meshes"]
