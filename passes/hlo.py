"""Count the collectives in compiled HLO text, per device, loop bodies times their trip count.

    >>> counts = collective_bytes(jitted.lower(*args).compile().as_text())
    >>> counts["by_kind"]      # {"all-gather": bytes, "reduce-scatter": ..., ...}

Bytes follow the cost model's convention (`passes/cost_model.py`): an all-gather counts its
output per device, a reduce-scatter its input, an all-to-all and an all-reduce their operand,
a collective-permute its operand. XLA on CPU may rewrite a reduce-scatter as an all-reduce
plus a dynamic slice: what is really there is counted, under its real kind.

`wire` counts what each device sends instead (ring algorithms over groups of K devices):
(K-1)/K of an all-gather's output, a reduce-scatter's input or an all-to-all's operand, twice
that for an all-reduce, all of a collective-permute's operand. A looped collective einsum
(N-1 ppermutes of one block each) sends exactly what the all-gather or reduce-scatter it
replaces sends, so the two programs are compared on `wire`.
"""

from __future__ import annotations

import re
from collections import defaultdict

_DTYPE_BYTES = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2, "s32": 4, "s64": 8, "s8": 1, "u8": 1,
                "u32": 4, "s16": 2, "u16": 2, "pred": 1, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_KINDS = {"all-gather": "all-gather", "all-gather-start": "all-gather",
          "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
          "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
          "collective-permute": "collective-permute",
          "collective-permute-start": "collective-permute"}
_SHAPE = re.compile(r"([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z\-]*)\((.*)$")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _parse(hlo: str):
    """computation name -> list of (opcode, result type text, operand text, full line)."""
    comps: dict[str, list] = {}
    entry = None
    current = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and not line[:1].isspace():  # computation headers are not indented
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        mi = _INSTR.match(line)
        if mi:
            comps[current].append((mi.group(3), mi.group(2), mi.group(4), line, mi.group(1)))
    return comps, entry


def collective_bytes(hlo: str, nodes=None) -> dict:
    """{"total": bytes, "by_kind": {kind: bytes}, "count": {kind: n}} per device per call.

    `nodes` (the node of each device, indexed as the program's devices: the mesh's devices
    in order) adds what crosses between nodes: "slow" (bytes per device sent to other nodes,
    as the two-level model counts them: a collective over a group of k_slow nodes with k_fast
    of its devices in each sends bytes/k_fast * (k_slow-1)/k_slow across nodes, an all-to-all
    bytes * (k_slow-1)/k_slow, a collective-permute the operand of every pair that crosses;
    averaged over the devices), "slow_by_kind" and "slow_count" (collectives that cross)."""
    comps, entry = _parse(hlo)
    by_kind: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    wire: dict[str, float] = defaultdict(float)
    slow: dict[str, float] = defaultdict(float)
    slow_count: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 50 or name not in comps:
            return
        # result types by instruction name: operands print as bare names in current HLO text
        types = {iname: result for _, result, _, _, iname in comps[name]}
        for opcode, result, operands, line, _ in comps[name]:
            kind = _KINDS.get(opcode)
            if kind is not None:
                if kind in ("all-gather",):
                    nbytes = _shape_bytes(result)
                else:
                    args = operands.split(")")[0]
                    nbytes = _shape_bytes(args) or sum(
                        _shape_bytes(types.get(a.strip().lstrip("%"), ""))
                        for a in args.split(",")) or _shape_bytes(result)
                by_kind[kind] += nbytes * times
                count[kind] += times
                wire[kind] += nbytes * times * _wire_fraction(kind, line)
                if nodes is not None:
                    share = _slow_fraction(kind, line, nodes)
                    if share:
                        slow[kind] += nbytes * times * share
                        slow_count[kind] += times
            if opcode == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trip.group(1)) if trip else 1
                body = re.search(r"body=%?([\w.\-]+)", line)
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                if body:
                    visit(body.group(1), times * n, depth + 1)
                if cond:
                    visit(cond.group(1), times * n, depth + 1)
            else:
                for callee in re.findall(r"(?:calls|to_apply|true_computation|"
                                         r"false_computation|branch_computations)=\{?%?"
                                         r"([\w.\-]+)", line):
                    if opcode not in ("all-reduce", "reduce-scatter", "reduce", "scatter",
                                      "reduce-window", "select-and-scatter", "sort",
                                      "all-reduce-start"):
                        visit(callee, times, depth + 1)

    if entry is not None:
        visit(entry, 1)
    out = {"total": int(sum(by_kind.values())), "by_kind": dict(by_kind),
           "count": dict(count), "wire": round(sum(wire.values())),
           "wire_by_kind": {k: round(v) for k, v in wire.items()}}
    if nodes is not None:
        out.update(slow=round(sum(slow.values())), slow_by_kind={k: round(v) for k, v in
                                                                 slow.items()},
                   slow_count=dict(slow_count))
    return out


def replica_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of one collective's HLO line: `replica_groups={{0,2},{1,3}}`, the
    iota form `replica_groups=[2,2]<=[2,2]T(1,0)`, or none (`{}`: all `devices` together)."""
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if m:
        import numpy as np

        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", line)
    groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}",
                                                                       m.group(1))] if m else []
    return [g for g in groups if g] or [list(range(devices))]


def _slow_fraction(kind: str, line: str, nodes) -> float:
    """The share of a collective's bytes (per device, averaged) that crosses between nodes."""
    if kind == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
        if not pairs:
            return 0.0
        crossing = sum(nodes[int(a)] != nodes[int(b)] for a, b in pairs)
        return crossing / len(nodes)
    total, devices = 0.0, 0
    for group in replica_groups(line, len(nodes)):
        k_slow = len({nodes[d] for d in group})
        k_fast = len(group) / k_slow
        share = 1.0 if kind == "all-to-all" else 1.0 / k_fast
        total += len(group) * share * (k_slow - 1) / k_slow
        devices += len(group)
    return total / devices if devices else 0.0


