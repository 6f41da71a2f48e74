"""Export a sharded program for a TPU or GPU mesh with `jax.export`, and load it back.

    >>> step = mw.shard(model.decode_step, mesh=mw.make_mesh({"x": 4, "y": 4, "z": 4}),
    ...                 hardware="tpu-v4")                                   # doctest: +SKIP
    >>> program = step.export(params, tokens, cache, positions, platforms=("tpu",))
    >>> program.save("decode.mwx")      # decode.mwx (serialized) + decode.mwx.json (manifest)
    >>> program = mw.load_exported("decode.mwx")       # on a TPU slice with 64 chips
    >>> logits, cache = program(params, tokens, cache, positions)

The artifact is the planned, rewritten, lowered program -- the explicit per-device
`shard_map` program with every collective written out -- as serialized StableHLO, lowered
for the named platforms. It lowers on any machine: the mesh only has to exist, so on a
CPU-only machine simulate as many CPU devices as the mesh has
(`XLA_FLAGS=--xla_force_host_platform_device_count=64`). The manifest next to it (JSON) says
what it is: mesh, layouts, every input's and output's shape, dtype and sharding, the model
config, the collectives the lowering emitted and the cost model's prediction, and the
meshwright and JAX versions. Serialization needs the `flatbuffers` package.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

FORMAT = "meshwright-export/1"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
AXES = ("x", "y", "z")


def _manifest_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


@dataclass
class ExportedProgram:
    """A `jax.export.Exported` sharded program and its manifest; call it like the function.

    A program whose weights are converted when they are loaded (fused Q/K/V stored
    interleaved, int8 weights) carries the conversion as a second exported program,
    `conversion`: it takes those weights as the caller has them and returns the arrays the
    program takes in their place, sharded as it takes them. Calling the program applies it
    once per set of weight arrays (`convert`); the manifest's `load_conversion` names the
    weights and each input's `converted` what it becomes.
    """

    exported: Any  # jax.export.Exported
    manifest: dict
    # the Compiled it was lowered from (its `records`: every collective the lowering emitted,
    # with the equation that emitted it); None for a program read back from a file
    compiled: Any = field(default=None, repr=False, compare=False)
    conversion: Any = None  # jax.export.Exported of the load-time conversion, if any
    # the converted weights of the last call: (weak references to the caller's arrays, the
    # mesh, the arrays made from them)
    _converted: tuple | None = field(default=None, repr=False, compare=False)

    # ---- saving ---------------------------------------------------------------------------
    def serialize(self) -> bytes:
        return _serialize(self.exported)

    def save(self, path: str | Path) -> Path:
        """Write the artifact to `path` and the manifest to `path`.json (and a load-time
        conversion to `path`.convert); returns the manifest path."""
        data = self.serialize()
        Path(path).write_bytes(data)
        manifest = dict(self.manifest, artifact=Path(path).name, bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest())
        if self.conversion is not None:
            extra = _serialize(self.conversion)
            Path(f"{path}.convert").write_bytes(extra)
            manifest["load_conversion"] = dict(
                manifest["load_conversion"], artifact=f"{Path(path).name}.convert",
                bytes=len(extra), sha256=hashlib.sha256(extra).hexdigest())
        self.manifest = manifest
        out = _manifest_path(path)
        out.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return out

    # ---- inspecting -----------------------------------------------------------------------
    def stablehlo(self) -> str:
        """The module's StableHLO text."""
        return self.exported.mlir_module()

    def collectives(self) -> dict:
        """The collectives in the StableHLO (`stablehlo_collectives`); the load-time
        conversion's, which run once, are not counted."""
        return stablehlo_collectives(self.stablehlo())

    # ---- running --------------------------------------------------------------------------
    def mesh(self, devices=None):
        """A mesh of the manifest's shape over `devices` (default: jax.devices()): x, y, z,
        after `replica` and `stage` (consecutive blocks of the devices, as nodes) when the
        program runs replicas or pipeline stages."""
        from meshwright.passes.compiler import make_mesh

        shape = self.manifest["mesh"]
        if set(shape) <= set(AXES):
            return make_mesh(shape, devices)
        from jax.sharding import AxisType
        from jax.sharding import Mesh as JaxMesh

        from meshwright.validate import enough_devices

        devices = list(devices if devices is not None else jax.devices())
        n = int(np.prod(list(shape.values())))
        enough_devices(n, len(devices), f"a {'x'.join(map(str, shape.values()))} mesh")
        return JaxMesh(np.array(devices[:n]).reshape(tuple(shape.values())), tuple(shape),
                       axis_types=(AxisType.Auto,) * len(shape))

    def __call__(self, *args, mesh=None):
        """Run the program on a mesh of the exported shape (default: the first devices of
        this job), placing the arguments as the manifest says (converting the weights the
        program converts at load time, once)."""
        platform = jax.devices()[0].platform
        platform = {"gpu": "cuda"}.get(platform, platform)
        if platform not in self.exported.platforms:
            raise ValueError(
                f"this program was exported for {', '.join(self.exported.platforms)}, and "
                f"this process runs on {platform}: run it where those devices are, or export "
                f"it again with platforms=('{platform}',) (meshwright export --platform "
                f"{platform})")
        mesh = mesh if mesh is not None else self.mesh()
        n = self.manifest["devices"]
        if mesh.devices.size != n:
            raise ValueError(f"this program runs on {n} devices; the mesh has "
                             f"{mesh.devices.size}")
        flat, tree = jax.tree_util.tree_flatten(args)
        inputs = self.manifest["inputs"]
        # the program takes a converted weight as a tuple of the arrays it becomes
        want, expected = self.exported.in_tree.children()[0], None
        if len(flat) == len(inputs):
            expected = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(tree, [
                tuple(0 for _ in i["converted"]["to"]) if "converted" in i else 0
                for i in inputs]))
        if len(flat) != len(inputs) or expected != want:
            raise ValueError(f"the arguments do not have the exported structure: got {tree}, "
                             f"exported {self._caller_tree()}")
        self._check_shapes(flat)
        from meshwright.runtime.distributed import put

        converted = self.convert(flat, mesh)
        leaves = [converted[k] if k in converted else
                  put(x, NamedSharding(mesh, PartitionSpec(*_spec_from_json(i["spec"]))))
                  for k, (x, i) in enumerate(zip(flat, inputs))]
        return self.exported.call(*jax.tree_util.tree_unflatten(tree, leaves))

    def convert(self, flat: list, mesh) -> dict[int, tuple]:
        """{argument index: the arrays the program takes in its place} for the arguments
        converted at load time, by the exported conversion; the arrays of the last call are
        kept while the caller's weight arrays live, so each set is converted once."""
        indices = [k for k, i in enumerate(self.manifest["inputs"]) if "converted" in i]
        if not indices:
            return {}
        if self._converted is not None:
            refs, on, arrays = self._converted
            if on is mesh and all(r() is flat[k] for r, k in zip(refs, indices)):
                return arrays
        from meshwright.runtime.distributed import put

        specs = [PartitionSpec(*_spec_from_json(self.manifest["inputs"][k]["spec"]))
                 for k in indices]
        outs = iter(self.conversion.call(*[put(flat[k], NamedSharding(mesh, s))
                                           for k, s in zip(indices, specs)]))
        arrays = {k: tuple(next(outs) for _ in self.manifest["inputs"][k]["converted"]["to"])
                  for k in indices}
        try:
            import weakref

            self._converted = ([weakref.ref(flat[k]) for k in indices], mesh, arrays)
        except TypeError:  # not weak-referenceable (numpy scalars): convert every call
            self._converted = None
        return arrays

    def _caller_tree(self):
        """The arguments' structure as the caller passes them: the exported one with each
        converted weight's tuple of arrays as the one array it is converted from."""
        want = self.exported.in_tree.children()[0]
        marks = [(k, j, len(i["converted"]["to"]) if "converted" in i else 0)
                 for k, i in enumerate(self.manifest["inputs"])
                 for j in range(len(i["converted"]["to"]) if "converted" in i else 1)]
        if len(marks) != want.num_leaves:
            return want
        leaves = [_Mark(*m) for m in marks]

        def converted(x) -> bool:  # the whole tuple of one converted weight
            return (isinstance(x, tuple) and len(x) > 0 and isinstance(x[0], _Mark)
                    and x[0].index == 0 and x[0].converted == len(x))

        return jax.tree_util.tree_structure(jax.tree_util.tree_map(
            lambda _: 0, jax.tree_util.tree_unflatten(want, leaves), is_leaf=converted))

    def _check_shapes(self, flat: list) -> None:
        """Refuse arguments of another shape or dtype than exported, naming the first (a
        program is lowered for one batch: JAX would fail deep inside, e.g. IndivisibleError)."""
        for k, (x, want) in enumerate(zip(flat, self.manifest["inputs"])):
            shape = list(np.shape(x))
            dtype = str(x.dtype) if hasattr(x, "dtype") else str(np.asarray(x).dtype)
            if shape != list(want["shape"]) or dtype != want["dtype"]:
                path = want.get("path", f"input {k}")
                raise ValueError(
                    f"{path}: this program was exported for {want['dtype']}"
                    f"{list(want['shape'])}, got {dtype}{shape}; an exported program runs "
                    "the shapes it was lowered at: export it again at these (e.g. meshwright "
                    "export --batch N), or pad the batch to the exported one")


