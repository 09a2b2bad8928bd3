"""timing.py: interleaved timing rounds and the CPU count used as the default thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest

from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.timing import default_threads, interleaved_timings


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
