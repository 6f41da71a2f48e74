"""One validator per kind of value a user gives meshwright, shared by the CLI and the API.

Every command-line flag and every API argument of one kind goes through the same function,
so `--batch 0`, `export --batch -4` and `mw.plan(batch=0)` fail the same way: an
`InvalidArgument` (a ValueError) that names the value as the caller spelled it, what was
wrong and what to do. The command line prints it as one line (`meshwright <cmd>: error: ...`,
or `{"error": ...}` with `--json`) and exits 2.

    >>> from meshwright.validate import mesh_shape, positive_int
    >>> mesh_shape("2x4")
    (2, 4, 1)
    >>> positive_int(-4, "--batch")
    Traceback (most recent call last):
    ...
    meshwright.validate.InvalidArgument: --batch -4: must be a whole number >= 1

A validator takes the value and the name to call it by (`"--batch"` on the command line,
`"batch"` in Python) and returns the value in its canonical form (an int, a 3-tuple of axis
sizes, a Path). None is never a silent "default": arguments that have a default take None
for it, and 0 is refused like any other bad count.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

AXES = ("x", "y", "z")


class InvalidArgument(ValueError):
    """A value given to meshwright that it cannot use.

    `name`: the argument as the caller spelled it (`--mesh`, `mesh`); `value`: what was given;
    `problem`: what is wrong with it; `fix`: what to give instead (may be empty).
    """

    def __init__(self, name: str, value: Any, problem: str, fix: str = "", *,
                 text: str | None = None) -> None:
        self.name, self.value, self.problem, self.fix = name, value, problem, fix
        text = text or f"{name} {_show(value)}: {problem}"  # `text`: the sentence, if phrased
        super().__init__(f"{text}; {fix}" if fix else text)


def _show(value: Any) -> str:
    if isinstance(value, Path):
        return repr(str(value))
    return repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value: Any, name: str, fix: str) -> int:
    """An int from an int (numpy's too) or its decimal text; anything else is refused."""
    if _is_int(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidArgument(name, value, "not a whole number", fix)


# ---------------------------------------------------------------------------------------------
# Numbers


def positive_int(value: Any, name: str, fix: str = "") -> int:
    """A whole number >= 1 (a count of sequences, tokens, devices, requests, ...)."""
    n = _as_int(value, name, fix)
    if n < 1:
        raise InvalidArgument(name, n, "must be a whole number >= 1", fix)
    return n


def non_negative_int(value: Any, name: str, fix: str = "") -> int:
    """A whole number >= 0 (a seed, a count where none is meaningful)."""
    n = _as_int(value, name, fix)
    if n < 0:
        raise InvalidArgument(name, n, "must be a whole number >= 0", fix)
    return n


def optional_positive_int(value: Any, name: str, fix: str = "") -> int | None:
    """None (meaning: the documented default) or a whole number >= 1. 0 is not a default."""
    return None if value is None else positive_int(value, name, fix)


def _as_number(value: Any, name: str, fix: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise InvalidArgument(name, value, "not a number", fix) from None
    else:
        raise InvalidArgument(name, value, "not a number", fix)
    if not math.isfinite(x):
        raise InvalidArgument(name, value, "not a finite number", fix)
    return x


def positive_number(value: Any, name: str, fix: str = "") -> float:
    """A finite number > 0 (a rate, a timeout)."""
    x = _as_number(value, name, fix)
    if x <= 0:
        raise InvalidArgument(name, x, "must be a number > 0", fix)
    return x


def non_negative_number(value: Any, name: str, fix: str = "") -> float:
    """A finite number >= 0 (an interval, a window)."""
    x = _as_number(value, name, fix)
    if x < 0:
        raise InvalidArgument(name, x, "must be a number >= 0", fix)
    return x


def fraction(value: Any, name: str, fix: str = "") -> float:
    """A number in (0, 1] (a share of memory)."""
    x = _as_number(value, name, fix)
    if not 0 < x <= 1:
        raise InvalidArgument(name, x, "must be in (0, 1]", fix)
    return x


def int_range(value: Any, name: str, fix: str = "") -> tuple[int, int]:
    """A pair (a, b) of whole numbers with 1 <= a <= b (lengths drawn uniformly in [a, b])."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise InvalidArgument(name, value, "not two whole numbers A B", fix) from None
    lo, hi = positive_int(lo, name, fix), positive_int(hi, name, fix)
    if lo > hi:
        raise InvalidArgument(name, (lo, hi), "the range A B needs A <= B",
                              fix or f"e.g. {name} {hi} {lo}")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# The kinds of count meshwright takes


def batch(value: Any, name: str = "batch") -> int:
    """Sequences per step: a whole number >= 1."""
    return positive_int(value, name, "a step runs 1 or more sequences")


def length(value: Any, name: str = "length", max_len: int | None = None) -> int:
    """Tokens per sequence (a prompt length, a context): >= 1, and <= max_len when given."""
    n = positive_int(value, name, "a sequence has 1 or more tokens")
    if max_len is not None and n > max_len:
        raise InvalidArgument(name, n, f"is longer than max_len={max_len}",
                              f"shorten it or raise max_len to {n}")
    return n


def max_len(value: Any, name: str = "max_len") -> int | None:
    """KV length per sequence, prompt + output: None (the model's) or a whole number >= 2
    (one prompt token and one generated)."""
    if value is None:
        return None
    n = _as_int(value, name, "")
    if n < 2:
        raise InvalidArgument(name, n, "must be a whole number >= 2 (a prompt token and an "
                              "output token)", "or leave it out for the model's own")
    return n


def device_count(value: Any, name: str = "devices") -> int:
    """How many devices to run on: a whole number >= 1."""
    return positive_int(value, name, "1 runs on one device, no mesh")


def enough_devices(needed: int, available: int, what: str) -> None:
    """Refuse `what` (e.g. "a 4x4x4 mesh") when it needs more devices than JAX has; on CPU
    the fix is the XLA flag, set before JAX starts."""
    if needed > available:
        raise InvalidArgument(
            what, needed, f"needs {needed} devices and JAX has {available}",
            text=f"{what} needs {needed} devices and JAX has {available}",
            fix=f"on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before "
            "JAX is imported (the meshwright command does this itself)")


def mesh_shape(value: Any, name: str = "mesh") -> tuple[int, int, int]:
    """A mesh's (x, y, z) sizes from "2x2x2" (one to three sizes), a dict over the axes x, y,
    z (missing ones 1), or a sequence of one to three sizes. Every size a whole number >= 1.

        >>> mesh_shape({"y": 4})
        (1, 4, 1)
    """
    fix = "e.g. 2x2x2 (x, y, z)"
    if isinstance(value, str):
        parts = value.strip().lower().split("x")
        sizes = [_as_int(p, name, fix) if p.strip() else None for p in parts]
        if None in sizes:
            raise InvalidArgument(name, value, "a mesh is sizes joined by x", fix)
    elif isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in AXES)
        if unknown:
            raise InvalidArgument(name, dict(value), f"no axis named {', '.join(unknown)}; "
                                  "mesh axes are named x, y, z", fix)
        sizes = [value.get(a, 1) for a in AXES]
        for a, s in zip(AXES, sizes):
            if not _is_int(s) or s < 1:
                raise InvalidArgument(name, dict(value), f"axis {a} is {s!r}; every size "
                                      "must be a whole number >= 1", fix)
    elif isinstance(value, Sequence):
        sizes = list(value)
    else:
        raise InvalidArgument(name, value, "not a mesh shape", fix)
    if not 1 <= len(sizes) <= 3:
        raise InvalidArgument(name, value, f"{len(sizes)} axes; a mesh has one to three "
                              "(x, y, z)", fix)
    for s in sizes:
        if not _is_int(s) or s < 1:
            raise InvalidArgument(name, value, "every size must be a whole number >= 1",
                                  fix)
    return tuple(int(s) for s in sizes) + (1,) * (3 - len(sizes))


def slice_chips(chips: Any, hardware: Any, name: str = "chips") -> int:
    """A chip count the hardware comes in: one slice / node (one of the profile's
    `slice_chips` when it lists them, else any count up to `max_chips`), or, where a job may
    span several (`max_nodes`), that many equal ones (TPU Multislice, GPU nodes).

        >>> slice_chips(64, "tpu-v4")
        64
    """
    from meshwright.passes.hardware import get_hardware

    n = positive_int(chips, name, "a plan needs 1 or more chips")
    hw = get_hardware(hardware)
    one = tuple(hw.slice_chips) or tuple(range(1, hw.max_chips + 1))
    if n in one:
        return n
    max_nodes = getattr(hw, "max_nodes", 1) if getattr(hw, "spans_nodes", False) else 1
    if any(n % s == 0 and 2 <= n // s <= max_nodes for s in one):
        return n  # n // s equal slices / nodes of s chips
    if n > hw.max_chips and max_nodes == 1:
        raise InvalidArgument(name, n, f"{hw.name} connects at most {hw.max_chips} chips in "
                              "one slice/node", f"use at most {hw.max_chips}")
    if n > hw.max_chips:
        raise InvalidArgument(name, n, f"not {hw.name} slices/nodes of equal size (at most "
                              f"{max_nodes} of up to {hw.max_chips} chips)",
                              f"use a multiple of a slice size, e.g. {hw.max_chips * 2}")
    below = [c for c in one if c < n]
    above = [c for c in one if c > n]
    near = " or ".join(str(c) for c in (below[-1:] + above[:1]))
    raise InvalidArgument(name, n, f"{hw.name} slices do not come in {n} chips",
                          f"the nearest sizes are {near} (all: {', '.join(map(str, one))})")


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """One of `choices` (a layout name, a phase, a policy)."""
    if value not in choices:
        raise InvalidArgument(name, value, "not one of the choices",
                              f"choose from {', '.join(choices)}")
    return value


# ---------------------------------------------------------------------------------------------
# Files and programs


def output_file(value: Any, name: str) -> Path:
    """A file to write: its folder must exist (meshwright creates no folders) and the path
    must not be a folder."""
    path = Path(os.fspath(value))
    if path.is_dir():
        raise InvalidArgument(name, path, "a folder", "give a file name inside it")
    folder = path.parent
    if not folder.is_dir():
        raise InvalidArgument(name, path, f"its folder {folder} does not exist",
                              f"create it first (mkdir -p {folder}) or write elsewhere")
    return path


def input_file(value: Any, name: str) -> Path:
    """A file to read: it must exist and be a file."""
    path = Path(os.fspath(value))
    if path.is_dir():
        raise InvalidArgument(name, path, "a folder, not a file", "give the file's path")
    if not path.exists():
        raise InvalidArgument(name, path, "no such file", "check the path")
    return path


def input_dir(value: Any, name: str) -> Path:
    """A folder to read (a checkpoint directory): it must exist and be a folder."""
    path = Path(os.fspath(value))
    if not path.exists():
        raise InvalidArgument(name, path, "no such folder", "check the path")
    if not path.is_dir():
        raise InvalidArgument(name, path, "a file, not a folder", "give the folder")
    return path


def command(argv: Sequence[str], name: str = "command") -> list[str]:
    """A program to run and its arguments: the program must be on PATH or an executable
    file."""
    argv = list(argv)
    if not argv:
        raise InvalidArgument(name, argv, "no program given", "give the program after --, e.g. "
                              "-- python job.py")
    program = argv[0]
    if shutil.which(program) is None:
        where = "not an executable file" if os.sep in program else "not a program on PATH"
        if os.sep in program and not os.path.exists(program):
            where = "no such file"
        raise InvalidArgument(name, program, where,
                              "give a program on PATH or the path of an executable file")
    return argv
