"""Every Markdown table in the README and docs/ has as many cells in each row as in its header:
a bare ``|`` inside a cell (even in a code span) splits it on GitHub; write ``\\|``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def cells(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_table_rows_have_the_headers_cells(path):
    lines = path.read_text().split("\n")
    bad, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1]):
            width, j = cells(lines[i]), i
            while j < len(lines) and lines[j].startswith("|"):
                if cells(lines[j]) != width:
                    bad.append(f"{path.name}:{j + 1}: {cells(lines[j]) - 1} cells, the header has {width - 1}")
                j += 1
            i = j
        else:
            i += 1
    assert not bad, "\n".join(bad)
