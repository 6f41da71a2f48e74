"""Progress bars draw only on a terminal; elsewhere one line per stage. Short reprs."""

import io

from meshwright.progress import QuietBar, bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_away_from_a_terminal_one_line_when_done():
    out = io.StringIO()
    seen = []
    with bar(total=3, desc="serve fused", unit="req", file=out) as b:
        assert isinstance(b, QuietBar)
        for _ in range(3):
            b.update(1)
            b.set_postfix_str("decode 8x64")
            b.refresh()
            seen.append(out.getvalue())
    assert seen == ["", "", ""]  # nothing written while it runs
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve fused: 3 reqs in "), lines
    assert "\r" not in out.getvalue()


def test_iterating_closes_once_and_scales_bytes():
    out = io.StringIO()
    b = bar(["a", "b"], desc="mw.shard", unit="bucket", file=out)
    assert list(b) == ["a", "b"]
    b.close()  # closing again writes nothing more
    assert out.getvalue().count("\n") == 1 and "mw.shard: 2 buckets in" in out.getvalue()
    out = io.StringIO()
    loading = bar(total=3_000_000, desc="loading", unit="B", unit_scale=True, file=out)
    loading.update(2_500_000)
    loading.close()
    assert out.getvalue().startswith("loading: 2.5 MB in ")


def test_nothing_done_nothing_written_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    bar(total=4, desc="idle", file=out).close()
    assert out.getvalue() == ""
    term = _Terminal()
    live = bar(total=2, desc="compiling", unit="bucket", file=term)
    assert not isinstance(live, QuietBar)
    live.update(2)
    live.close()
    assert "compiling" in term.getvalue()


def test_a_plan_prints_in_one_line():
    import meshwright as mw

    p = mw.plan("palm-540b", hardware="tpu-v4", chips=64, batch=64, context=2048,
                phase="decode")
    text = repr(p)
    assert "\n" not in text and len(text) < 300, text
    assert text.startswith("Plan(palm-540b decode batch 64") and p.ffn_layout in text
