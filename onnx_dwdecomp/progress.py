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
