"""What every pass does, as golden text: the printed graph before -> after each stage of
`mw.shard`'s pipeline on one small model.

The model: palm-tiny's decode step (2 parallel layers, multiquery, RoPE), batch 8, lowered
FFN ws-2d / attention batch on a 2x2x2 mesh with collective-einsum forced on (on the CPU
profile "auto" never loops). Two passes have nothing to do there and run on a neighbour:
quantize-int8 on the same step with `weights="int8"`, interleave-fused on gpt2-tiny (its fused
`c_attn`); weights-first runs on the traced step alone (one device, as the engine runs it).

`tests/golden/passes/NN-<pass>.txt` holds, for the pass run NN-th:
  1. `results`: what the pass wrote besides the text (graph-level reports; per-node records
     named as the text names the values), or "(none)";
  2. `text`: the unified diff of the graph text before -> after the pass (1 line of context;
     "(unchanged)" when the pass writes only results). `00-trace.txt` has the whole text.

The test fails when a pass's output drifts. After an intended change, regenerate every file
and read the change in `git diff tests/golden`:

    python tests/test_golden_passes.py
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # regeneration: the simulated 8-device mesh, as conftest sets it
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest
from meshwright.ir.diff import diff_text
from meshwright.ir.printer import value_names
from meshwright.models import build, get_config
from meshwright.passes import STAGES as PIPELINE_STAGES
from meshwright.passes import PassManager

import meshwright as mw

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "passes")
REGENERATE = "python tests/test_golden_passes.py"
# Every stage of mw.shard's pipeline in the order it runs, then the one-device pass.
STAGES = (*PIPELINE_STAGES, "weights-first")
FORCE = {"ffn": "ws-2d", "attention": "batch", "mesh": (2, 2, 2)}


def golden_path(stage: str) -> str:
    return os.path.join(GOLDEN, f"{STAGES.index(stage):02d}-{stage}.txt")


# ---- what each pass wrote besides the text -------------------------------------------------


def _per_node(g, keys: tuple[str, ...]) -> list[str]:
    """`%name = op: key=value` for every node (regions included) carrying one of `keys`."""
    names = value_names(g)
    lines = []
    for node, _ in g.walk():
        for key in keys:
            if key in node.meta:
                value = node.meta[key]
                text = ({k: str(v) for k, v in value.items()} if isinstance(value, dict)
                        else [str(v) for v in value] if isinstance(value, (list, tuple))
                        else str(value))
                lines.append(f"{names[node.outputs[0].id]} = {node.op}: {key}={text}")
    return lines


def _results(stage: str, g, compiled=None) -> list[str]:
    meta = g.meta
    if stage == "infer-axes":
        axes = meta["axes"].to_dict()
        return [f"{k}: {axes[k]}" for k in sorted(axes)]
    if stage == "find-blocks":
        return [str(b) for b in meta["blocks"].to_list()]
    if stage == "fuse-parallel-block":
        return [f"fused parallel blocks: {meta['fused_parallel_blocks']}"]
    if stage == "plan":
        from meshwright.passes.plan import config_from_graph, workload_from_graph

        best = meta["plan"].best
        return [str(config_from_graph(g)), str(workload_from_graph(g)),
                (f"planner's best: FFN {best.ffn_layout}, attention {best.attention_layout}, "
                 f"mesh {best.mesh.x}x{best.mesh.y}x{best.mesh.z}")]
    if stage == "annotate":
        return ([f"layout: {meta['layout']}"]
                + [f"input {n}: {s}" for n, s in zip(
                    [value_names(g)[v.id] for v in g.inputs], meta["in_specs"])]
                + _per_node(g, ("target", "operand_target"))
                + [f"outputs: {[str(s) for s in meta['out_specs']]}"])
    if stage == "interleave-fused":
        paths = [v.producer.params.get("path") for v in g.inputs]
        return ([f"load transform {paths[i]}: {'; '.join(t.describe() for t in ts)}"
                 for i, ts in sorted(meta.get("load_transforms", {}).items())]
                + _per_node(g, ("interleave",)))
    if stage == "quantize-int8":
        return [f"{w.path}: reduce axes {w.reduce_axes}, stored layout {w.layout}"
                for w in meta["quantize-int8"].weights]
    if stage == "collective-einsum":
        return [str(d) for d in meta["collective_einsum"]]
    if stage == "lower":
        return ([f"{r.kind}({','.join(r.axes)}) {r.bytes}B at {r.site}: {r.note}"
                 for r in compiled.records]
                + [f"ran replicated: {f}" for f in compiled.fallbacks])
    if stage == "weights-first":
        return [f"stored transposed: {p}" for p in meta["weights-first"]]
    return []


def _page(stage: str, before: str | None, after: str, results: list[str]) -> str:
    lines = [f"// pass {stage}: see {os.path.basename(__file__)}; regenerate: {REGENERATE}",
             "// results", *(results or ["(none)"]), "// text"]
    if before is None:
        lines.append(after)
    else:
        lines.append(diff_text(before, after, "before", f"after {stage}", context=1)
                     or "(unchanged)")
    return "\n".join(lines) + "\n"


def _watch(step, xs, keep: tuple[str, ...]) -> dict[str, str]:
    """Compile `step` afresh; the golden page of every stage in `keep`."""
    seen: list[tuple[str, str, object]] = []
    pages: dict[str, str] = {}

    def printer(name, g):
        text = g.format()
        if name in keep and name != "lower":
            pages[name] = _page(name, seen[-1][1] if seen else None, text, _results(name, g))
        seen.append((name, text, g))

    compiled = step.compile_watched(printer, *xs)
    if "lower" in keep:
        before = next(text for name, text, _ in reversed(seen) if name != "lower")
        pages["lower"] = _page("lower", before, seen[-1][1],
                               _results("lower", compiled.graph, compiled))
    return pages


def generate() -> dict[str, str]:
    """Every stage's golden page, computed now."""
    mesh = mw.make_mesh({"x": 2, "y": 2, "z": 2})
    palm = build(get_config("palm-tiny"))
    xs = palm.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(0))
    pages = _watch(mw.shard(palm.fn("decode"), mesh=mesh, hardware="cpu", force=FORCE,
                            collective_einsum="on"), xs,
                   keep=tuple(s for s in STAGES if s not in ("interleave-fused",
                                                             "quantize-int8")))
    pages.update(_watch(mw.shard(palm.fn("decode"), mesh=mesh, hardware="cpu", force=FORCE,
                                 collective_einsum="on", weights="int8"), xs,
                        keep=("quantize-int8",)))
    gpt2 = build(get_config("gpt2-tiny"))
    gxs = gpt2.example_args("decode", batch=8, length=8, key=jax.random.PRNGKey(0))
    pages.update(_watch(mw.shard(gpt2.fn("decode"), mesh=mesh, hardware="cpu", force=FORCE),
                        gxs, keep=("interleave-fused",)))
    g = mw.trace(palm.fn("decode"), *xs)
    before = g.format()
    g = PassManager(["weights-first"], verify=True).run(g)
    pages["weights-first"] = _page("weights-first", before, g.format(),
                                   _results("weights-first", g))
    return pages


