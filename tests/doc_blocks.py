"""Run the Python blocks of a markdown file as written, and check the output they show.

    python tests/doc_blocks.py docs/serving.md      # run one file's blocks, report each

The blocks of one file run in order in one namespace, in a fresh process with 8 simulated CPU
devices, from the repository root with `docs/examples` importable (the examples the docs
quote). A block's shown output is the plain fenced block right after it (only blank lines, or
one line ending in ':', between them); it is compared line by line with what the block printed,
`...` matching any text (as doctest's ELLIPSIS), trailing spaces ignored. A block that must
not run says so, with its reason, in an HTML comment on the line right above its fence:

    <!-- not run: needs a TPU slice -->

`tests/test_docs.py` runs every file of README.md and docs/ this way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->\s*$")
DEVICES = 8


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    code: str
    expected: str | None  # the output shown after it, if any
    not_run: str | None  # the reason, when marked


def blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text, each with its shown output and marker."""
    lines = text.splitlines()
    fences = []  # (start, end, language): the lines of the fences
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            fences.append((i, j, m.group(1)))
            i = j + 1
        else:
            i += 1
    out = []
    for k, (start, end, lang) in enumerate(fences):
        if lang != "python":
            continue
        expected = None
        if k + 1 < len(fences) and fences[k + 1][2] == "":
            between = [s for s in lines[end + 1:fences[k + 1][0]] if s.strip()]
            if not between or (len(between) == 1 and between[0].rstrip().endswith(":")):
                nxt = fences[k + 1]
                expected = "\n".join(lines[nxt[0] + 1:nxt[1]])
        marker = NOT_RUN.match(lines[start - 1]) if start else None
        out.append(Block(start + 1, "\n".join(lines[start + 1:end]) + "\n", expected,
                         marker.group(1) if marker else None))
    return out


def output_matches(expected: str, got: str) -> bool:
    """Line by line, `...` matching any text within a line, or any lines when alone on one."""
    pattern = []
    for line in expected.rstrip().splitlines():
        line = line.rstrip()
        if line.strip() == "...":
            pattern.append(r"(?:.*\n)*?")
            continue
        pattern.append(".*".join(re.escape(part) for part in line.split("...")) + r"[ \t]*\n")
    got = "\n".join(s.rstrip() for s in got.rstrip().splitlines()) + "\n"
    return re.fullmatch("".join(pattern), got) is not None


_DRIVER = r"""
import contextlib, io, json, sys, traceback
sys.path.insert(0, "docs/examples")
codes = json.loads(sys.stdin.read())
namespace = {"__name__": "__doc__"}
results = []
for name, code in codes:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, name, "exec"), namespace)
        results.append({"ok": True, "stdout": buf.getvalue()})
    except BaseException:
        results.append({"ok": False, "stdout": buf.getvalue(),
                        "error": traceback.format_exc(limit=-3)})
        break
print("\n@@DOC-RESULTS@@" + json.dumps(results))
"""


def run_file(path: str | Path, timeout: float = 600) -> tuple[list[Block], list[dict]]:
    """Run the file's blocks not marked "not run"; (its blocks, one result per block run, in
    order, stopping at the first that raised)."""
    path = Path(path)
    found = blocks(path.read_text())
    rel = path.resolve()
    rel = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    codes = [(f"{rel}:{b.line}", b.code) for b in found if b.not_run is None]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(codes), text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=timeout, check=False)
    _, sep, tail = proc.stdout.rpartition("\n@@DOC-RESULTS@@")
    if not sep:
        raise RuntimeError(f"{rel}: the block runner died (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return found, json.loads(tail)


def check_file(path: str | Path) -> list[str]:
    """Problems with the file's blocks (empty: every block ran and showed what it prints)."""
    found, results = run_file(path)
    run = [b for b in found if b.not_run is None]
    problems = []
    for b, r in zip(run, results):
        where = f"{path}:{b.line}"
        if not r["ok"]:
            problems.append(f"{where} raised:\n{r['error']}")
        elif b.expected is not None and not output_matches(b.expected, r["stdout"]):
            problems.append(f"{where} printed:\n{r['stdout']}\nthe doc shows:\n{b.expected}")
    return problems


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        issues = check_file(arg)
        print(f"{arg}: {'ok' if not issues else f'{len(issues)} problem(s)'}")
        for issue in issues:
            print(issue)
