"""The same layout expressed the ordinary way: `jax.jit` + `with_sharding_constraint`.

This is what a user would write by hand for a layout chosen by meshwright: the parameters and
caches placed with `NamedSharding`s, and every activation constrained to the sharding the
explicit lowering gave it (`node.meta["spec"]`; partial sums cannot be expressed, so those are
left free), the weight-gathered layouts' weights constrained to their gathered sharding right
before their matmul (`node.meta["operand_target"]`). XLA's SPMD partitioner (GSPMD) then inserts
the collectives. `benchmarks/layouts.py` compares its collective bytes with the explicit
`shard_map` lowering's.

    >>> c = step.compiled(*args)
    >>> baseline = gspmd_program(c)            # a jitted function of the flat arguments
    >>> hlo = baseline.lower(*flat_args).compile().as_text()
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from meshwright.ir import Graph, Literal
from meshwright.ir import jax_compat as jc
from meshwright.ir.interpreter import bind_node


def _constrain(x, spec, mesh):
    if spec is None or spec.partial or not hasattr(x, "shape") or len(x.shape) != len(spec.dims):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec.partition_spec()))


def _eval(g: Graph, flat: list, mesh) -> list:
    env: dict[int, Any] = {v.id: x for v, x in zip(g.inputs, flat)}

    def read(v):
        return v.value if isinstance(v, Literal) else env[v.id]

    for node in g.topo_order():
        if node.op == "input":
            continue
        if node.op == "constant":
            env[node.out.id] = node.params["value"]
            continue
        ins = [read(v) for v in node.inputs]
        for k, spec in (node.meta.get("operand_target") or {}).items():
            ins[k] = _constrain(ins[k], spec, mesh)
        if node.op == "scan":
            body = node.regions["jaxpr"]
            params = dict(node.params)
            params["jaxpr"] = jc.make_closed_jaxpr(
                lambda *xs, body=body: _eval(body, list(xs), mesh),
                [v.aval for v in body.inputs])
            outs = node.primitive.bind(*ins, **params)
        else:
            outs = bind_node(node, ins)
        specs = node.meta.get("spec") or []
        for k, (v, x) in enumerate(zip(node.outputs, outs)):
            env[v.id] = _constrain(x, specs[k] if k < len(specs) else None, mesh)
    return [read(v) for v in g.outputs]


def gspmd_program(compiled) -> Any:
    """A `jax.jit` function of the caller's flat arguments computing the same graph with the
    compiled layout written as sharding constraints (see the module docstring)."""
    if "quantize-int8" in compiled.graph.meta:
        raise ValueError("the GSPMD baseline runs the float graph; compile without "
                         "weights='int8' to compare")
    mesh = compiled.jax_mesh
    g = compiled.graph

    def run(*flat):
        return _eval(g, list(flat), mesh)

    return jax.jit(run,
                   in_shardings=[NamedSharding(mesh, s.partition_spec())
                                 for s in compiled.in_specs],
                   out_shardings=[NamedSharding(mesh, s.partition_spec())
                                  for s in compiled.out_specs])