def _group_size(line: str) -> int:
    """Devices per replica group: `replica_groups={{0,2},{1,3}}` or `replica_groups=[2,2]<=[4]`."""
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    return 1


def _wire_fraction(kind: str, line: str) -> float:
    if kind == "collective-permute":
        pairs = re.findall(r"\{(\d+),(\d+)\}", line.split("source_target_pairs=")[-1])
        return 1.0 if any(a != b for a, b in pairs) else 0.0
    k = _group_size(line)
    share = (k - 1) / k if k > 1 else 0.0
    return 2 * share if kind == "all-reduce" else share


# ---- memory traffic ---------------------------------------------------------------------------

_FREE = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all",
         "opt-barrier", "partition-id", "replica-id", "add-dependency"}
_SLICING = {"slice", "dynamic-slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}


def _operand_names(operands: str) -> list[str]:
    """The instruction names an instruction's operand text lists, in order."""
    args = operands.split("), ")[0] if "), " in operands else operands.rsplit(")", 1)[0]
    return [a.strip().split(" ")[-1].lstrip("%") for a in args.split(",") if a.strip()]


def _fusion_traffic(body: list, operand_bytes: list[int]) -> tuple[int, int]:
    """(bytes read, bytes written) of one fusion: a parameter read only through slices counts
    what the slices read; the array a root dynamic-update-slice or scatter updates in place is
    not read, and only the update is written."""
    types = {iname: result for _, result, _, _, iname in body}
    users: dict[str, list] = defaultdict(list)
    params: dict[int, str] = {}
    root = None
    for opcode, result, operands, line, iname in body:
        if opcode == "parameter":
            params[int(re.search(r"parameter\((\d+)\)", line).group(1))] = iname
        for k, name in enumerate(_operand_names(operands)):
            users[name].append((opcode, k, iname, result, operands))
        if line.lstrip().startswith("ROOT"):
            root = (opcode, iname, result, operands)
    roots = [root]
    if root is not None and root[0] == "tuple":
        roots = [next(((o, n, r, a) for o, r, a, _, n in body if n == name), None)
                 for name in _operand_names(root[3])]
    in_place = {}  # parameter name -> bytes written into it
    written = 0
    for r in roots:
        if r is None:
            continue
        opcode, iname, result, operands = r
        names = _operand_names(operands)
        if opcode in _IN_PLACE and names:
            update = names[1] if opcode == "dynamic-update-slice" else names[-1]
            nbytes = _shape_bytes(types.get(update, ""))
            in_place[names[0]] = nbytes
            written += nbytes
        else:
            written += _shape_bytes(result)
    read = 0
    for k, name in params.items():
        full = operand_bytes[k] if k < len(operand_bytes) else _shape_bytes(types.get(name, ""))
        uses = users.get(name, [])
        if name in in_place and all(u[1] == 0 and u[0] in _IN_PLACE for u in uses):
            continue
        if uses and all(u[0] in _SLICING and u[1] == 0 for u in uses):
            read += min(full, sum(_shape_bytes(u[3]) for u in uses))
        else:
            read += full
    return read, written


def memory_traffic(hlo: str) -> dict:
    """Bytes one call of a compiled program reads and writes in memory, per device, from its
    HLO text: every top-level instruction (and while bodies times their trip count) reads
    its operands and writes its result; fusions count what they touch (slices only what they
    slice, in-place updates only the update); bitcasts, tuples and parameters move nothing.
    An upper bound on DRAM traffic (a value still in cache is counted again).

    Returns {"read": bytes, "written": bytes, "total": read + written, "by_op": {name:
    bytes}, "largest": [(bytes, instruction), ...] the ten largest}."""
    comps, entry = _parse(hlo)
    by_op: dict[str, int] = defaultdict(int)
    largest: list[tuple[int, str]] = []
    totals = {"read": 0, "written": 0}

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 50 or name not in comps:
            return
        types = {iname: result for _, result, _, _, iname in comps[name]}
        for opcode, result, operands, line, iname in comps[name]:
            if opcode in _FREE:
                continue
            if opcode == "while":
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                n = int(trip.group(1)) if trip else 1
                for key in ("body", "condition"):
                    callee = re.search(key + r"=%?([\w.\-]+)", line)
                    if callee:
                        visit(callee.group(1), times * n, depth + 1)
                continue
            if opcode in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|true_computation|false_computation|"
                                         r"branch_computations)=\{?%?([\w.\-]+)", line):
                    visit(callee, times, depth + 1)
                continue
            operand_bytes = [_shape_bytes(types.get(a, "")) for a in _operand_names(operands)]
            if opcode == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", line)
                read, written = _fusion_traffic(comps.get(callee.group(1), []) if callee
                                                else [], operand_bytes)
            elif opcode in _IN_PLACE:
                update = operand_bytes[1] if opcode == "dynamic-update-slice" else \
                    operand_bytes[-1]
                read, written = update, update
            elif opcode in _SLICING:
                read = written = _shape_bytes(result)
            else:
                read, written = sum(operand_bytes), _shape_bytes(result)
            totals["read"] += read * times
            totals["written"] += written * times
            by_op[re.sub(r"\.\d+$", "", iname)] += (read + written) * times
            largest.append(((read + written) * times, iname))

    if entry is not None:
        visit(entry, 1)
    largest.sort(reverse=True)
    return {"read": totals["read"], "written": totals["written"],
            "total": totals["read"] + totals["written"], "by_op": dict(by_op),
            "largest": largest[:10]}