@pytest.fixture(scope="module")
def pages():
    return generate()


@pytest.mark.parametrize("stage", STAGES)
def test_pass_output_matches_its_golden_text(pages, stage):
    with open(golden_path(stage)) as f:
        want = f.read()
    got = pages[stage]
    if got != want:
        drift = diff_text(want, got, "golden", "now", context=1)
        pytest.fail(f"pass {stage!r} no longer prints {os.path.relpath(golden_path(stage))}; "
                    f"if the change is intended, run `{REGENERATE}` and review git diff:\n"
                    f"{drift[:4000]}")


def test_every_pass_has_a_golden_file_and_shows_its_work(pages):
    assert sorted(os.listdir(GOLDEN)) == sorted(os.path.basename(golden_path(s))
                                                for s in STAGES)
    for stage in STAGES[1:]:  # a page where the pass did nothing would explain nothing
        page = pages[stage]
        results = page.split("// results\n")[1].split("// text\n")[0]
        assert results != "(none)\n" or "(unchanged)" not in page, stage


if __name__ == "__main__":
    os.makedirs(GOLDEN, exist_ok=True)
    for stage, page in generate().items():
        with open(golden_path(stage), "w") as f:
            f.write(page)
        print(f"wrote {os.path.relpath(golden_path(stage))}", file=sys.stderr)
