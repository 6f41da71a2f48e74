"""Run the Python blocks of a markdown file as written, and check the output they show.

    python tests/doc_blocks.py docs/serving.md      # run one file's blocks, report each
    python tests/doc_blocks.py README.md docs/*.md  # several files, in one process

The blocks of one file run in order in one namespace, in a fresh process with 8 simulated CPU
devices, from the repository root with `docs/examples` importable (the examples the docs
quote). Several files run in one such process (`run_files`), one after another, each in a
namespace of its own: what a file registers globally (a pass, a layout, a lowering) stays
registered for the files after it, as in a session that runs them in turn. A block's shown
output is the plain fenced block right after it (only blank lines, or one line ending in ':',
between them); it is compared line by line with what the block printed, `...` matching any
text (as doctest's ELLIPSIS), trailing spaces ignored. A block that must not run says so,
with its reason, in an HTML comment on the line right above its fence:

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
import contextlib, gc, io, json, sys, traceback
sys.path.insert(0, "docs/examples")
files = json.loads(sys.stdin.read())
for doc, codes in files:
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
    del namespace
    gc.collect()  # the file's engines and arrays go before the next file runs
    print("\n@@DOC-RESULTS@@" + json.dumps([doc, results]), flush=True)
"""


def run_files(paths, timeout: float = 1800) -> dict[str, tuple[list[Block], list[dict]]]:
    """Run the blocks not marked "not run" of several files in ONE fresh process, the files in
    order, each in its own namespace; {path as given: (its blocks, one result per block run,
    in order, stopping at the first that raised)}. A file the process died in, and each after
    it, has one failed result holding the process's last output."""
    found, files = {}, []
    for path in paths:
        p = Path(path)
        rel = p.resolve()
        rel = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
        found[str(path)] = blocks(p.read_text())
        files.append((str(path), [(f"{rel}:{b.line}", b.code)
                                  for b in found[str(path)] if b.not_run is None]))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("MESHWRIGHT_TEST_CACHE",
                                                               str(ROOT / ".jax_cache")))
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(files), text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=timeout, check=False)
    done = {}
    for chunk in proc.stdout.split("\n@@DOC-RESULTS@@")[1:]:
        doc, results = json.loads(chunk.splitlines()[0])
        done[doc] = (found[doc], results)
    for doc, _ in files:  # the file the process died in, and those after it
        if doc not in done:
            done[doc] = (found[doc], [{"ok": False, "stdout": "", "error": (
                f"the block runner died before the end of {doc} (exit {proc.returncode}):\n"
                f"{proc.stderr[-3000:]}")}])
    return done


def run_file(path: str | Path, timeout: float = 600) -> tuple[list[Block], list[dict]]:
    """Run the file's blocks not marked "not run" in a fresh process; (its blocks, one result
    per block run, in order, stopping at the first that raised)."""
    return run_files([path], timeout)[str(path)]


def problems_of(path: str | Path, found: list[Block], results: list[dict]) -> list[str]:
    """What differs from the doc in one file's results (empty: every block ran and showed
    what it prints)."""
    run = [b for b in found if b.not_run is None]
    problems = []
    for b, r in zip(run, results):
        where = f"{path}:{b.line}"
        if not r["ok"]:
            problems.append(f"{where} raised:\n{r['error']}")
        elif b.expected is not None and not output_matches(b.expected, r["stdout"]):
            problems.append(f"{where} printed:\n{r['stdout']}\nthe doc shows:\n{b.expected}")
    return problems


def check_file(path: str | Path) -> list[str]:
    """Problems with the file's blocks (empty: every block ran and showed what it prints)."""
    return problems_of(path, *run_file(path))


if __name__ == "__main__":
    ran = run_files(sys.argv[1:])
    for arg in sys.argv[1:]:
        issues = problems_of(arg, *ran[arg])
        print(f"{arg}: {'ok' if not issues else f'{len(issues)} problem(s)'}")
        for issue in issues:
            print(issue)
