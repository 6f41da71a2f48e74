"""Two texts of one graph, after two passes, compared: a unified diff or two columns.

    >>> print(diff_text(before, after, "annotate", "collective-einsum"))
    --- annotate
    +++ collective-einsum
    @@ -37,1 +37,1 @@
    -      %50:f32[2,1,8,16]{batch,1,heads,head_dim} = dot_general[...] %43 %24  # block=...
    +      %50:f32[2,1,8,16]{batch,1,heads,head_dim} = dot_general[...] %43 %24  # block=...; ...

Both texts come from `Graph.format()`, which is deterministic, so only what the pass changed
shows. `side_by_side=True` prints every line in two columns of `width // 2` (long lines
wrap within their column), a `|` between lines that differ, `<` / `>` for lines only on
one side.
"""

from __future__ import annotations

import difflib


def diff_text(before: str, after: str, before_name: str = "before",
              after_name: str = "after", side_by_side: bool = False, width: int = 200,
              context: int = 1) -> str:
    """The difference between two graph texts; "" when they are equal."""
    a, b = before.splitlines(), after.splitlines()
    if a == b:
        return ""
    if not side_by_side:
        return "\n".join(difflib.unified_diff(a, b, before_name, after_name, n=context,
                                              lineterm=""))
    col = max(20, (width - 3) // 2)

    def pieces(line: str) -> list[str]:  # long lines wrap inside their column
        return [line[i:i + col] for i in range(0, len(line), col)] or [""]

    def row(left: str, mark: str, right: str) -> list[str]:
        lp, rp = pieces(left), pieces(right)
        n = max(len(lp), len(rp))
        lp, rp = lp + [""] * (n - len(lp)), rp + [""] * (n - len(rp))
        return [f"{x:<{col}} {mark if k == 0 else ' '} {y}".rstrip()
                for k, (x, y) in enumerate(zip(lp, rp))]

    rows = row(before_name, " ", after_name) + [f"{'-' * col}   {'-' * col}"]
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for x in a[i1:i2]:
                rows += row(x, " ", x)
            continue
        left, right = a[i1:i2], b[j1:j2]
        for k in range(max(len(left), len(right))):
            lx = left[k] if k < len(left) else ""
            rx = right[k] if k < len(right) else ""
            rows += row(lx, "|" if lx and rx else ("<" if lx else ">"), rx)
    return "\n".join(rows)
