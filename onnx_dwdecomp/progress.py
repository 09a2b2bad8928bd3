"""Progress lines of a job's long phases: one reporter for the job, not a parameter threaded
through every signature.

:func:`reporting` installs the job's reporter (``decompose(progress=...)``; the CLI's prints to
stderr) in a :class:`contextvars.ContextVar` for the duration of the job; any stage calls
:func:`say`. Worker threads see it when they run in a copy of the job's context (the
calibration driver submits its work that way), and two jobs in two threads never see each
other's reporter.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

_REPORTER: ContextVar[Callable[[str], None] | None] = ContextVar("onnx_dwdecomp_progress", default=None)


@contextlib.contextmanager
def reporting(reporter: Callable[[str], None] | None) -> Iterator[None]:
    """``reporter`` receives every :func:`say` line inside the block (None: nothing is shown)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def say(message: str) -> None:
    """One short status line for the current job's reporter, if any."""
    reporter = _REPORTER.get()
    if reporter is not None:
        reporter(message)


class Steps:
    """Progress of a phase of ``total`` steps, with the time left once it can be told: after
    the first step, the mean pace so far times the steps to go ("probe 45/112 conv7, ~4 min
    left")."""

    def __init__(self, phase: str, total: int):
        self.phase, self.total, self.start = phase, total, time.perf_counter()

    def step(self, k: int, what: str = "") -> None:
        """Step ``k`` (0-based) is starting."""
        elapsed = time.perf_counter() - self.start
        left = f", ~{_duration(elapsed / k * (self.total - k))} left" if k and elapsed >= 1.0 else ""
        say(f"{self.phase} {k + 1}/{self.total}{' ' + what if what else ''}{left}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
