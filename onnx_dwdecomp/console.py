"""What the command line shows while it works and when it is done: progress lines on stderr
(:class:`Progress`) and the final text on stdout (:func:`print_to_stdout`). Shared by the
decompose command (cli.py) and ``bench`` (bench.py)."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """Status lines on stderr: one line rewritten in place on a terminal; elsewhere one line per
    message, at most one per ``interval`` seconds (0: every message)."""

    def __init__(self, stream=None, interval: float = 0.0):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.last = -float("inf")

    def __call__(self, msg: str) -> None:
        if not self.tty:
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
        try:  # progress is best-effort: a closed stderr must not stop the job
            self.stream.write("\r\033[K" + msg if self.tty else msg + "\n")
            self.stream.flush()
        except OSError:
            self.tty, self.interval = False, float("inf")

    def close(self) -> None:
        """Clear the terminal line (progress is transient)."""
        if self.tty:
            try:
                self.stream.write("\r\033[K")
                self.stream.flush()
            except OSError:
                pass


def print_to_stdout(text: str) -> None:
    """Print the final text; a reader that stopped early (``| head``) is not an error — the
    files are written by then — and the rest goes nowhere."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
