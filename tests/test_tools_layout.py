"""The rules of tools/ (docs/TOOLS.md): every tools/**/*.py is at most 600 lines, opens with a
module docstring whose first line says what it is for, and is listed in docs/TOOLS.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import TOOLS

MAX_LINES = 600
TOOLS_MD = TOOLS.parent / "docs" / "TOOLS.md"
FILES = sorted(TOOLS.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(TOOLS).as_posix()


def test_tools_found():
    assert {"thirdparty.py", "repro/config.py"} <= {_name(p) for p in FILES}


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_tool_at_most_600_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"tools/{_name(path)} has {lines} lines (at most {MAX_LINES}): split it"


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_tool_docstring_first_line_states_purpose(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
    assert doc and doc.strip(), f"tools/{_name(path)} has no module docstring"
    first = doc.splitlines()[0].strip()
    assert len(first) >= 20, f"tools/{_name(path)}: first docstring line too short to say its purpose: {first!r}"
    rest = doc.splitlines()[1:]
    # a one-line summary: the sentence ends on the first line (a blank line or nothing follows)
    assert not rest or not rest[0].strip(), (
        f"tools/{_name(path)}: the docstring's first line should be a whole summary, followed by a "
        f"blank line (it runs on: {rest[0].strip()!r})")


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_tool_listed_in_tools_md(path):
    text = TOOLS_MD.read_text(encoding="utf-8")
    assert re.search(rf"^\|\s*`{re.escape(_name(path))}`\s*\|", text, re.M), (
        f"tools/{_name(path)} is not listed in docs/TOOLS.md (add a row: file, purpose, command, needs)")
