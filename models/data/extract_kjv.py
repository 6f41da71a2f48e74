"""Re-create `kjv_excerpt.txt` from Debian's King James Bible packages.

    apt-get install bible-kjv        # the `bible` program; pulls in bible-kjv-text (the text)
    python models/data/extract_kjv.py

Writes the books listed in BOOKS, one chapter per paragraph: a "Book N" heading line, then
one verse per line (verse numbers dropped, the program's line wrapping undone), chapters
separated by a blank line. ASCII only.
"""

from __future__ import annotations

import os
import re
import subprocess

BOOKS = ("Genesis", "Exodus", "Ruth", "Jonah", "Psalms", "Proverbs", "Ecclesiastes",
         "Matthew", "Mark")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kjv_excerpt.txt")


def chapters_of(raw: str) -> dict[str, list[tuple[str, list[str]]]]:
    """The `bible` program's output as {book: [(chapter, [verse, ...]), ...]}."""
    books: dict[str, list[tuple[str, list[str]]]] = {}
    book = None
    for line in raw.splitlines():
        heading = re.match(r"^([1-3]?\s?[A-Z][A-Za-z ]+?) (\d+)$", line)
        if heading:
            book = heading.group(1)
            books.setdefault(book, []).append((heading.group(2), []))
            continue
        verse = re.match(r"^\s+(\d+) (.*)$", line)
        if verse:
            books[book][-1][1].append(verse.group(2))
        elif line.strip():  # a wrapped verse goes on
            books[book][-1][1][-1] += " " + line.strip()
    return books


def main() -> None:
    raw = subprocess.run(["bible", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    books = chapters_of(raw)
    parts = [f"{book} {chapter}\n" + "".join(v.strip() + "\n" for v in verses)
             for book in BOOKS for chapter, verses in books[book]]
    text = "\n".join(parts)
    assert text.isascii()
    with open(OUT, "w", encoding="ascii") as f:
        f.write(text)
    print(f"wrote {OUT}: {len(parts)} chapters, {len(text):,} bytes")


if __name__ == "__main__":
    main()
