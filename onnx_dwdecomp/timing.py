"""Interleaved wall-clock timing, shared by ``bench`` and the latency selection (latency.py),
and the record of what timings depend on (:func:`environment`: versions, CPU, threads, providers),
written into the JSON of both.

Why interleave. Machine noise — frequency scaling, a background process, thermal throttling, a
noisy neighbour on a shared host — comes in bursts lasting far longer than one inference. Timing
all runs of A and then all runs of B lets a burst land on one model only and shows up as a fake
speed-up; alternating A and B spreads every burst over both. It also puts every model in the
same cache situation: each call follows a call of another model (with two or more models), so
no model profits from a cache left hot by its own previous call while the other does not.
Python's garbage collector is paused during the timing loop so its pauses do not land at random.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime

from .checks import check_int
from .version import __version__


def interleaved_timings(fns: Sequence[Callable[[], object]], *, runs: int, warmup: int,
                        on_round: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Time several callables in interleaved rounds.

    Each fn is first called ``warmup`` times (fn0 × warmup, then fn1 × warmup, ...), then the fns
    are called in the order fn0, fn1, ..., fn0, fn1, ... for ``runs`` rounds, so machine noise
    hits all alike. The garbage collector is paused while timing.

    Parameters
    ----------
    fns : sequence of zero-argument callables
    runs : int, ≥ 1
        Timed rounds; each fn is timed once per round.
    warmup : int, ≥ 0
        Untimed calls of each fn before the first round.
    on_round : callable, optional
        Called with the 1-based round number after each round (outside the timed calls).

    Returns
    -------
    list of ndarray, shape (runs,)
        Per fn, the seconds each timed call took (``time.perf_counter``), in call order.
    """
    check_int(runs, "--runs", 1)
    check_int(warmup, "--warmup", 0)
    fns = list(fns)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = np.empty((len(fns), runs), dtype=np.float64)
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(runs):
            for i, fn in enumerate(fns):
                t0 = clock()
                fn()
                times[i, r] = clock() - t0
            if on_round is not None:
                on_round(r + 1)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [times[i].copy() for i in range(len(fns))]


def default_threads() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo``, else ``platform.processor()``, else
    ``platform.machine()``, else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, colon, value = line.partition(":")
                if colon and name.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(providers: Sequence[str], threads: int) -> dict:
    """What a timing or a latency decision depends on: package versions, the machine and the
    onnxruntime settings (recorded in the decompose report and in ``bench --json``)."""
    return {
        "onnx_dwdecomp": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "providers": list(providers), "threads": threads,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
