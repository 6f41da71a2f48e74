"""infer-axes and find-blocks on the reference models and on Transformers written by strangers."""

import functools

import jax
import pytest
from meshwright.models import get_config
from meshwright.passes import PassManager
from meshwright.passes.infer_axes import axes_of
from zoo import ZOO

import meshwright as mw

FAMILIES = ("gpt2-tiny", "palm-tiny", "llama-tiny")


@functools.cache
def analysed_model(name, scan, phase):
    cfg = get_config(name).replace(scan_layers=scan)
    g = mw.trace_model(cfg, phase=phase)
    return cfg, PassManager(["infer-axes", "find-blocks"], verify=True).run(g)


@functools.cache
def analysed_zoo(name):
    fn, args = ZOO[name](jax.random.PRNGKey(0))
    return PassManager(["infer-axes", "find-blocks"], verify=True).run(mw.trace(fn, *args))


def all_dot_generals(g):
    return [n for n, _ in g.walk() if n.op == "dot_general"]


def assert_every_dot_general_labelled(g):
    for node in all_dot_generals(g):
        for v in list(node.inputs) + node.outputs:
            roles = axes_of(v)
            assert None not in roles, f"{node.op} {v.shape} at {node.source}: {roles}"


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_reference_models_sizes_and_blocks(name, scan, phase):
    cfg, g = analysed_model(name, scan, phase)
    report = g.meta["axes"]
    assert not report.unknown_primitives and not report.unlabelled and not report.conflicts
    sizes = report.sizes
    assert sizes["batch"] == 2
    assert sizes["embed"] == cfg.d_model and sizes["mlp"] == cfg.d_ff
    # grouped-query heads are split as (kv_heads, groups): the heads dimension is named as
    # their product; the attention block reports the heads whichever the style
    heads = sizes.get("heads") or sizes["kv_heads*groups"]
    assert heads == cfg.n_heads and sizes["head_dim"] == cfg.d_head
    assert sizes["vocab"] == cfg.vocab_size and sizes["kv_length"] == cfg.max_len
    # stacked layers (a scan) have a layers axis; a loop's per-layer arrays have none
    assert sizes.get("layers") == (cfg.n_layers if scan else None)
    if 1 < cfg.n_kv_heads < cfg.n_heads:
        assert sizes["kv_heads"] == cfg.n_kv_heads
        assert sizes["groups"] == cfg.n_heads // cfg.n_kv_heads
    if phase == "prefill":
        assert sizes["length"] == 8
    assert_every_dot_general_labelled(g)

    blocks = g.meta["blocks"]
    assert blocks.count("attention") == blocks.count("ffn") == cfg.n_layers
    assert blocks.count("embedding") == 1 and blocks.count("unembedding") == 1
    assert blocks.count("parallel") == (cfg.n_layers if cfg.parallel_block else 0)
    assert blocks.count("norm") == (cfg.n_layers if cfg.parallel_block else 2 * cfg.n_layers) + 1
    norm_type = {b.detail["type"] for b in blocks.of_kind("norm")}
    assert norm_type == {"rmsnorm" if cfg.norm == "rmsnorm" else "layernorm"}
    activation = {b.detail["activation"] for b in blocks.of_kind("ffn")}
    assert activation == {"swiglu" if cfg.activation == "swiglu" else "gelu"}
    assert not blocks.unclassified
    layers = sorted(d["layer"] for d in blocks.to_list() if d["kind"] == "attention")
    assert layers == list(range(cfg.n_layers))
    for b in blocks.of_kind("attention"):
        assert (b.detail["heads"], b.detail["kv_heads"]) == (cfg.n_heads, cfg.n_kv_heads)


def test_cache_dimensions_are_labelled():
    cfg, g = analysed_model("llama-tiny", True, "decode")
    cache_k = next(v for v in g.inputs if v.producer.params["path"] == "cache.k")
    assert axes_of(cache_k) == ("layers", "batch", "kv_heads", "kv_length", "head_dim")
    text = str(g)
    assert "%cache.k:f32[2,2,2,128,8]{layers,batch,kv_heads,kv_length,head_dim}" in text
    cfg, g = analysed_model("llama-tiny", False, "decode")  # one array per layer
    paths = [v.producer.params["path"] for v in g.inputs]
    for i in range(cfg.n_layers):
        layer_v = g.inputs[paths.index(f"cache.v.{i}")]
        assert axes_of(layer_v) == ("batch", "kv_heads", "kv_length", "head_dim")


