"""Tests of onnx_dwdecomp.verify: output agreement metrics."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dwdecomp.verify import MAX_FEATURES, Verification, _join, agreement, as_features


def mean_squares(arrays):
    """Per-feature mean square over arrays of one output, as pipeline.reference_pass makes it."""
    f = np.concatenate([as_features(a) for a in arrays])
    return (f * f).mean(axis=0)


def test_feature_error_is_not_hidden_by_large_features():
    """A YOLO-style head (N, anchors, 6) as ddddocr's: coordinates ~1, objectness ~0.01. Half the
    objectness signal lost is a 0.5 error on that feature, while the plain rel. L2 barely moves."""
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.random((2, 500, 4)), 0.01 * rng.random((2, 500, 2))], axis=-1)
    y_hat = y.copy()
    y_hat[..., 4] *= 0.5
    a = agreement(y.astype(np.float32), y_hat.astype(np.float32))
    assert a.rel_l2 < 0.01
    # e = (0, 0, 0, 0, 0.5, 0) over 6 features: sqrt(0.25 / 6)
    assert a.feature_rel_l2 == pytest.approx(np.sqrt(0.25 / 6), rel=1e-5)


def test_feature_error_equals_rel_l2_for_equal_scales_and_without_a_feature_axis():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((64, 10))
    noise = 0.1 * rng.standard_normal((64, 10))
    a = agreement(y, y + noise)
    # 10 logits of one scale: the RMS of per-class errors is the plain error up to sampling noise
    assert a.feature_rel_l2 == pytest.approx(a.rel_l2, rel=0.2)
    assert a.top1_agreement is not None
    wide = rng.standard_normal((4, MAX_FEATURES + 1))  # e.g. 1000-class logits: one signal
    b = agreement(wide, 1.1 * wide)
    assert b.feature_rel_l2 == b.rel_l2 == pytest.approx(0.1)


def test_feature_axis_of_a_map_is_its_channels():
    rng = np.random.default_rng(2)
    y = rng.standard_normal((2, 3, 8, 8))
    y[:, 2] *= 1e-3  # a faint channel
    y_hat = y.copy()
    y_hat[:, 2] = 0.0  # lost entirely: error 1 on that channel
    a = agreement(y, y_hat)
    assert a.rel_l2 < 1e-3
    assert a.feature_rel_l2 == pytest.approx(np.sqrt(1 / 3))
    dead = np.zeros((2, 3, 4, 4))
    dead[:, 0] = 1.0
    assert agreement(dead, dead).feature_rel_l2 == 0.0  # all-zero channels are left out


def test_worst_error_is_the_largest_feature_error():
    y = np.ones((4, 3))
    v = Verification(4, "held-out calibration samples",
                     {"a": agreement(y, 1.01 * y), "b": agreement(y, 1.2 * y)})
    assert v.worst_error() == pytest.approx(0.2) and v.worst_rel_l2() == pytest.approx(0.2)


def test_errors_against_the_typical_scale_ignore_round_off_on_a_blank_output():
    """A text map of a photo without text: probabilities ~1e-7 and float round-off of the same
    size. Against its own norm that reads as a relative error near 1; against the mean square
    of the calibration set's outputs (text pages among them) it is round-off."""
    rng = np.random.default_rng(3)
    typical = [rng.random((4, 1, 16, 16)).astype(np.float32)]  # pages with text
    blank = np.full((1, 1, 16, 16), 1e-7, np.float32)
    noisy = blank + rng.normal(scale=1e-7, size=blank.shape).astype(np.float32)
    assert agreement(blank, noisy).rel_l2 > 0.5
    scale = mean_squares(typical)
    assert scale.shape == (1,) and scale[0] == pytest.approx(np.mean(typical[0].astype(np.float64) ** 2))
    assert agreement(blank, noisy, scale).rel_l2 < 1e-5


def test_errors_against_given_scales_per_feature():
    y = np.stack([np.full((5, 3), 1.0), np.full((5, 3), 3.0)], axis=-1)  # (5, 3, 2): 2 features
    np.testing.assert_allclose(mean_squares([y, y]), [1.0, 9.0])
    a = agreement(y, 1.1 * y, mean_squares([y]))
    assert a.rel_l2 == pytest.approx(0.1) and a.feature_rel_l2 == pytest.approx(0.1)


def test_a_feature_that_almost_never_fires_does_not_dominate():
    """8 channels, one firing at 1e-5 of the others' scale, the same 1e-3 noise everywhere: its
    scale is floored at FEATURE_FLOOR of the RMS feature scale (unfloored: error ~15)."""
    rng = np.random.default_rng(4)
    y = rng.random((4, 8, 6, 6))
    y[:, 3] *= 1e-5
    noisy = y + 1e-3 * rng.standard_normal(y.shape)
    a = agreement(y, noisy, mean_squares([y]))
    assert a.rel_l2 < 0.01 and a.feature_rel_l2 < 1.0


def test_non_finite_values():
    y = np.ones((4, 3))
    bad = y.copy()
    bad[1, 2] = np.nan
    assert agreement(y, bad).feature_rel_l2 == np.inf and agreement(y, bad).rel_l2 == np.inf
    ref = y.copy()
    ref[0, 0] = np.inf  # left out of the comparison; the rest is off by 10 %
    a = agreement(ref, 1.1 * y)
    assert a.rel_l2 == pytest.approx(0.1) and np.isfinite(a.feature_rel_l2)
    v = Verification(4, "x", {"good": agreement(y, y), "bad": agreement(y, bad)})
    assert v.worst_error() == np.inf and v.worst_rel_l2() == np.inf  # NaN/inf never hides


def test_integer_outputs_are_compared_for_equality():
    labels = np.array([[1, 2, 3, 4]], np.int64)
    a = agreement(labels, np.array([[1, 2, 0, 4]], np.int64))
    assert a.rel_l2 == a.feature_rel_l2 == 0.25 and a.top1_agreement is None
    assert agreement(labels, labels).feature_rel_l2 == 0.0


def test_batches_of_a_time_major_output_join_along_the_batch_axis():
    parts = [np.zeros((7, 32, 5)), np.ones((7, 8, 5))]  # (T, N, C) with batches of 32 and 8
    assert _join(parts).shape == (7, 40, 5)
    assert _join([np.zeros((4, 3)), np.zeros((2, 3))]).shape == (6, 3)
    assert _join([np.float32(1.0), np.float32(2.0)]).shape == (2,)


def test_padding_rows_of_a_fixed_batch_are_not_scored():
    """A model with batch dim fixed at 4 and 3 held-out samples: the last batch is padded with
    a copy of its last row, which must not count as a fourth sample."""
    from conftest import correlated_images
    from onnx import TensorProto, helper, numpy_helper

    from onnx_dwdecomp import decompose

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4, 6, 6])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    _, rep = decompose(model, calib=correlated_images(12, 4, 6, 6), multiplier=1, select="all")
    assert rep.calibration["heldout_samples"] == 3 and rep.verification.samples == 3
