"""Text of numbers, layer names and markdown tables; the geometric mean and the top-1 tie band.

``markdown_table`` also writes the tables of ``tools/accuracy_study.py`` and ``tools/thirdparty.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .config import TIE_POINTS


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """0.985 -> '98.5 %'; None / NaN -> '—'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.{digits}f} %"


def fmt_err(x: float | None) -> str:
    """Relative error in 3 significant digits, scientific ('1.23e-02'); None -> '—'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.2e}"


def fmt_count(n: int | None, unit: str = "") -> str:
    """8685568 -> '8.69 M'; 347336 -> '0.347 M'; None -> '—'."""
    if n is None:
        return "—"
    m = n / 1e6
    text = f"{m:.2f} M" if m >= 1 else f"{m:.3f} M"
    return text + (f" {unit}" if unit else "")


def short_layer_name(name: str) -> str:
    """'/stage2/stage2.0/branch1/branch1.0/Conv' -> 'stage2.0/branch1' (else the name unchanged)."""
    parts = [p for p in name.split("/") if p]
    if len(parts) >= 4 and parts[-1] == "Conv" and parts[0].startswith("stage"):
        return f"{parts[1]}/{parts[2]}"
    return name


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column: 'l', 'r' or 'c'."""
    if align is None:
        align = "l" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} characters for {len(headers)} columns")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {len(headers)}")
    marks = {"l": "---", "r": "--:", "c": ":-:"}
    if set(align) - set(marks):
        raise ValueError(f"align characters must be l, r or c; got {align!r}")

    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def geometric_mean(values: Iterable[float]) -> float:
    """Geometric mean of positive values (errors span decades); NaN if there are none."""
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if vals.size == 0:
        return float("nan")
    return float(np.exp(np.mean(np.log(np.maximum(vals, 1e-300)))))


def compare(a: float, b: float, tie: float = TIE_POINTS / 100) -> str:
    """'better' if a > b by more than ``tie``, 'worse' if less by more than ``tie``, else 'tie'.

    A difference of exactly ``tie`` is a tie (checked with a 1e-9 slack for float rounding).
    """
    if a - b > tie + 1e-9:
        return "better"
    if b - a > tie + 1e-9:
        return "worse"
    return "tie"

