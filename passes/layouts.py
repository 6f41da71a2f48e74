"""The layouts: each FFN and attention layout of Pope et al. one object, in one registry.

A layout object says everything the rest of meshwright asks of it:

- its **axis maps**, role -> mesh axes (`stored`: the weights as placed; `use`: as the matmuls
  use them, after a weight-gathered layout's all-gathers; `residual`: activations between
  blocks; `hidden`: inside blocks; `attention_batch`: the batch inside attention over batch),
  which `sharding.make_layout` hands to annotate and lower, and whose `stored` map the engine's
  per-bucket plan compares (`runtime/layouts.py`);
- **when it applies** (`check`: raises `LayoutNotApplicable` with the reason the planner shows);
- its **collectives per layer** (kind, mesh axes, bytes per chip), which the cost model prices;
- a one-line **description** (`layout_table()`, the docs).

The cost model, annotate (through `make_layout`), lower, the engine's per-bucket plan (and
its pinned build's `choose_pin`), the CLI and the layout benchmarks read `FFN` / `ATTENTION`; the names other modules import (`cost_model.FFN_LAYOUTS`,
`sharding.LAYOUT_NAMES_FFN`, ...) are live views of them, in registration order, which is also
the planner's tie-break order.

    >>> [layout.name for layout in FFN.values()]
    ['ws-1d', 'ws-2d', 'wg-x', 'wg-xy', 'wg-xyz']
    >>> FFN["ws-2d"].stored["mlp"], FFN["wg-xy"].use["mlp"], FFN["wg-xy"].gathered
    (('z', 'y'), ('z',), 'xy')

Adding a layout = one object + its tests: another member of a family is one constructor call,
`register(WeightStationary2D("ws-2d-z", "...", e_axes="z", f_axes="xy"))`, a new kind one
subclass of `FFNLayout` / `AttentionLayout`; the planner prices it from then on and mw.shard
lowers it (`tests/test_layout_registry.py` registers that one in a test).

Weights are stored E_x F_(z,y) (heads like F) for ws-2d and every weight-gathered layout, so
prefill and decode can switch between them without moving weights; ws-1d stores E F_xyz.
The order (z, y) keeps every weight-gathered variant a gather of the minor axes.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cost model imports this module
    from meshwright.models.config import TransformerConfig
    from meshwright.passes.cost_model import CostOptions, Mesh, StepWorkload

Axes = tuple[str, ...]
AXES = "xyz"
# Roles split like the FFN's hidden dimension F: the hidden activations and the weights' F side.
HIDDEN_ROLES = ("mlp", "heads", "kv_heads", "fused")


@dataclass(frozen=True)
class Collective:
    """One collective per layer (or per step for embedding ones), as the model counts it."""

    kind: str  # "all-gather" | "reduce-scatter" | "all-to-all"
    axes: str  # mesh axes it spans, e.g. "yz"
    bytes_per_chip: float  # all-gather: output; reduce-scatter: input; all-to-all: data held
    what: str  # which tensor, for explain()
    weights: bool = False  # a weight all-gather (prefetchable) rather than activations


class LayoutNotApplicable(ValueError):
    """This layout cannot run this workload on this mesh (the message says why)."""


def _ring(k: int, ring_correction: bool) -> float:
    return (k - 1) / k if ring_correction else 1.0


def padded_heads(cfg: TransformerConfig, shards: int, options: CostOptions) -> int:
    """Query heads after padding to a multiple of `shards` (whole heads on every chip)."""
    if not options.pad_heads or shards <= 1:
        return cfg.n_heads
    return -(-cfg.n_heads // shards) * shards


# ---------------------------------------------------------------------------------------------
# FFN layouts (Sec. 3.2.1)


@dataclass(frozen=True)
class FFNLayout(abc.ABC):
    """How the weights and the activations of every block are split over the mesh."""

    name: str
    description: str  # one line, for the docs' table

    # ---- axis maps (role -> mesh axes, major first)
    @property
    @abc.abstractmethod
    def stored(self) -> dict[str, Axes]:
        """The weights as placed (and as the embedding table stays)."""

    @property
    def use(self) -> dict[str, Axes]:
        """The weights as the matmuls use them: as stored unless the layout gathers them."""
        return self.stored

    @property
    @abc.abstractmethod
    def residual(self) -> dict[str, Axes]:
        """Activations between blocks."""

    @property
    @abc.abstractmethod
    def hidden(self) -> dict[str, Axes]:
        """Activations inside blocks (mlp, heads, ...)."""

    @property
    @abc.abstractmethod
    def attention_batch(self) -> Axes:
        """The batch axes inside attention over batch."""

    # ---- geometry the cost model reads
    @property
    def gathered(self) -> str:
        """Mesh axes each layer's weights are all-gathered over before use, and the batch is
        split over ('' for a weight-stationary layout)."""
        return ""

    @property
    def rest(self) -> str:
        """The mesh axes not gathered over: what splits the weights in use and the heads."""
        return "".join(a for a in AXES if a not in self.gathered)

    @property
    def splits_batch(self) -> bool:
        """The batch is split over chips (a bucket of batch 1 cannot run it on many)."""
        return bool(self.gathered)

    @property
    def whole_input(self) -> bool:
        """Every chip multiplies the whole input B.L.E (ws-1d): a single K/V head is computed
        on every chip from replicated K/V weights instead of being gathered."""
        return False

    def batch_shards(self, mesh: Mesh) -> int:
        """Chips the batch is split over (1 for weight-stationary)."""
        return mesh.size(self.gathered) if self.gathered else 1

    @abc.abstractmethod
    def check(self, mesh: Mesh, work: StepWorkload) -> None:
        """Raise LayoutNotApplicable if this layout cannot run `work` on `mesh`."""

    @abc.abstractmethod
    def block_collectives(self, mesh: Mesh, tokens: float, e: int, a: int, tag: str,
                          in_width: float, out_width: float) -> list[Collective]:
        """The E-side and hidden-side collectives of one block (attention, FFN, or a parallel
        block's both) whose hidden widths in and out are given; `a` bytes per element."""

    def weight_collectives(self, mesh: Mesh, layer_bytes: float) -> list[Collective]:
        """The all-gathers of a layer's weights (`layer_bytes` in all) before use."""
        return []

    @abc.abstractmethod
    def closed_form(self, tokens: float, e: float, f: float, mesh: Mesh, bandwidth: float,
                    ring_correction: bool, n_matrices: int) -> float:
        """Bandwidth time of one FFN block's collectives: the paper's closed form."""


@dataclass(frozen=True)
class WeightStationary1D(FFNLayout):
    """Weights E F_xyz stay put; each block all-gathers its input over every chip and
    reduce-scatters its output."""

    @property
    def stored(self) -> dict[str, Axes]:
        return {**{r: tuple(AXES) for r in HIDDEN_ROLES}, "vocab": tuple(AXES)}

    @property
    def residual(self) -> dict[str, Axes]:
        return {"embed": tuple(AXES)}

    @property
    def hidden(self) -> dict[str, Axes]:
        return {r: tuple(AXES) for r in HIDDEN_ROLES}

    @property
    def attention_batch(self) -> Axes:
        return tuple(AXES)

    @property
    def whole_input(self) -> bool:
        return True

    def check(self, mesh: Mesh, work: StepWorkload) -> None:
        return None  # runs anything

    def block_collectives(self, mesh, tokens, e, a, tag, in_width, out_width):
        t = tokens
        return [Collective("all-gather", "xyz", t * e * a, f"{tag} input B.L.E"),
                Collective("reduce-scatter", "xyz", t * e * a, f"{tag} output B.L.E")]

    def closed_form(self, tokens, e, f, mesh, bandwidth, ring_correction, n_matrices):
        """2BLE/bw."""
        return 2 * tokens * e * _ring(mesh.n, ring_correction) / bandwidth


@dataclass(frozen=True)
class WeightStationary2D(FFNLayout):
    """Weights E_(e_axes) F_(f_axes) stay put (ws-2d: E_x F_yz): a block all-gathers its input
    B.L.E/X over the F axes, reduce-scatters the hidden B.L.F/YZ over the E axes, all-gathers
    it back and reduce-scatters its output B.L.E/X over the F axes."""

    e_axes: str = "x"
    f_axes: str = "yz"

    def __post_init__(self) -> None:
        if sorted(self.e_axes + self.f_axes) != sorted(AXES) or not self.e_axes \
                or not self.f_axes:
            raise ValueError(f"{self.name}: the E and F axes must split x, y, z between them, "
                             f"got E {self.e_axes!r}, F {self.f_axes!r}")

    @property
    def _f(self) -> Axes:
        return tuple(reversed(self.f_axes))  # F_(z,y): minor axes first to go when gathered

    @property
    def stored(self) -> dict[str, Axes]:
        # The vocabulary (embedding and unembedding) is split like the residual stream:
        # lookups reduce-scatter into it, logits stay split over the vocabulary.
        return {"embed": tuple(self.e_axes), **{r: self._f for r in HIDDEN_ROLES},
                "vocab": tuple(self.e_axes) + self._f}

    @property
    def residual(self) -> dict[str, Axes]:
        return {"embed": tuple(self.e_axes) + self._f}

    @property
    def hidden(self) -> dict[str, Axes]:
        return {r: self._f + tuple(self.e_axes) for r in HIDDEN_ROLES}

    @property
    def attention_batch(self) -> Axes:
        # batch is (x, z, y): the query's partial sums over x scatter onto batch and its heads
        # (z, y) follow with one all-to-all
        return tuple(self.e_axes) + self._f

    def check(self, mesh, work):
        if mesh.size(self.e_axes) == 1 and mesh.n > 1:
            raise LayoutNotApplicable(f"{self.name} with {self.e_axes.upper()} = 1 is ws-1d")

    def block_collectives(self, mesh, tokens, e, a, tag, in_width, out_width):
        t, x, yz = tokens, mesh.size(self.e_axes), mesh.size(self.f_axes)
        ex, fyz = self.e_axes.upper(), self.f_axes.upper()
        return [
            Collective("all-gather", self.f_axes, t * e / x * a, f"{tag} input B.L.E/{ex}"),
            Collective("reduce-scatter", self.e_axes, t * in_width / yz * a,
                       f"{tag} hidden B.L.F/{fyz}"),
            Collective("all-gather", self.e_axes, t * out_width / yz * a,
                       f"{tag} hidden B.L.F/{fyz}"),
            Collective("reduce-scatter", self.f_axes, t * e / x * a,
                       f"{tag} output B.L.E/{ex}")]

    def closed_form(self, tokens, e, f, mesh, bandwidth, ring_correction, n_matrices):
        """(2BL/bw)(E/X + F/YZ); optimum X = sqrt(nE/F), 8BLE/(sqrt(n) bw)."""
        t, x, yz = tokens, mesh.size(self.e_axes), mesh.size(self.f_axes)
        return (2 * t * e / x * _ring(yz, ring_correction)
                + 2 * t * f / yz * _ring(x, ring_correction)) / bandwidth


@dataclass(frozen=True)
class WeightGathered(FFNLayout):
    """Weights stored E_x F_zy, each layer's all-gathered over N chips (the `over` axes: x, xy
    or xyz) before use; the batch is split over those N chips and activations B/N.L.E move
    over the other axes."""

    over: str = "x"

    def __post_init__(self) -> None:
        if self.over not in ("x", "xy", "xyz"):
            raise ValueError(f"{self.name}: a weight-gathered layout gathers the minor axes of "
                             f"its stored weights E_x F_zy: over 'x', 'xy' or 'xyz', "
                             f"not {self.over!r}")

    @property
    def gathered(self) -> str:
        return self.over

    @property
    def _batch(self) -> Axes:
        return tuple(self.over)

    @property
    def _rest(self) -> Axes:
        return tuple(a for a in ("z", "y") if a not in self.over)

    @property
    def stored(self) -> dict[str, Axes]:
        return {"embed": ("x",), **{r: ("z", "y") for r in HIDDEN_ROLES}, "vocab": self._rest}

    @property
    def use(self) -> dict[str, Axes]:
        return {"embed": (), "vocab": self._rest, **{r: self._rest for r in HIDDEN_ROLES}}

    @property
    def residual(self) -> dict[str, Axes]:
        return {"batch": self._batch, "embed": self._rest}

    @property
    def hidden(self) -> dict[str, Axes]:
        return {"batch": self._batch, **{r: self._rest for r in HIDDEN_ROLES}}

    @property
    def attention_batch(self) -> Axes:
        return self._batch + self._rest

    def check(self, mesh, work):
        gathered, n = mesh.size(self.over), mesh.n
        if gathered < 2:
            raise LayoutNotApplicable(f"{self.name} gathers over {gathered} chip: same as ws-2d")
        if self.rest and gathered == n:
            raise LayoutNotApplicable(f"{self.name} gathers over all {n} chips: same as wg-xyz")
        if work.batch < gathered:
            raise LayoutNotApplicable(
                f"{self.name} splits the batch over {gathered} chips but batch is {work.batch}")

    def block_collectives(self, mesh, tokens, e, a, tag, in_width, out_width):
        if not self.rest:
            return []
        per = tokens / mesh.size(self.over) * e * a
        return [Collective("all-gather", self.rest, per, f"{tag} input B/N.L.E"),
                Collective("reduce-scatter", self.rest, per, f"{tag} output B/N.L.E")]

    def weight_collectives(self, mesh, layer_bytes):
        return [Collective("all-gather", self.over, layer_bytes * mesh.size(self.over) / mesh.n,
                           "layer weights", weights=True)]

    def closed_form(self, tokens, e, f, mesh, bandwidth, ring_correction, n_matrices):
        """2EFN/(n bw) + 2BLE/(N bw); optimum N = sqrt(BLn/F)."""
        n, big_n = mesh.n, mesh.size(self.over)
        weights = n_matrices * e * f * big_n / n * _ring(big_n, ring_correction)
        if ring_correction and not self.rest:
            acts = 0.0
        else:
            acts = 2 * tokens * e / big_n * _ring(n // big_n, ring_correction)
        return (weights + acts) / bandwidth


# ---------------------------------------------------------------------------------------------
# Attention layouts (Sec. 3.3)


@dataclass(frozen=True)
class AttentionLayout(abc.ABC):
    """How Q, K, V and the KV cache are split inside attention."""

    name: str
    description: str  # one line, for the docs' table

    @property
    @abc.abstractmethod
    def splits_batch(self) -> bool:
        """Attention runs split over sequences (its heads move onto the batch)."""

    @abc.abstractmethod
    def check(self, cfg: TransformerConfig, mesh: Mesh, work: StepWorkload, ffn: FFNLayout,
              options: CostOptions) -> None:
        """Raise LayoutNotApplicable if attention cannot run this way under `ffn`."""

    @abc.abstractmethod
    def head_shards(self, ffn: FFNLayout, mesh: Mesh) -> int:
        """Chips the query heads are split over."""

    @abc.abstractmethod
    def kv_share(self, cfg: TransformerConfig, mesh: Mesh, batch: int,
                 ffn: FFNLayout) -> tuple[int, int]:
        """(KV heads, sequences) of the KV cache one chip holds."""

    @abc.abstractmethod
    def collectives(self, mesh: Mesh, ffn: FFNLayout, tokens: float, q_width: int,
                    kv_width: int, kv_heads: int, d_head: int, a: int) -> list[Collective]:
        """The collectives attention adds to a layer under `ffn` (`a` bytes per element)."""


@dataclass(frozen=True)
class OverHeads(AttentionLayout):
    """Q/K/V and the KV cache split by heads over the axes the FFN layout does not split the
    batch over; multiquery keeps its K/V head on every chip."""

    @property
    def splits_batch(self) -> bool:
        return False

    def check(self, cfg, mesh, work, ffn, options):
        if not ffn.rest:
            raise LayoutNotApplicable(f"{ffn.name} already splits attention by batch")
        shards = self.head_shards(ffn, mesh)
        heads = padded_heads(cfg, shards, options)
        if heads < shards:
            raise LayoutNotApplicable(
                f"attention over heads: {cfg.n_heads} heads cannot cover {shards} chips")
        if heads > options.max_head_padding * cfg.n_heads:
            raise LayoutNotApplicable(
                f"attention over heads: {cfg.n_heads} heads padded to {heads} for {shards} "
                "chips wastes more than half the attention")

    def head_shards(self, ffn, mesh):
        return mesh.n // ffn.batch_shards(mesh)

    def kv_share(self, cfg, mesh, batch, ffn):
        groups = ffn.batch_shards(mesh)
        shards = mesh.n // groups
        return -(-cfg.n_kv_heads // shards), -(-batch // groups)

    def collectives(self, mesh, ffn, tokens, q_width, kv_width, kv_heads, d_head, a):
        rest = ffn.rest
        if not (kv_heads < mesh.size(rest) and rest) or (ffn.whole_input and kv_heads == 1):
            return []
        # Multiquery / GQA over heads: every chip needs the K/V heads its queries use. When
        # every chip holds the whole input B.L.E (ws-1d) and there is one K/V head, each chip
        # projects that head itself from the (small, replicated) K/V weights: nothing moves.
        per_chip_tokens = tokens / max(1, mesh.size(ffn.gathered))
        return [Collective("all-gather", rest, per_chip_tokens * 2 * d_head * a,
                           "K,V replicated for heads")]


@dataclass(frozen=True)
class OverBatch(AttentionLayout):
    """Q/K/V and the KV cache split by sequences over every chip: an all-to-all moves Q, K, V
    from heads to batch and the output back."""

    @property
    def splits_batch(self) -> bool:
        return True

    def check(self, cfg, mesh, work, ffn, options):
        if work.batch < mesh.n:
            raise LayoutNotApplicable(
                f"attention over batch needs batch >= chips ({work.batch} < {mesh.n})")

    def head_shards(self, ffn, mesh):
        return 1

    def kv_share(self, cfg, mesh, batch, ffn):
        return cfg.n_kv_heads, -(-batch // mesh.n)

    def collectives(self, mesh, ffn, tokens, q_width, kv_width, kv_heads, d_head, a):
        rest = ffn.rest
        if not rest:
            return []
        return [Collective("all-to-all", rest, tokens * (q_width + kv_width) / mesh.n * a,
                           "Q,K,V heads->batch"),
                Collective("all-to-all", rest, tokens * q_width / mesh.n * a,
                           "attention out batch->heads")]


# ---------------------------------------------------------------------------------------------
# The registry


FFN: dict[str, FFNLayout] = {}
ATTENTION: dict[str, AttentionLayout] = {}


class Names(Sequence):
    """The names of a registry, live (a layout registered later shows up), in registration
    order. Hashable (by identity), so a dataclass can take it as a field's default."""

    def __init__(self, registry: Mapping[str, object]) -> None:
        self._registry = registry

    def __getitem__(self, i):
        return tuple(self._registry)[i]

    def __len__(self) -> int:
        return len(self._registry)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._registry))

    def __contains__(self, name) -> bool:
        return name in self._registry

    def index(self, name, *bounds) -> int:  # the planner's tie-break, once per candidate
        return tuple(self._registry).index(name, *bounds)

    def __repr__(self) -> str:
        return repr(tuple(self._registry))


FFN_NAMES = Names(FFN)
ATTENTION_NAMES = Names(ATTENTION)


def register(layout: FFNLayout | AttentionLayout) -> FFNLayout | AttentionLayout:
    """Add a layout to its registry (after those there: last in the planner's tie-break)."""
    if isinstance(layout, FFNLayout):
        registry, kind = FFN, "FFN"
    elif isinstance(layout, AttentionLayout):
        registry, kind = ATTENTION, "attention"
    else:
        raise TypeError(f"register takes an FFNLayout or an AttentionLayout, got "
                        f"{type(layout).__name__}")
    if layout.name in registry:
        raise ValueError(f"{kind} layout {layout.name!r} is already registered; "
                         f"unregister it first")
    registry[layout.name] = layout
    return layout


def unregister(name: str) -> None:
    """Take a layout out of its registry."""
    for registry in (FFN, ATTENTION):
        if name in registry:
            del registry[name]
            return
    raise KeyError(f"no layout named {name!r} is registered")


def ffn_layout(name: str) -> FFNLayout:
    """The registered FFN layout `name`; a ValueError naming the known ones otherwise."""
    try:
        return FFN[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown FFN layout {name!r}; known: {', '.join(FFN)}") from None


def attention_layout(name: str) -> AttentionLayout:
    """The registered attention layout `name`; a ValueError naming the known ones otherwise."""
    try:
        return ATTENTION[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention layout {name!r}; known: {', '.join(ATTENTION)}") from None


def layout_table() -> str:
    """The registry as a markdown table (the docs show it; a test keeps them equal)."""
    rows = ["| layout | kind | what it does |", "|---|---|---|"]
    rows += [f"| `{f.name}` | FFN | {f.description} |" for f in FFN.values()]
    rows += [f"| `{a.name}` | attention | {a.description} |" for a in ATTENTION.values()]
    return "\n".join(rows)


for _layout in (
    WeightStationary1D("ws-1d", "weight-stationary 1D: weights `E F_xyz` stay put; a block "
                       "all-gathers its input `B.L.E` over every chip, reduce-scatters its "
                       "output"),
    WeightStationary2D("ws-2d", "weight-stationary 2D: weights `E_x F_yz` stay put; a block "
                       "moves `B.L.E/X` over yz and `B.L.F/YZ` over x", e_axes="x",
                       f_axes="yz"),
    WeightGathered("wg-x", "weight-gathered over x: each layer's weights all-gathered over X "
                   "chips, the batch split over them", over="x"),
    WeightGathered("wg-xy", "weight-gathered over xy: each layer's weights all-gathered over "
                   "XY chips, the batch split over them", over="xy"),
    WeightGathered("wg-xyz", "weight-gathered over xyz: each layer's weights all-gathered over "
                   "every chip, the batch split over them", over="xyz"),
    OverHeads("heads", "attention over heads: Q, K, V and the KV cache split by heads "
              "(multiquery: every chip keeps the K/V head)"),
    OverBatch("batch", "attention over batch: Q, K, V and the KV cache split by sequences, "
              "an all-to-all in and out"),
):
    register(_layout)