EXPECTED = {
    # name: (roles that must be found with their sizes, blocks per kind)
    "einsum": ({"heads": 4, "head_dim": 8, "mlp": 64, "embed": 32, "vocab": 50},
               {"attention": 1, "ffn": 1, "norm": 1, "embedding": 1, "unembedding": 1}),
    "fused_qkv": ({"heads": 4, "head_dim": 8, "fused": 96, "heads*head_dim": 32, "mlp": 64},
                  {"attention": 1, "ffn": 1, "norm": 2, "unembedding": 1}),
    "gqa_dpa": ({"heads": 4, "kv_heads": 2, "groups": 2, "head_dim": 8, "mlp": 64},
                {"attention": 1, "ffn": 1, "norm": 0, "unembedding": 1}),
    "scan_parallel_mqa": ({"heads": 4, "head_dim": 8, "layers": 3, "fused": 2, "mlp": 64},
                          {"attention": 3, "ffn": 3, "parallel": 3, "norm": 3}),
    "flax": ({"heads": 4, "head_dim": 8, "mlp": 64, "vocab": 50},
             {"attention": 2, "ffn": 2, "norm": 5, "embedding": 1, "unembedding": 1}),
    "equinox": ({"heads": 4, "head_dim": 8, "mlp": 64, "vocab": 50},
                {"attention": 2, "ffn": 2, "norm": 4, "embedding": 1, "unembedding": 1}),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_transformers_written_by_strangers(name):
    g = analysed_zoo(name)
    report = g.meta["axes"]
    roles, counts = EXPECTED[name]
    for role, size in {"batch": 2, "length": 8, "embed": 32, **roles}.items():
        assert report.sizes.get(role) == size, (role, report.sizes)
    assert not report.unknown_primitives and not report.unlabelled
    assert_every_dot_general_labelled(g)
    blocks = g.meta["blocks"]
    for kind, count in counts.items():
        assert blocks.count(kind) == count, (kind, blocks.to_list())
    assert not blocks.unclassified


def test_an_unknown_shape_changing_primitive_is_reported_not_guessed():
    import jax.numpy as jnp

    def f(x, w):
        return jnp.fft.rfft(x @ w, axis=-1).real

    g = PassManager(["infer-axes"]).run(mw.trace(f, jnp.ones((2, 8)), jnp.ones((8, 16))))
    (msg,) = g.meta["axes"].unknown_primitives
    assert msg.startswith("fft at ") and "test_axes_and_blocks.py" in msg
    fft = next(n for n in g.equations() if n.op == "fft")
    assert fft.meta["axes"] == [(None, None)]


def test_find_blocks_needs_infer_axes():
    _, g = analysed_model("palm-tiny", False, "decode")
    fresh = mw.trace_model(get_config("palm-tiny"), phase="decode")
    # a ValueError (the caller's mistake), with a note naming the pass and those before it
    with pytest.raises(ValueError, match=r"'find-blocks' pass after the following passes: \[\]"):
        PassManager(["find-blocks"]).run(fresh)
    assert g.meta["blocks"].count("attention") == 2


def test_a_bare_attention_function_without_token_ids():
    import jax.numpy as jnp

    def attention(x, wq, wk, wv, wo):
        q = jnp.einsum("bte,ehd->bthd", x, wq)
        k = jnp.einsum("bte,ehd->bthd", x, wk)
        v = jnp.einsum("bte,ehd->bthd", x, wv)
        p = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
        return jnp.einsum("bhts,bshd,hde->bte", p, v, wo)

    B, T, E, H, D = 2, 8, 32, 4, 8
    args = (jnp.ones((B, T, E)), jnp.ones((E, H, D)), jnp.ones((E, H, D)), jnp.ones((E, H, D)),
            jnp.ones((H, D, E)))
    g = PassManager(["infer-axes", "find-blocks"]).run(mw.trace(attention, *args))
    assert g.meta["axes"].sizes == {"batch": 2, "length": 8, "embed": 32, "heads": 4,
                                    "head_dim": 8}
    assert axes_of(g.inputs[4]) == ("heads", "head_dim", "embed")
    assert_every_dot_general_labelled(g)
    (block,) = g.meta["blocks"].to_list()
    assert block["kind"] == "attention" and block["heads"] == block["kv_heads"] == 4
