"""planning/error_model.py: a plan's output error predicted as √(α·Σ s_l e_l(r_l))."""

from __future__ import annotations

import pytest

from onnx_dwdecomp.planning.budget import SKIP, LayerCurve, Option, allocate_error
from onnx_dwdecomp.planning.error_model import ErrorModel, curve_error, curve_weight


def _curves():
    # a: s = 2, e(1) = 0.01; b: s = 0.5, e(1) = 0.02, e(2) = 0.004
    return [LayerCurve("a", (Option(SKIP, 100, 0.0), Option(1, 20, 0.01)), weight=2.0),
            LayerCurve("b", (Option(SKIP, 100, 0.0), Option(1, 20, 0.02), Option(2, 40, 0.004)), weight=0.5)]


def test_predict_budget_and_rescale():
    model = ErrorModel(_curves(), scale=3.0)
    both = allocate_error(model.curves, 1.0)  # everything fits: a and b at r = 1
    assert both.multipliers == {"a": 1, "b": 1}
    # √(α·Σ s·e): 2·0.01 + 0.5·0.02 = 0.03, α = 3 → 0.3
    assert model.predict(both) == pytest.approx(0.3)
    assert model.error_budget(0.3) == pytest.approx(0.03)  # the bound back as an error sum
    model.rescale(both, 0.6)  # measured twice the prediction: α = 0.36 / 0.03 = 12
    assert model.scale == pytest.approx(12.0) and model.predict(both) == pytest.approx(0.6)
    model.rescale(both, float("nan"))  # says nothing: kept
    model.rescale(both, None)
    assert model.scale == pytest.approx(12.0)


def test_a_single_layers_share_and_the_smallest_rewrite():
    model = ErrorModel(_curves(), scale=4.0)
    a, b = model.curves
    assert model.alone(a, a.option(1)) == pytest.approx((4 * 2 * 0.01) ** 0.5)
    # b at r = 2 moves the output least: √(4·0.5·0.004)
    assert model.smallest_single_rewrite() == ("b", pytest.approx((4 * 0.5 * 0.004) ** 0.5))


def test_broken_curves_count_as_very_large():
    assert curve_error(float("nan")) == curve_weight(float("inf")) == 1e6
    assert curve_error(0.02) == 0.02 and curve_weight(1.5) == 1.5
