"""Tests for the pure parts of tools/accuracy_study.py (no torch; the study itself is not run)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_tool


st = load_tool("accuracy_study")


@pytest.mark.parametrize("size, subsets, expected", [(256, 4, 4), (512, 4, 4), (1024, 4, 2), (2048, 4, 1),
                                                     (256, 1, 1), (256, 0, 1)])
def test_calibration_slices_are_disjoint_and_inside_the_pool(size, subsets, expected):
    slices = st.calibration_slices(size, subsets)
    assert len(slices) == expected
    rows = np.concatenate([np.arange(2048)[s] for s in slices])
    assert all(len(np.arange(2048)[s]) == size for s in slices)
    assert len(np.unique(rows)) == len(rows)  # disjoint
    assert rows.max() < st.CALIB_POOL <= st.VAL.start  # never the validation digits


def test_calibration_slice_larger_than_the_pool_is_an_error():
    with pytest.raises(ValueError, match="exceeds the pool"):
        st.calibration_slices(4096, 1)


def _row(label, top1s, rel=0.1, agree=0.99):
    return st.Row(label, tuple(st.Score(rel, agree, t) for t in top1s))


def test_row_cells_mean_spread_and_loss():
    cells = st.row_cells(_row("N = 256", [0.975, 0.977]), reference_top1=0.99)
    assert cells == ["N = 256", "2", "0.1000", "99.00 %", "97.60 % [97.5–97.7]", "+1.40"]
    assert st.row_cells(_row("one", [0.98]), 0.99)[4] == "98.00 %"  # no range for one set


def test_verdict_follows_the_numbers():
    ref = 0.99
    missed = [_row("N = 256", [0.975]), _row("N = 2048", [0.976])]
    text = st.verdict(missed, [_row("a", [0.977]), _row("b", [0.978])], ref)
    assert "not met by the default, not met by the best setting and not met with 2048" in text
    assert "(b;" in text and "loses 1.20" in text and "not an estimation problem" in text
    met = [_row("N = 256", [0.981]), _row("N = 2048", [0.985])]
    text = st.verdict(met, [_row("a", [0.981])], ref)
    assert "is met by the default, met by the best setting and met with 2048" in text
    assert "estimation problem" not in text
