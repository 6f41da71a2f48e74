"""Counters and histograms written in Prometheus' text exposition format (version 0.0.4), for
the HTTP server's `GET /metrics`. Small on purpose: the server needs a handful of series, not
a client library.

    >>> h = Histogram("meshwright_step_seconds", "one engine iteration", (0.001, 0.01))
    >>> h.observe(0.002)
    >>> print(h.text())
    # HELP meshwright_step_seconds one engine iteration
    # TYPE meshwright_step_seconds histogram
    meshwright_step_seconds_bucket{le="0.001"} 0
    meshwright_step_seconds_bucket{le="0.01"} 1
    meshwright_step_seconds_bucket{le="+Inf"} 1
    meshwright_step_seconds_sum 0.002
    meshwright_step_seconds_count 1
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def _number(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def family(name: str, kind: str, help: str,
           samples: Iterable[tuple[Mapping[str, str], float]]) -> str:
    """One metric family: its HELP and TYPE lines and a sample per label set."""
    lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return "\n".join(lines)


class Counter:
    """A counter per label set (thread-safe)."""

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0)

    def text(self) -> str:
        with self._lock:
            samples = [(dict(k), v) for k, v in sorted(self._values.items())]
        return family(self.name, "counter", self.help, samples or [({}, 0)])


class Histogram:
    """Observations counted into cumulative buckets (upper bounds `buckets`), with their sum
    and count (thread-safe)."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last: above every bound
        self._sum, self._count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def text(self) -> str:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, c in zip((*self.buckets, "+Inf"), counts):
            cumulative += c
            le = bound if isinstance(bound, str) else _number(float(bound))
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {_number(round(total, 9))}", f"{self.name}_count {n}"]
        return "\n".join(lines)


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition as {'name{labels}': value} (for tests and the load
    benchmark; labels as written).

        >>> parse('# TYPE x counter\\nx{a="1"} 3\\ny 2.5')
        {'x{a="1"}': 3.0, 'y': 2.5}
    """
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
