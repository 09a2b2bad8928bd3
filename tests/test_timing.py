"""timing.py: interleaved timing rounds and the CPU count used as the default thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.timing.clock import clock_for, default_threads, interleaved_timings


def test_interleaved_order_and_counts():
    log = []
    fns = [lambda i=i: log.append(i) for i in range(3)]
    rounds = []
    times = interleaved_timings(fns, runs=4, warmup=2, on_round=rounds.append)
    assert log == [0, 0, 1, 1, 2, 2] + [0, 1, 2] * 4
    assert rounds == [1, 2, 3, 4]
    assert len(times) == 3
    for t in times:
        assert t.shape == (4,) and np.all(t >= 0)


def test_interleaved_rejects_bad_counts():
    with pytest.raises(OptionError, match="--runs"):
        interleaved_timings([lambda: None], runs=0, warmup=0)
    with pytest.raises(OptionError, match="--warmup"):
        interleaved_timings([lambda: None], runs=1, warmup=-1)


def test_default_threads_is_the_cpus_this_process_may_use():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads() == expected >= 1


def test_the_cpu_clock_does_not_count_time_off_the_cpu():
    """What load does to a timing — the thread waits while another process has the core — is
    what a sleep does: the wall clock counts it, the calling thread's CPU time does not. So at
    one thread (timing.clock_for) a timing beside CPU hogs reads like a quiet one."""
    import time

    def busy(seconds=0.01):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            pass

    fns = [lambda: time.sleep(0.01), busy]
    wall = interleaved_timings(fns, runs=3, warmup=0)
    cpu = interleaved_timings(fns, runs=3, warmup=0, clock=clock_for(1)[1])
    assert np.all(wall[0] >= 0.009) and np.all(cpu[0] < 0.003)  # sleep: 10 ms wall, ~0 CPU
    assert np.all(cpu[1] > 0.003)  # the busy loop is on the CPU (tolerance: a loaded 2-core machine)
    assert clock_for(1)[0] == "cpu" and clock_for(2)[0] == "wall"


def test_machine_load_says_busy_on_contention_or_load(monkeypatch):
    from onnx_dwdecomp.timing import clock as timing

    monkeypatch.setattr(timing, "default_threads", lambda: 2)
    monkeypatch.setattr(timing, "cpu_contention", lambda: 1.5)
    monkeypatch.setattr(timing, "load_average", lambda: 0.5)
    assert timing.machine_load(1) == (1.5, 0.5, True)  # the probe thread shared its core
    monkeypatch.setattr(timing, "cpu_contention", lambda: 1.02)
    assert timing.machine_load(1)[2] is False
    monkeypatch.setattr(timing, "load_average", lambda: 3.1)  # e.g. two hogs beside this job
    assert timing.machine_load(2)[2] is True  # two onnxruntime threads cannot both find a free core
    assert timing.machine_load(1)[2] is False  # one thread, one free core: the CPU clock is immune anyway
    assert 0.9 < timing.cpu_contention() < 100  # a real measurement: wall over CPU time of a loop
