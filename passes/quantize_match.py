"""The `quantize-int8` pass's weight analysis: which matmul weights it can quantize, each
followed back to the graph input that holds it and the dims it is contracted over there.

From `find-blocks`' blocks of the wanted kinds, every weight dot_general's weight operand is
followed back through layout operations (`convert_element_type`, `transpose`, `reshape` whose
groups do not mix contracted and kept dims) and scan boundaries (a const, or per-layer slices of
a stacked weight, whose `layers` axis is kept) to a top-level input: an `Origin`. A use the
rewrite cannot take raises `Skip`, whose message says why (it is reported, not fatal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from meshwright.ir import Graph, Node, Value
from meshwright.passes.analysis import analyze
from meshwright.passes.int8_weights import MAX_CONTRACTION

# ---- matching: which weights, contracted over which dims ----------------------------------------


class Skip(Exception):
    """A weight use the rewrite does not take; the message says why."""


SAME = frozenset({"convert_element_type", "copy", "reduce_precision"})
VIEWS = SAME | {"transpose", "reshape"}


def _reshape_groups(sin: Sequence[int], sout: Sequence[int]) -> list[tuple[list, list]]:
    """Minimal runs of input and output dims with equal products: ([in dims], [out dims])."""
    groups, i, j = [], 0, 0
    while i < len(sin) or j < len(sout):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(sin):
            gi, pi, i = [i], sin[i], i + 1
        if j < len(sout):
            gj, pj, j = [j], sout[j], j + 1
        while pi != pj:
            if pi < pj and i < len(sin):
                gi.append(i)
                pi, i = pi * sin[i], i + 1
            elif j < len(sout):
                gj.append(j)
                pj, j = pj * sout[j], j + 1
            else:
                raise Skip(f"reshape {list(sin)} -> {list(sout)}")
        groups.append((gi, gj))
    return groups


def map_reshape(shape_from, shape_to, reduced: frozenset) -> frozenset:
    """Dims of `shape_to` reduced when `reduced` dims of `shape_from` are; a run mixing
    reduced and kept dims (of size > 1) cannot carry per-channel scales."""
    out = set()
    for gi, gj in _reshape_groups(shape_from, shape_to):
        big = [d for d in gi if shape_from[d] > 1]
        hits = [d in reduced for d in big]
        if any(hits) and not all(hits):
            raise Skip(f"a reshape {list(shape_from)} -> {list(shape_to)} mixes contracted "
                        "and kept dims")
        if big and all(hits):
            out.update(gj)
    return frozenset(out)


def big_dims(reduced, shape) -> frozenset:
    return frozenset(d for d in reduced if shape[d] > 1)


def _trace_back(v: Value, reduced: frozenset, parents: dict[int, Node]):
    """Follow a weight operand back to a top-level input: (input, reduced dims there,
    layers axis there or None, whether the way passed a reshape, whether it entered a scan)."""
    layers, reshaped, scanned = None, False, False
    while True:
        p = v.producer
        if p.op == "input":
            owner = parents.get(id(p.graph))
            if owner is None:
                return v, reduced, layers, reshaped, scanned
            if owner.op != "scan":
                raise Skip(f"the weight enters a {owner.op} region")
            i = p.graph.inputs.index(v)
            n_consts, n_carry = owner.params["num_consts"], owner.params["num_carry"]
            if n_consts <= i < n_consts + n_carry:
                raise Skip("the weight is a scan carry")
            outer = owner.inputs[i]
            scanned = True
            if not isinstance(outer, Value):
                raise Skip("the weight is a literal")
            if i >= n_consts + n_carry:  # per-layer slice of a stacked weight
                reduced = frozenset(d + 1 for d in reduced)
                layers = 0  # the stacked-layers axis, in the outer operand's dims
            v = outer
        elif p.op in SAME:
            v = p.inputs[0]
        elif p.op == "transpose":
            perm = p.params["permutation"]
            reduced = frozenset(perm[d] for d in reduced)
            layers = None if layers is None else perm[layers]
            v = p.inputs[0]
        elif p.op == "reshape" and not p.params.get("dimensions"):
            src = p.inputs[0]
            reduced = map_reshape(v.shape, src.shape, reduced)
            layers, reshaped = None, True
            v = src
        else:
            raise Skip(f"the weight comes out of {p.op}")
        if not isinstance(v, Value):
            raise Skip("the weight is a literal")


@dataclass
class Origin:
    input: Value
    reduced: frozenset
    layers: int | None
    dots: list[Node]
    permutable: bool = True  # no reshape on the way to a dot: can store contracted dims last
    scanned: bool = False  # a scan slices it (or reads it) on the way to a dot


def select_weights(graph: Graph, kinds: tuple[str, ...], unembedding: bool):
    a = analyze(graph)
    wanted = set(kinds) | ({"unembedding"} if unembedding else set())
    selected: list[Node] = []
    for b in graph.meta["blocks"].blocks:
        if b.kind in wanted:
            selected += [n for n in b.nodes if a.is_weight_matmul(n) and n not in selected]
    parents = graph.region_owners()
    origins: dict[int, Origin] = {}
    skipped: list[str] = []
    for dot in selected:
        where = f"dot_general -> {list(dot.out.shape)} at {dot.source or '?'}"
        try:
            k = a.weight_operand(dot)
            w = dot.inputs[k]
            (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
            if lb or rb:
                raise Skip("it has batch dimensions")
            if not (np.issubdtype(w.dtype, np.floating) or str(w.dtype) == "bfloat16"):
                raise Skip(f"the weight is {w.dtype}")
            contract = tuple(lc if k == 0 else rc)
            if math.prod(w.shape[d] for d in contract) > MAX_CONTRACTION:
                raise Skip("the contraction is too long for exact int32 accumulation")
            src, reduced, layers, reshaped, scanned = _trace_back(w, frozenset(contract),
                                                                  parents)
        except Skip as e:
            skipped.append(f"{where}: {e}")
            continue
        o = origins.setdefault(src.id, Origin(src, reduced, layers, []))
        if big_dims(o.reduced, src.shape) != big_dims(reduced, src.shape):
            skipped.append(f"{where}: the weight {input_path(src)} is contracted over other dims "
                           "elsewhere")
            continue
        o.dots.append(dot)
        o.permutable = o.permutable and not reshaped
        o.scanned = o.scanned or scanned
    return [o for o in origins.values() if o.dots], skipped


def input_path(v: Value) -> str:
    return v.producer.params.get("path") or f"input{v.producer.graph.inputs.index(v)}"
