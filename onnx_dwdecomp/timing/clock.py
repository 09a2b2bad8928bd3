"""Interleaved wall-clock timing, shared by ``bench`` and the latency selection (timing/latency.py),
and the record of what timings depend on (:func:`environment`: versions, CPU, threads, providers),
written into the JSON of both.

Why interleave. Machine noise — frequency scaling, a background process, thermal throttling, a
noisy neighbour on a shared host — comes in bursts lasting far longer than one inference. Timing
all runs of A and then all runs of B lets a burst land on one model only and shows up as a fake
speed-up; alternating A and B spreads every burst over both. It also puts every model in the
same cache situation: each call follows a call of another model (with two or more models), so
no model profits from a cache left hot by its own previous call while the other does not.
Python's garbage collector is paused during the timing loop so its pauses do not land at random.

Which clock. At one intra-op thread onnxruntime runs in the calling thread, so that thread's
CPU time (``time.thread_time``) measures the run while barely seeing other processes: a
timing taken beside CPU hogs reads like one taken on a quiet machine (cache and memory-bandwidth
effects remain). With more threads the work is spread over onnxruntime's own threads and only
the wall clock measures it (the process's CPU clock sums the other threads' time only at
scheduler ticks: ×0.78 for a one-conv plan that `bench` measured at ×0.99). So the machine's
load is measured over the rounds (:class:`OthersLoad`: what other processes used of the CPUs,
from ``/proc/stat``): a busy machine's timing takes more rounds, decides the run, and is not
kept (timing.latency.timed_pair, the timing cache).
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

from ..checks import check_int
from ..version import __version__


def interleaved_timings(fns: Sequence[Callable[[], object]], *, runs: int, warmup: int,
                        on_round: Callable[[int], None] | None = None,
                        clock: Callable[[], float] = time.perf_counter) -> list[np.ndarray]:
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
    clock : callable, optional
        The clock read around each call: ``time.perf_counter`` (wall) by default,
        ``time.thread_time`` for the calling thread's CPU time (:func:`clock_for`).

    Returns
    -------
    list of ndarray, shape (runs,)
        Per fn, the seconds each timed call took on ``clock``, in call order.
    """
    check_int(runs, "--runs", 1)
    check_int(warmup, "--warmup", 0)
    fns = list(fns)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = np.empty((len(fns), runs), dtype=np.float64)
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


#: A short busy loop that takes this much more wall-clock than CPU time shares its core with
#: other processes (:func:`machine_load`).
CONTENDED = 1.15
#: Other processes using more than this share of all CPUs during a timing make it a timing
#: under load (:class:`OthersLoad`).
OTHERS_BUSY = 0.2


class OthersLoad:
    """The share of this process's CPUs (``os.sched_getaffinity``) that *other* processes used
    between :meth:`start` and :meth:`share` — ``(Δ busy time of those CPUs − Δ CPU time of this
    process) / (Δ wall · their count)`` from ``/proc/stat`` — measured over the timing itself (a
    short busy loop before it can miss hogs that just started: a freshly woken thread gets the
    CPU first). ``None`` where the OS has no ``/proc/stat``."""

    def start(self) -> "OthersLoad":
        self._cpus = _affinity()
        self._t0, self._busy0, self._own0 = time.perf_counter(), _machine_busy_s(self._cpus), time.process_time()
        return self

    def share(self) -> float | None:
        busy = _machine_busy_s(self._cpus)
        if busy is None or self._busy0 is None:
            return None
        wall = time.perf_counter() - self._t0
        others = (busy - self._busy0) - (time.process_time() - self._own0)
        return max(others, 0.0) / max(wall * len(self._cpus), 1e-9)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _machine_busy_s(cpus: set[int]) -> float | None:
    """Seconds the CPUs ``cpus`` spent busy since boot (``/proc/stat``'s ``cpuN`` lines: user,
    nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, seen = 0, 0
    for fields in lines:
        if int(fields[0][3:]) in cpus and len(fields) >= 9:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            total += user + nice + system + irq + softirq + steal
            seen += 1
    return total / ticks if seen else None


def clock_for(threads: int) -> tuple[str, Callable[[], float]]:
    """The clock that times onnxruntime at ``threads`` intra-op threads (module docstring):
    ``("cpu", time.thread_time)`` at one thread where that clock resolves microseconds (not on
    every OS), ``("wall", time.perf_counter)`` otherwise."""
    if threads == 1 and time.get_clock_info("thread_time").resolution <= 1e-6:
        return "cpu", time.thread_time
    return "wall", time.perf_counter


def cpu_contention(seconds: float = 0.02) -> float:
    """Wall-clock over this thread's CPU time of a busy loop of ``seconds``: about 1.0 when the
    thread has a core to itself, 1.5 when it shares two cores with two CPU-bound processes."""
    t0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(2000):
            x += 1
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return wall / cpu if cpu > 0 else float("inf")


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def machine_load(threads: int) -> tuple[float, float, bool]:
    """``(contention, load average, busy)`` right now, for a timing at ``threads`` threads:
    busy when :func:`cpu_contention` exceeds ``CONTENDED``, or when, for more than one thread,
    the load average exceeds the CPUs this process may use by more than half a CPU (then
    onnxruntime's threads wait for each other behind other processes even where one loop finds
    a free core). The load average counts this job's own busy threads too: the safe side."""
    contention, load = cpu_contention(), load_average()
    busy = contention > CONTENDED or (threads > 1 and load > default_threads() + 0.5)
    return contention, load, busy


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
