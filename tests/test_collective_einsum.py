"""collective-einsum: looped programs equal the original function, their HLO has
collective-permutes where the all-gathers / reduce-scatters were, and the same bytes on the
wire; the cost model leaves the CPU mesh alone; the pass diff shows the decisions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from meshwright.models import build, get_config
from meshwright.passes.collective_einsum import CollectiveEinsum, price, ring_perm
from meshwright.passes.hardware import get_hardware
from meshwright.passes.hlo import collective_bytes
from meshwright.passes.sharding import MeshInfo

import meshwright as mw

MESH = (2, 2, 2)


@functools.cache
def case(name, phase="decode"):
    model = build(get_config(name).replace(scan_layers=True, n_layers=1))
    args = model.example_args(phase, batch=8, length=8, key=jax.random.PRNGKey(5))
    return model, args, jax.jit(model.fn(phase))(*args)


@functools.cache
def plain_hlo(name, ffn):
    """The program with plain collectives (the default on the CPU mesh), compiled once."""
    model, args, _ = case(name)
    step = mw.shard(model.decode_step, force={"ffn": ffn, "attention": "heads", "mesh": MESH})
    return step, collective_bytes(step.compiled(*args).compiled.as_text())


@functools.cache
def looped(name, ffn, direction, unroll):
    model, args, _ = case(name)
    step = mw.shard(model.decode_step, force={"ffn": ffn, "attention": "heads", "mesh": MESH},
                    collective_einsum=CollectiveEinsum(mode="on", direction=direction,
                                                       unroll=unroll))
    return step, step(*args)


def assert_close(got, want, tol=1e-5):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


LAYOUTS = [("palm-tiny", "ws-2d", "uni", True), ("llama-tiny", "ws-1d", "bidi", True),
           ("llama-tiny", "wg-xy", "uni", False), ("palm-tiny", "wg-xyz", "bidi", False)]


@pytest.mark.parametrize("name,ffn,direction,unroll", LAYOUTS)
def test_looped_program_equals_the_original_with_the_same_bytes(name, ffn, direction, unroll):
    _, args, want = case(name)
    step, got = looped(name, ffn, direction, unroll)
    assert_close(got, want)
    c = step.compiled(*args)
    decisions = [d for d in c.graph.meta["collective_einsum"] if d.looped]
    assert decisions and all(d.direction == (direction if d.ring_size > 2 else "uni")
                             for d in decisions)
    after = collective_bytes(c.compiled.as_text())
    _, before = plain_hlo(name, ffn)
    # every looped collective is gone from the HLO, once per execution (scan bodies: per layer)
    for kind in ("all-gather", "reduce-scatter"):
        gone = sum(d.trips for d in decisions if d.kind == kind)
        assert after["count"].get(kind, 0) == before["count"].get(kind, 0) - gone, kind
    # ... replaced by N-1 collective-permutes each (fori_loop bodies times their trip count)
    permutes = sum(d.trips * (d.ring_size - 1) for d in decisions)
    assert after["count"]["collective-permute"] == permutes
    assert "collective-permute" not in before["count"]
    assert after["wire"] == before["wire"]  # the same bytes leave every device
    assert step.report(*args)["collective_bytes"]["wire"] == before["wire"]
    for kind in ("all-reduce", "all-to-all"):
        assert after["count"].get(kind) == before["count"].get(kind)


def test_the_weight_gathered_layout_keeps_no_all_gather():
    """wg-xyz gathers every weight over all three axes: all of it becomes ppermutes."""
    step, _ = looped("palm-tiny", "wg-xyz", "bidi", False)
    _, args, _ = case("palm-tiny")
    counts = collective_bytes(step.compiled(*args).compiled.as_text())["count"]
    assert set(counts) == {"collective-permute"}
    assert "while" in step.compiled(*args).compiled.as_text()


def test_the_cpu_mesh_keeps_plain_collectives_and_says_why():
    _, args, want = case("palm-tiny")
    step, _ = plain_hlo("palm-tiny", "ws-2d")
    assert_close(step(*args), want)
    g = step.compiled(*args).graph
    assert g.meta["collective_einsum"] == []
    assert "looping never pays" in step.explain(*args)


def test_the_cost_model_loops_big_matmuls_on_tpu_only():
    # PaLM 540B's FFN input at decode batch 512 on 64 chips, 2D weight-stationary: the
    # all-gather over 16 chips of a (512, 18432/4) bf16 activation before a matmul with a
    # (18432/4, 73728/16) weight block.
    nbytes, n = 512 * 18432 // 4 * 2, 16
    flops = 2 * 512 * (18432 // 4) * (73728 // 16)
    tpu = price(get_hardware("tpu-v4"), nbytes, n, flops, jnp.bfloat16)
    assert tpu["uni"] < 0.9 * tpu["plain"]  # the transfers hide behind the matmuls
    cpu = price(get_hardware("cpu"), nbytes, n, flops, jnp.float32)
    assert min(cpu["uni"], cpu["bidi"]) > cpu["plain"]
    small = price(get_hardware("tpu-v4"), 1024, 8, 2 * 8 * 64 * 32, jnp.float32)
    assert min(small["uni"], small["bidi"]) > small["plain"]  # latency-bound: not worth it


def test_ring_permutation_follows_the_axes_given():
    mesh = MeshInfo({"x": 2, "y": 2, "z": 2})
    # ring positions count over (z, y) with z major; ppermute numbers devices y-major
    assert ring_perm(mesh, ("z", "y"), 1) == [(0, 2), (2, 1), (1, 3), (3, 0)]
    assert ring_perm(mesh, ("x",), -1) == [(0, 1), (1, 0)]


def ffn(x, w_in, w_out):
    return x + jax.nn.relu(x @ w_in) @ w_out


GOLDEN = """\
ffn(%x:f32[4,16]{batch,embed}, %w_in:f32[16,64]{embed,mlp}, %w_out:f32[64,16]{mlp,embed}) {
  %0:f32[4,64]{batch,mlp} = dot_general[dimension_numbers=(((1,), (0,)), ((), ())), \
preferred_element_type=float32] %x %w_in  # block=ffn.0; collective-einsum: looped \
all-gather(z) 256B -> 7 ppermutes (4 steps, bidirectional, unrolled); forced on
  %1:f32[4,64]{batch,mlp} = max %0 0.0:f32[]
  %2:f32[4,16]{batch,embed} = dot_general[dimension_numbers=(((1,), (0,)), ((), ())), \
preferred_element_type=float32] %1 %w_out  # block=ffn.0; collective-einsum: looped \
reduce-scatter(z) 256B -> 7 ppermutes (4 steps, bidirectional, unrolled); forced on
  %3:f32[4,16]{batch,embed} = add %x %2
  return %3
}"""


def test_golden_text_and_the_pass_diff(capsys):
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    args = (jax.random.normal(k[0], (4, 16)), jax.random.normal(k[1], (16, 64)) / 4,
            jax.random.normal(k[2], (64, 16)) / 8)
    step = mw.shard(ffn, force={"ffn": "ws-1d", "attention": "heads", "mesh": (1, 1, 8)},
                    collective_einsum=CollectiveEinsum(mode="on", direction="bidi"))
    assert_close(step(*args), ffn(*args))
    assert step.graph_text(*args, after="collective-einsum") == GOLDEN
    diff = step.diff(*args).splitlines()
    assert diff[:2] == ["--- annotate", "+++ collective-einsum"]
    assert sum(line.startswith("+") and "collective-einsum: looped" in line
               for line in diff) == 2
    assert sum(line.startswith("-  %") for line in diff) == 2
    side = step.diff(*args, side_by_side=True, width=120).splitlines()
    assert all(len(line) <= 120 for line in side)
    assert sum(" | " in line for line in side) == 2
    lowered = str(step.graph(*args, after="collective-einsum"))
    assert "collectives: collective-permute(z) 32B" in lowered
    assert step.diff(*args, before="annotate", after="plan") == ""


def test_cli_inspect_diff(capsys):
    from meshwright.cli import main

    assert main(["inspect", "palm-tiny", "--scan", "--diff", "annotate", "collective-einsum",
                 "--collective-einsum", "on", "--force-ffn", "wg-x", "--force-attention",
                 "heads", "--side-by-side"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["annotate", "collective-einsum"]
    assert "collective-einsum: looped all-gather(x)" in out


def test_a_registered_matmul_lowering_is_asked_before_the_plain_one(monkeypatch):
    """lower's hook: a lowering registered with @matmul_lowering sees each dot_general's
    propagated site first; here one that gathers both operands whole and multiplies on
    every device (correct, more bytes), the other matmuls left to the plain lowering."""
    from meshwright.passes import lower
    from meshwright.passes.sharding import Spec

    seen = []

    def gathered(ctx, site, ins):
        seen.append(site)
        if site.node.inputs[1].shape != (64, 16):  # w_out's matmul only
            return None
        args = []
        for x, spec in ins:
            x, spec = ctx.resolved(x, spec, "test")
            args.append(ctx.to(x, spec, Spec.replicated(len(spec.dims)), "test"))
        return [(lower.bind(site.node, args)[0], Spec.replicated(len(site.node.out.shape)))]

    monkeypatch.setitem(lower.MATMUL_LOWERINGS, "test-gathered", gathered)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    args = (jax.random.normal(k[0], (4, 16)), jax.random.normal(k[1], (16, 64)) / 4,
            jax.random.normal(k[2], (64, 16)) / 8)
    force = {"ffn": "ws-1d", "attention": "heads", "mesh": (1, 1, 8)}
    step = mw.shard(ffn, force=force)
    assert_close(step(*args), ffn(*args))
    assert [s.node.inputs[1].shape for s in seen] == [(16, 64), (64, 16)]
    assert all(len(s.wants) == 2 and s.trips == 1 for s in seen)
    emitted = step.report(*args)["collective_bytes"]["measured"]
    monkeypatch.delitem(lower.MATMUL_LOWERINGS, "test-gathered")
    plain = mw.shard(ffn, force=force).report(*args)["collective_bytes"]["measured"]
    assert emitted > plain  # the whole (64, 16) weight gathered on every device