@dataclass(frozen=True)
class _Mark:
    """A leaf of an exported program's arguments: caller argument `argument`, `index` of the
    `converted` arrays it becomes (0 when not converted)."""

    argument: int
    index: int
    converted: int


def _serialize(exported) -> bytes:
    try:
        return bytes(exported.serialize())
    except ImportError as e:  # jax.export imports flatbuffers only here
        raise ImportError(f"serializing an exported program needs the flatbuffers "
                          f"package: pip install flatbuffers ({e})") from None


def _read_artifact(path: Path, sha256: str | None, manifest_path: Path):
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the checksum in {manifest_path.name}: the "
                         "file was changed or truncated; export it again")
    try:
        return jax.export.deserialize(bytearray(data))
    except ImportError as e:
        raise ImportError(f"reading an exported program needs the flatbuffers package: "
                          f"pip install flatbuffers ({e})") from None


def load_exported(path: str | Path) -> ExportedProgram:
    """Read an artifact written by `ExportedProgram.save` / `meshwright export` (and its
    manifest, `path`.json)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported program at {path}")
    manifest_path = _manifest_path(path)
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} has no manifest next to it ({manifest_path.name}); "
                                "it is written with the artifact by ExportedProgram.save")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path} is not a {FORMAT} manifest "
                         f"(format {manifest.get('format')!r})")
    exported = _read_artifact(path, manifest.get("sha256"), manifest_path)
    conversion = None
    if manifest.get("load_conversion"):
        extra = path.parent / manifest["load_conversion"]["artifact"]
        if not extra.exists():
            raise FileNotFoundError(
                f"{path} converts weights when they are loaded, and its conversion "
                f"{extra.name} is missing: copy it with {path.name} and {manifest_path.name}")
        conversion = _read_artifact(extra, manifest["load_conversion"].get("sha256"),
                                    manifest_path)
    return ExportedProgram(exported, manifest, conversion=conversion)


# ---------------------------------------------------------------------------------------------
# Exporting


def _spec_json(spec) -> list:
    return [list(d) if isinstance(d, tuple) else d for d in spec]


def _spec_from_json(spec: list) -> list:
    return [tuple(d) if isinstance(d, list) else d for d in spec]


def _config_json(config) -> dict | None:
    if config is None:
        return None
    return asdict(config) if is_dataclass(config) else dict(config)


def export_sharded(step, *args, platforms: tuple[str, ...] = ("tpu",)) -> ExportedProgram:
    """`step.export(*args, platforms=...)`: lower the compiled program of `step` (a
    ShardedFunction) at these arguments for `platforms` with `jax.export`."""
    import meshwright

    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"unknown platform {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(PLATFORMS)}")
    from meshwright.passes.compiler import convert_argument

    c = step._lowered(args, {})  # lowered for the mesh; not compiled for this host's CPU
    flat, in_tree = jax.tree_util.tree_flatten(args)
    mesh = c.jax_mesh
    # the program's own inputs (after the load-time conversions), in order, and which of
    # them each caller argument becomes: arguments converted at load time turn into one or
    # more program inputs (int8: values, scale), the others into themselves
    program_specs = [s.partition_spec() for s in c.in_specs]
    # (replicas and pipeline stages lower the function at a share of the batch: the program
    # takes the whole batch, `in_shapes`)
    shapes = c.in_shapes or [v.shape for v in c.graph.inputs]
    program_structs = [jax.ShapeDtypeStruct(shape, v.dtype, sharding=NamedSharding(mesh, spec))
                       for shape, v, spec in zip(shapes, c.graph.inputs, program_specs)]
    owned: list[list[int]] = []
    for i, x in enumerate(flat):
        start = sum(len(o) for o in owned)
        steps = c.load_transforms.get(i)
        n = 1 if not steps else len(jax.eval_shape(
            lambda w, steps=steps: convert_argument(steps, w), _struct(x)))
        owned.append(list(range(start, start + n)))
    if sum(len(o) for o in owned) != len(program_structs):
        raise AssertionError(f"{len(flat)} arguments make {sum(len(o) for o in owned)} "
                             f"program inputs; the program takes {len(program_structs)}")
    converted = sorted(c.load_transforms)
    # a converted argument arrives as the program would take it unconverted: sharded as its
    # first converted array is, mapped back through the conversion's dimension order
    specs = [PartitionSpec(*_source_spec(c.load_transforms[i], program_specs[owned[i][0]]))
             if i in c.load_transforms else program_specs[owned[i][0]]
             for i in range(len(flat))]
    structs = [jax.ShapeDtypeStruct(*_shape_dtype(x), sharding=NamedSharding(mesh, spec))
               for x, spec in zip(flat, specs)]
    out_tree = c.graph.out_tree

    def program(*call_args):
        outs = c.jitted(*jax.tree_util.tree_leaves(call_args))
        return jax.tree_util.tree_unflatten(out_tree, outs)

    # converted arguments become tuples of the arrays they turn into (see ExportedProgram)
    leaves = [tuple(program_structs[k] for k in owned[i]) if i in c.load_transforms
              else program_structs[owned[i][0]] for i in range(len(flat))]
    exported = jax.export.export(jax.jit(program), platforms=platforms)(
        *jax.tree_util.tree_unflatten(in_tree, leaves))
    conversion = None
    if converted:
        def convert(*weights):
            return [y for i, w in zip(converted, weights)
                    for y in convert_argument(c.load_transforms[i], w)]

        outs = [NamedSharding(mesh, program_specs[k]) for i in converted for k in owned[i]]
        conversion = jax.export.export(jax.jit(convert, out_shardings=outs),
                                       platforms=platforms)(*[structs[i] for i in converted])
    paths = [_arg_name(step.fn, p[0].idx) + jax.tree_util.keystr(p[1:])
             for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
    out_avals = exported.out_avals
    emitted: dict[str, dict] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for r in c.records:
        emitted[r.kind]["count"] += 1
        emitted[r.kind]["bytes"] += r.bytes
    predicted = c.predicted
    manifest = {
        "format": FORMAT,
        "platforms": list(platforms),
        # axes in the mesh's order: x, y, z, after `replica` and `stage` when the program
        # runs replicas or pipeline stages across nodes
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        "devices": int(mesh.devices.size),
        "layouts": {"ffn": c.ffn_layout, "attention": c.attention_layout},
        "phase": step.phase,
        "hardware": step.hardware,
        "inputs": [_input_json(p, s, i, c.load_transforms.get(i),
                               [program_structs[k] for k in owned[i]])
                   for i, (p, s) in enumerate(zip(paths, structs))],
        "outputs": [{"shape": list(a.shape), "dtype": str(a.dtype),
                     "spec": _spec_json(spec.partition_spec())}
                    for a, spec in zip(out_avals, c.out_specs)],
        "model_config": _config_json(c.config),
        "collectives_emitted": dict(emitted),
        "predicted": None if predicted is None else {
            "comm_bytes_per_chip": int(predicted.comm_bytes_per_chip),
            "step_seconds": float(getattr(predicted, "step_seconds", 0.0) or 0.0)},
        "replicated_fallbacks": list(c.fallbacks),
        "meshwright_version": meshwright.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "calling_convention_version": exported.calling_convention_version,
    }
    if conversion is not None:
        manifest["load_conversion"] = {
            "weights": [paths[i] for i in converted],
            "outputs": sum(len(owned[i]) for i in converted),
            "applied": "once per set of weight arrays, by the loaded program before its "
                       "first call (ExportedProgram.convert)"}
    return ExportedProgram(exported, manifest, compiled=c, conversion=conversion)


def _shape_dtype(x) -> tuple[tuple[int, ...], Any]:
    return tuple(np.shape(x)), (x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _struct(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(*_shape_dtype(x))


def _source_spec(steps: list, spec) -> tuple:
    """The partition spec of an argument before its conversion `steps`, given the spec of
    the first array they make: each step maps it back (`input_spec`); replicated when a step
    cannot say."""
    spec = tuple(spec)
    for step in reversed(steps):
        if not hasattr(step, "input_spec"):
            return ()
        spec = step.input_spec(spec)
    return spec


def _input_json(path: str, struct, index: int, steps: list | None, program: list) -> dict:
    entry = {"path": path, "shape": list(struct.shape), "dtype": str(struct.dtype),
             "spec": _spec_json(struct.sharding.spec)}
    if steps:
        entry["converted"] = {
            "steps": [s.describe() if hasattr(s, "describe") else str(s) for s in steps],
            "to": [{"shape": list(p.shape), "dtype": str(p.dtype),
                    "spec": _spec_json(p.sharding.spec)} for p in program]}
    return entry


def _arg_name(fn, index: int) -> str:
    """The name of positional parameter `index` of `fn` ("params"), else "args[index]"."""
    import inspect

    try:
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    return names[index] if index < len(names) else f"args[{index}]"


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Counting collectives in StableHLO text

_STABLEHLO_KINDS = {"all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
                    "all_reduce": "all-reduce", "all_to_all": "all-to-all",
                    "collective_permute": "collective-permute"}
_MLIR_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
               "ui32": 4, "ui8": 1, "i1": 1, "f8E4M3FN": 1, "f8E5M2": 1}
_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$\-]+)")
_OP = re.compile(r'"?stablehlo\.(all_gather|reduce_scatter|all_reduce|all_to_all|'
                 r'collective_permute)"?')
_CALL = re.compile(r"(?:func\.)?call\s+@([\w.$\-]+)")
_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-zA-Z][a-zA-Z0-9]*)>")
_PAIRS = re.compile(r'source_target_pairs\s*=\s*dense<(?:"0x([0-9A-Fa-f]+)"|(\[[0-9,\s\[\]]*\]))>')


def _tensor_bytes(text: str) -> int:
    m = _TENSOR.search(text)
    if not m:
        return 0
    dims, dtype = m.groups()
    n = int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
    return n * _MLIR_BYTES.get(dtype, 4)


def _ring_size(line: str) -> int:
    """Devices in the ring of a collective_permute: the length of the cycle through the first
    source in its `source_target_pairs` (printed as nested lists or as little-endian int64
    hex). 1 when the pairs cannot be read.

        >>> _ring_size("source_target_pairs = dense<[[0, 1], [1, 2], [2, 0], [3, 3]]>")
        3
    """
    m = _PAIRS.search(line)
    if not m:
        return 1
    if m.group(1):
        flat = np.frombuffer(bytes.fromhex(m.group(1)), dtype="<i8")
    else:
        flat = np.array([int(v) for v in re.findall(r"-?\d+", m.group(2))], dtype=np.int64)
    if flat.size < 2 or flat.size % 2:
        return 1
    to = {int(a): int(b) for a, b in flat.reshape(-1, 2)}
    start = int(flat[0])
    n, d = 1, to.get(start, start)
    while d != start and n <= len(to):
        d = to.get(d, start)
        n += 1
    return n


def stablehlo_collectives(text: str) -> dict:
    """{"count": {kind: n}, "bytes": {kind: bytes}, "total_bytes": n, "model_bytes": n,
    "loops": n} per device per call, from a StableHLO module's text (`Exported.mlir_module()`,
    `Lowered.as_text()`).

    Kinds and byte conventions as `passes/hlo.py`: all-gather counts its result, the others
    their operand. A function's collectives count once per call from `main`. Collectives
    inside a `stablehlo.while` count once per appearance (StableHLO does not state trip
    counts); `loops` counts the while loops, so a caller knows when that matters.

    `model_bytes` is the total as the cost model counts it: a `collective_permute` around a
    ring of N devices counts N/(N-1) of its operand, because the N-1 steps of a looped
    collective einsum (`passes/collective_einsum.py`) each pass one of the N blocks of the
    all-gather or reduce-scatter they replace, which the model counts whole (its output,
    resp. input). Everything else counts as in `bytes`.
    """
    funcs: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            funcs[current] = []
        if current is not None:
            funcs[current].append(line)

    def own(name: str) -> tuple[dict, dict, list[str], int, float]:
        count, nbytes, calls, loops = defaultdict(int), defaultdict(int), [], 0
        ring_extra = 0.0  # what the permutes of looped collective einsums add as blocks
        lines = funcs.get(name, [])
        for i, line in enumerate(lines):
            op = _OP.search(line)
            if op:
                kind = _STABLEHLO_KINDS[op.group(1)]
                count[kind] += 1
                # the op's type ends it: "... : (tensor<..>) -> tensor<..>", maybe lines later
                j = i
                while j < len(lines) - 1 and "->" not in lines[j]:
                    j += 1
                operand, _, result = lines[j].rpartition("->")
                operand = operand.rsplit(" : ", 1)[-1]
                size = _tensor_bytes(result if kind == "all-gather" else operand)
                nbytes[kind] += size
                if kind == "collective-permute":
                    ring = _ring_size(" ".join(lines[i:j + 1]))
                    ring_extra += size / (ring - 1) if ring > 1 else 0.0
            loops += "stablehlo.while" in line
            calls += _CALL.findall(line)
        return count, nbytes, calls, loops, ring_extra

    total_count: dict[str, int] = defaultdict(int)
    total_bytes: dict[str, int] = defaultdict(int)
    loops = 0
    ring_extra = 0.0

    def visit(name: str, times: int, depth: int = 0) -> None:
        nonlocal loops, ring_extra
        if depth > 50 or name not in funcs:
            return
        count, nbytes, calls, own_loops, extra = own(name)
        loops += own_loops
        ring_extra += extra * times
        for k, v in count.items():
            total_count[k] += v * times
            total_bytes[k] += nbytes[k] * times
        for callee in calls:
            visit(callee, times, depth + 1)

    visit("main" if "main" in funcs else next(iter(funcs), ""), 1)
    total = int(sum(total_bytes.values()))
    return {"count": dict(total_count), "bytes": dict(total_bytes), "total_bytes": total,
            "model_bytes": round(total + ring_extra), "loops": loops}


# ---------------------------------------------------------------------------------------------
# A bundled model, planned and exported (`meshwright export`)

DEFAULT_HARDWARE = {"tpu": "tpu-v4", "cuda": "h100", "rocm": "h100", "cpu": "cpu"}


def export_model(model: str, *, platforms: tuple[str, ...] = ("tpu",),
                 mesh: tuple[int, int, int] = (4, 4, 4), phase: str = "decode", batch: int = 8,
                 length: int = 128, max_len: int | None = None, hardware: str | None = None,
                 overrides: tuple[str, ...] | list[str] = (), force_ffn: str | None = None,
                 force_attention: str | None = None,
                 weights: str = "native", strict: bool = False) -> ExportedProgram:
    """Plan a model preset for `mesh` on `hardware`, lower it, and export it for `platforms`.

    Only shapes are needed: the weights and the cache are `jax.ShapeDtypeStruct`s, so a
    large model exports without its parameters in memory. The mesh must exist here (on a
    CPU-only machine, simulate `X*Y*Z` devices before JAX starts; `meshwright export` does).
    `weights="int8"` exports int8 weights: the program takes them converted, and the float
    weights are converted once when it is loaded (`ExportedProgram.conversion`).
    `strict`: refuse (NotAsPlanned) rather than export a program that runs part of the model
    replicated where the plan splits it (the manifest's `replicated_fallbacks` lists them).
    """
    from meshwright.models import build, get_config
    from meshwright.passes.compiler import make_mesh, shard

    from meshwright import validate

    platforms = (platforms,) if isinstance(platforms, str) else tuple(platforms)
    mesh = validate.mesh_shape(mesh, "mesh")
    batch = validate.batch(batch)
    length = validate.length(length)
    max_len = validate.max_len(max_len, "max_len")
    phase = validate.choice(phase, "phase", ("prefill", "decode"))
    weights = validate.choice(weights, "weights", ("native", "int8"))
    config = get_config(model).with_overrides(list(overrides))
    if max_len is not None:
        config = config.replace(max_len=max_len)
    if phase == "prefill":
        validate.length(length, "length", max_len=config.max_len)
    built = build(config)
    validate.enough_devices(int(np.prod(mesh)), jax.device_count(),
                            f"a {'x'.join(map(str, mesh))} mesh")
    args = jax.eval_shape(lambda key: built.example_args(phase, batch=batch, length=length,
                                                         key=key), jax.random.PRNGKey(0))
    # the mesh is the target's (a 4x4x4 slice is a 4x4x4 torus); the planner picks the layouts
    force = {k: v for k, v in (("ffn", force_ffn), ("attention", force_attention)) if v}
    force["mesh"] = tuple(mesh)
    hardware = hardware or DEFAULT_HARDWARE[platforms[0]]
    step = shard(built.fn(phase), mesh=make_mesh(dict(zip(AXES, mesh))), phase=phase,
                 hardware=hardware, force=force, weights=weights, strict=strict)
    program = export_sharded(step, *args, platforms=platforms)
    # the preset's own config (the traced graph's is named after the step function)
    program.manifest["model_config"] = _config_json(config)
    program.manifest["model"] = config.name
    return program
