"""Tests of onnx_dwdecomp.checks: integer arguments checked one way for the API, the command line
and ``bench``."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dwdecomp.checks import check_int, parse_int
from onnx_dwdecomp.errors import OptionError


def test_check_int_accepts_python_and_numpy_integers_at_or_above_the_minimum():
    assert check_int(3, "--runs") == 3 and check_int(np.int32(0), "--warmup", 0) == 0
    assert type(check_int(np.int64(5), "--runs")) is int
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(OptionError, match=r"--runs must be an integer >= 1, got "):
            check_int(bad, "--runs")


def test_parse_int_reads_a_flag_and_says_the_same():
    assert parse_int("8", "--seed", 0) == 8
    with pytest.raises(OptionError, match=r"^--seed must be an integer >= 0, got 'x'$"):
        parse_int("x", "--seed", 0)
    with pytest.raises(OptionError, match=r"^--runs must be an integer >= 1, got 0$"):
        parse_int("0", "--runs")
