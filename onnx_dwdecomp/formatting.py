"""How sizes and shapes are written in messages, tables and the report: one rule each."""

from __future__ import annotations

from collections.abc import Iterable


def fmt_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; whole bytes below 1 KiB, binary units up to PiB."""
    n = float(n)
    if abs(n) >= 1 << 60:
        return f"{n:.2g} bytes"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def fmt_shape(shape: Iterable[object]) -> str:
    """A shape as Python writes a tuple — ``(1, 3, 224, 224)``, ``(5,)``, ``()`` — with ``?``
    for an unknown (None) dim; other entries (``"N"``) as they are."""
    parts = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
