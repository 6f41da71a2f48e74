"""infer-axes' solver state: a symbol per tensor dimension, and which symbols are one.

`Symbols` is a union-find over dimension symbols that also records *products* (a reshape that
merges `H` and `D` into `H*D`: the whole and its ordered factors) and *pieces* (a slice, split
or concatenation: the piece and the whole it was cut from); `canonicalize` unifies wholes with
the same factors or pieces to a fixpoint. `AxisContext` is what a rule of `axis_rules` works
with: the symbols of each value's dimensions (made on first use) and the three ways to say two
dimensions are one (`same`, `link`, or `syms.unify` directly).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from meshwright.ir import Literal


class Symbols:
    """Union-find over dimension symbols, with sizes, products and pieces."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.products: dict[int, tuple[int, ...]] = {}  # whole -> ordered factors
        self.pieces: dict[int, int] = {}  # piece -> whole it was sliced/split from
        self.conflicts: list[str] = []

    def fresh(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def unify(self, a: int, b: int, why: str = "") -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.conflicts.append(f"sizes {self.size[ra]} and {self.size[rb]} differ ({why})")
            return
        lo, hi = min(ra, rb), max(ra, rb)  # the older symbol stays the root: deterministic
        self.parent[hi] = lo

    def set_product(self, whole: int, factors: list[int]) -> None:
        factors = [f for f in factors if self.size[f] != 1]
        if len(factors) == 1:
            self.unify(whole, factors[0], "reshape of a single factor")
        elif factors:
            self.products[whole] = tuple(factors)

    def canonicalize(self) -> None:
        """Unify wholes with the same factors and factors of unified wholes, to a fixpoint."""
        changed = True
        while changed:
            changed = self.canonicalize_pieces()
            by_factors: dict[tuple[int, ...], int] = {}
            by_whole: dict[int, tuple[int, ...]] = {}
            for whole, factors in list(self.products.items()):
                w = self.find(whole)
                # A last factor of size 2 is compared by size: interleaved RoPE splits head_dim
                # into (head_dim/2, 2) and stacks two halves into a new size-2 axis; the two
                # "2" axes are one axis, but no dataflow links them.
                fs = tuple(-2 if k == len(factors) - 1 and k > 0 and self.size[f] == 2
                           else self.find(f) for k, f in enumerate(factors))
                if fs in by_factors and by_factors[fs] != w:
                    self.unify(by_factors[fs], w, "same factors")
                    changed = True
                by_factors.setdefault(fs, w)
                other = by_whole.get(w)
                if other is not None and other != fs and len(other) == len(fs) and all(
                        a == b or (a >= 0 and b >= 0 and self.size[a] == self.size[b])
                        for a, b in zip(other, fs)):
                    for a, b in zip(other, fs):
                        if a >= 0 and b >= 0 and self.find(a) != self.find(b):
                            self.unify(a, b, "factors of one product")
                            changed = True
                by_whole.setdefault(w, fs)

    def canonicalize_pieces(self) -> bool:
        """Wholes of equal size cut into a common piece are one symbol (RoPE cuts head_dim in
        halves and concatenates them back into head_dim)."""
        pieces_of: dict[int, set[int]] = defaultdict(set)
        for piece, whole in self.pieces.items():
            pieces_of[self.find(whole)].add(self.find(piece))
        owner: dict[tuple[int, int], int] = {}  # (whole size, piece) -> a whole
        changed = False
        for whole, ps in sorted(pieces_of.items()):
            for p in sorted(ps):
                key = (self.size[whole], p)
                other = owner.setdefault(key, whole)
                if self.find(other) != self.find(whole):
                    self.unify(other, whole, "same pieces")
                    changed = True
        return changed

    def factors(self, s: int) -> tuple[int, ...] | None:
        r = self.find(s)
        for whole, fs in self.products.items():
            if self.find(whole) == r:
                return tuple(self.find(f) for f in fs)
        return None

    def part_index(self) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
        """`factors` and `whole_of` of every class at once, as {class: factors} and
        {class: whole}: one pass over the products and pieces instead of one per class
        (which was quadratic in depth). Valid until the next `unify`."""
        factors: dict[int, tuple[int, ...]] = {}
        for whole, fs in self.products.items():
            factors.setdefault(self.find(whole), tuple(self.find(f) for f in fs))
        wholes: dict[int, int] = {}
        for piece, whole in self.pieces.items():
            p, w = self.find(piece), self.find(whole)
            if p != w:
                wholes.setdefault(p, w)
        return factors, wholes

    def whole_of(self, s: int) -> int | None:
        """The symbol s was sliced or split out of, if any."""
        r = self.find(s)
        for piece, whole in self.pieces.items():
            if self.find(piece) == r and self.find(whole) != r:
                return self.find(whole)
        return None


@dataclass
class AxisContext:
    syms: Symbols
    dims: dict[int, list[int]]  # value id -> symbol per dimension
    unknown: list[str]

    def of(self, v: Any) -> list[int]:
        if isinstance(v, Literal):
            return []
        if v.id not in self.dims:
            self.dims[v.id] = [self.syms.fresh(s) for s in v.shape]
        return self.dims[v.id]

    def same(self, a: Any, b: Any, why: str) -> None:
        da, db = self.of(a), self.of(b)
        for x, y in zip(da, db):
            self.syms.unify(x, y, why)

    def link(self, v: Any, i: int, w: Any, j: int, why: str) -> None:
        """Dimension i of v is dimension j of w (when both are real, non-size-1 dims)."""
        dv, dw = self.of(v), self.of(w)
        if self.syms.size[dv[i]] == self.syms.size[dw[j]] and self.syms.size[dv[i]] != 1:
            self.syms.unify(dv[i], dw[j], why)


__all__ = ["AxisContext", "Symbols"]
