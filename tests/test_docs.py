"""Every Python block in README.md and docs/ runs as written, and prints what the doc shows.

One fresh process (8 simulated CPU devices) runs the files the session selected, one after
another, each file's blocks in order in a namespace of its own (tests/doc_blocks.py); each
file passes or fails as its own test. A block that must not run carries
`<!-- not run: REASON -->` on the line above its fence."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_blocks import ROOT, Block, blocks, check_file, output_matches, problems_of, run_files

DOCS = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *ROOT.glob("docs/**/*.md")]
              if "```python" in p.read_text())


def test_the_docs_have_python_blocks():
    assert "README.md" in DOCS and "docs/serving.md" in DOCS and len(DOCS) >= 10


@pytest.fixture(scope="module")
def ran(request):
    """The blocks of every doc this session runs a test of, in one process (starting the
    interpreter, JAX and the imports once, not once per file)."""
    selected = [item.callspec.params["doc"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_python_blocks_run_as_written"]
    return run_files([ROOT / doc for doc in selected])


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run_as_written(ran, doc):
    problems = problems_of(doc, *ran[str(ROOT / doc)])
    assert not problems, "\n\n".join(problems)


def test_blocks_markers_and_shown_output():
    lines = ["```python", "print(1)", "```", "", "prints:", "", "```", "1", "```",
             "<!-- not run: needs a TPU slice -->", "```python", "tpu_only()", "```",
             "```python", "x = 2", "```", "", "Some prose.", "More.", "", "```", "not output",
             "```", "```bash", "ls", "```"]
    text = "\n".join(lines)
    assert blocks(text) == [Block(1, "print(1)\n", "1", None),
                            Block(11, "tpu_only()\n", None, "needs a TPU slice"),
                            Block(14, "x = 2\n", None, None)]


@pytest.mark.parametrize("expected, got, ok", [
    ("a 1\nb", "a 1\nb\n", True),
    ("ttft ... ms", "ttft 2.47 ms", True),
    ("ttft ... ms", "ttft 2.47 s", False),
    ("first\n  ...\nlast", "first\nx\ny\nlast", True),
    ("first\n...\nlast", "first\nlast", True),
    ("a", "a\nb", False),
    ("a (1)", "a (1)   \n", True),
])
def test_output_matching(expected, got, ok):
    assert output_matches(expected, got) is ok


def test_a_block_that_raises_is_reported_with_its_line(tmp_path: Path):
    doc = tmp_path / "doc.md"
    doc.write_text("```python\nx = 1\n```\n\n```python\nprint(x)\n```\n\n```\n2\n```\n\n"
                   "```python\nraise ValueError('boom')\n```\n")
    problems = check_file(doc)
    assert len(problems) == 2
    assert ":5 printed:\n1\n" in problems[0] and "the doc shows:\n2" in problems[0]
    assert ":13 raised:" in problems[1] and "ValueError: boom" in problems[1]
