"""The user documentation stays a user's: README.md is short (at most :data:`README_MAX_LINES`
lines) and has the sections a user looks for, and neither README.md nor the package's source
carries development history — no commit hashes, no "issue N" (that belongs in CHANGELOG.md and
docs/DESIGN.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

#: A commit hash: a word of 7 to 40 hex characters with at least one letter a–f and one digit
#: (so neither a 7-digit number nor a word such as "defaced" counts).
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
#: A tracker reference: "issue 20", "Issue #20", "issues 12".
ISSUE = re.compile(r"\bissues? #?[0-9]+", re.IGNORECASE)


def history_hits(text: str) -> list[tuple[int, str]]:
    """``(line number, match)`` for every commit hash or issue reference in ``text``."""
    return [(number, m.group(0)) for number, line in enumerate(text.splitlines(), 1)
            for pattern in (HASH, ISSUE) for m in pattern.finditer(line)]


def _files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "onnx_dwdecomp").rglob("*.py"))]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_has_the_sections_a_user_looks_for():
    headings = re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M)
    for wanted in ("Install", "Quick start", "Reading the report", "Choosing how far to go", "Benchmarking",
                   "Exit codes", "Current limits", "Documentation"):
        assert wanted in headings, f"README.md has no '## {wanted}' section"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    assert links
    assert [link for link in links if not link.startswith("http") and not (ROOT / link).exists()] == []


def test_no_history_in_readme_or_package():
    found = [f"{path.relative_to(ROOT)}:{number}: {match}" for path in _files()
             for number, match in history_hits(path.read_text(encoding="utf-8"))]
    assert found == []


def test_the_history_patterns():
    assert history_hits("planner at f5c361a (issue 20), see Issue #15 and 28be92f") == [
        (1, "f5c361a"), (1, "28be92f"), (1, "issue 20"), (1, "Issue #15")]
    # not history: 7-digit numbers, hex-only words without digits, colours inside longer words
    assert history_hits("1000000 samples, a defaced cafe, colour #ffcc00, sha 0123456789abcdef0123456789abcdef01234567ff") == []
    assert history_hits("the issue is 3 points") == []
