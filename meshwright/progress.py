"""Progress for long work: a live bar on a terminal, one line when it ends otherwise.

A tqdm bar redraws itself several times a second; written to a file or a pipe (CI logs, a
server's journal, `2> log`) that is tens of kilobytes of carriage returns. `bar` gives tqdm
only when the stream is a terminal; anywhere else it counts silently and, when closed,
writes one line such as

    compiling palm-kjv: 12 buckets in 8.4 s

Both objects take the same calls (iteration, `update`, `n` set directly and `refresh`,
`set_postfix_str`, `close`, `with`), so callers need not know which they hold.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import IO, Self


def _is_terminal(stream: IO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable: Iterable | None = None, *, desc: str, unit: str = "it",
        total: float | None = None, unit_scale: bool = False, leave: bool = False,
        file: IO | None = None, summary: bool = True):
    """A progress bar over `iterable` (or counting to `total`): tqdm on a terminal, else a
    `QuietBar` that writes one summary line on close (none with `summary=False`)."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, unit_scale=unit_scale,
                    leave=leave, file=stream)
    return QuietBar(iterable, desc=desc, unit=unit, total=total, unit_scale=unit_scale,
                    file=stream if summary else None)


class QuietBar:
    """What `bar` returns away from a terminal: tqdm's interface, no redraws."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, unit: str = "it",
                 total: float | None = None, unit_scale: bool = False,
                 file: IO | None = None):
        self.iterable = iterable
        self.desc = desc
        self.unit = unit
        self.unit_scale = unit_scale
        self.file = file
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.n = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self):
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.n += 1
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        """Nothing to redraw."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def summary(self) -> str:
        """`desc: n units in t s` (bytes as MB/GB with unit_scale)."""
        seconds = time.perf_counter() - self._start
        if self.unit_scale:
            return f"{self.desc}: {_scaled(self.n)}{self.unit} in {seconds:.1f} s"
        unit = self.unit + ("s" if self.n != 1 and not self.unit.endswith("s") else "")
        return f"{self.desc}: {self.n:g} {unit} in {seconds:.1f} s"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.file is not None and self.n:
            print(self.summary(), file=self.file, flush=True)


def _scaled(n: float) -> str:
    """1536000 -> '1.5 M' (as tqdm's unit_scale: decimal prefixes).

        >>> _scaled(1536000), _scaled(512)
        ('1.5 M', '512 ')
    """
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {prefix}"
    return f"{n:g} "
