"""Tests of onnx_dwdecomp.verify: output agreement metrics."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dwdecomp.verify import (MAX_FEATURES, NEAR_DEAD, Verification, _join, agreement, feature_axes,
                                  output_scales)


def scales_of(arrays):
    """One output's scale per feature axis over batches ``arrays``, as pipeline.reference_pass
    makes it."""
    return output_scales(("y", a) for a in arrays)["y"]


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
    scale = scales_of(typical)
    assert len(scale) == 1 and scale[0].axis is None  # one channel: no feature axis, one feature
    assert scale[0].mean_square == pytest.approx([np.mean(typical[0].astype(np.float64) ** 2)])
    assert agreement(blank, noisy, scale).rel_l2 < 1e-5


def test_errors_against_given_scales_per_feature():
    y = np.stack([np.full((5, 3), 1.0), np.full((5, 3), 3.0)], axis=-1)  # (5, 3, 2): 2 features
    by_axis = {s.axis: s for s in scales_of([y, y])}
    assert set(by_axis) == {1, 2}  # both axes of a 3-D output have 2..MAX_FEATURES entries
    np.testing.assert_allclose(by_axis[2].mean_square, [1.0, 9.0])
    np.testing.assert_allclose(by_axis[2].peak, [1.0, 3.0])
    np.testing.assert_allclose(by_axis[1].mean_square, [5.0, 5.0, 5.0])
    a = agreement(y, 1.1 * y, scales_of([y]))
    assert a.rel_l2 == pytest.approx(0.1) and a.feature_rel_l2 == pytest.approx(0.1)


def test_a_feature_that_almost_never_fires_does_not_dominate():
    """8 channels, one firing at 1e-5 of the others' scale, the same 1e-3 noise everywhere: its
    scale is floored at FEATURE_FLOOR of the RMS feature scale (unfloored: error ~15)."""
    rng = np.random.default_rng(4)
    y = rng.random((4, 8, 6, 6))
    y[:, 3] *= 1e-5
    noisy = y + 1e-3 * rng.standard_normal(y.shape)
    a = agreement(y, noisy, scales_of([y]))
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
    """A model with batch dim fixed at 4 and 5 held-out samples: the last batch is padded with
    copies of its last row, which must not count as samples."""
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
    _, rep = decompose(model, calib=correlated_images(15, 4, 6, 6), multiplier=1, select="all")
    assert rep.calibration["heldout_samples"] == 5 and rep.verification.samples == 5


# ---- issue 15: non-finite values are a failure, never a pass; every input its own shape


def _one_conv(w_shape=(4, 4, 3, 3), extra_input=None):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal(w_shape).astype(np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w_shape[1], 6, 6])]
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1] * 4)], "g",
                              inputs + (extra_input or []),
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w_shape[0], 6, 6])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_nan_in_the_candidate_is_infinite_error_never_nan():
    y = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    bad = y.copy()
    bad[1, 3] = np.nan
    a = agreement(y, bad)
    assert a.rel_l2 == a.feature_rel_l2 == a.max_abs == float("inf")
    assert not any(np.isnan(v) for v in (a.rel_l2, a.feature_rel_l2, a.max_abs, a.cosine))
    # where the input model itself gives NaN there is no number to compare with: left out
    ref = y.copy()
    ref[0, 0] = np.nan
    ok = agreement(ref, y)
    assert ok.rel_l2 == 0.0 and ok.max_abs == 0.0 and ok.top1_agreement == 1.0


def test_require_pass_fails_on_nan_where_the_input_is_finite():
    from onnx_dwdecomp.errors import NumericalError, VerificationFailed
    from onnx_dwdecomp.verify import NonFinite, OutputAgreement

    inf = float("inf")
    v = Verification(8, "random inputs", {"y": OutputAgreement(inf, inf, 0.0, None, inf)},
                     {"y": NonFinite(candidate=3, reference=0, values=100)})
    with pytest.raises(VerificationFailed, match="NaN/Inf in 3 of 100") as e:
        v.require_pass()
    assert e.value.exit_code == 1
    all_bad = Verification(8, "random inputs", {"y": OutputAgreement(0.0, 0.0, 1.0, None, 0.0)},
                           {"y": NonFinite(candidate=0, reference=100, values=100)})
    with pytest.raises(NumericalError, match="NaN/Inf in all 100") as e:
        all_bad.require_pass()
    assert e.value.exit_code == 2
    Verification(8, "random inputs", {"y": OutputAgreement(0.1, 0.1, 1.0, None, 0.1)},
                 {"y": NonFinite(0, 5, 100)}).require_pass()  # some NaN of the input's own: a pass


def test_compare_models_counts_nonfinite_outputs():
    from onnx import numpy_helper

    from onnx_dwdecomp.errors import VerificationFailed
    from onnx_dwdecomp.verify import compare_models, random_batches
    from onnx_dwdecomp.data.specs import InputSpec

    model = _one_conv()
    broken = _one_conv()
    w = numpy_helper.to_array(broken.graph.initializer[0]).copy()
    w[0, 0, 1, 1] = np.nan
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    spec = [InputSpec("x", np.float32, (None, 4, 6, 6))]
    v = compare_models(model, broken, random_batches(spec, {"x": (1, 4, 6, 6)}, 0), "random inputs")
    assert v.nonfinite["y"].candidate == 8 * 36 and v.worst_error() == float("inf")
    with pytest.raises(VerificationFailed):
        v.require_pass(model)


def test_random_inputs_keep_each_inputs_own_shape_and_dtype():
    """A weight fed as a graph input (axis 0 fixed to 16) keeps its shape; x takes the batch."""
    from onnx_dwdecomp.data.specs import InputSpec
    from onnx_dwdecomp.errors import OptionError
    from onnx_dwdecomp.verify import random_batches

    specs = [InputSpec("x", np.float32, (None, 4, 6, 6)), InputSpec("W", np.float32, (16, 4, 3, 3)),
             InputSpec("k", np.int64, (None,))]
    batches = random_batches(specs, {"x": (1, 4, 6, 6), "W": (16, 4, 3, 3), "k": (1,)}, seed=3)
    assert [(b["x"].shape, b["W"].shape, b["k"].shape) for b in batches] == [((8, 4, 6, 6), (16, 4, 3, 3), (8,))]
    assert batches[0]["k"].dtype == np.int64
    with pytest.raises(OptionError, match="--seed"):
        random_batches(specs[:1], {"x": (1, 4, 6, 6)}, seed=-1)
    with pytest.raises(OptionError, match="--no-verify"):
        random_batches([InputSpec("s", np.dtype(object), (None,))], {"s": (1,)}, seed=0)


def test_random_inputs_beyond_memory_are_refused(monkeypatch):
    from onnx_dwdecomp.data.specs import InputSpec
    from onnx_dwdecomp.errors import ResourceError
    from onnx_dwdecomp.verify import random_batches

    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "1M")
    with pytest.raises(ResourceError, match="--input-shape"):
        random_batches([InputSpec("x", np.float32, (None, 3, None, None))], {"x": (1, 3, 512, 512)}, seed=0)


def test_new_nonfinite_weights_are_refused_old_ones_kept():
    from onnx import numpy_helper

    from onnx_dwdecomp.errors import NumericalError
    from onnx_dwdecomp.verify import check_finite_weights, nonfinite_tensors

    model = _one_conv()
    assert nonfinite_tensors(model) == {}
    check_finite_weights(model, model)
    bad = _one_conv()
    w = numpy_helper.to_array(bad.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.inf
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    with pytest.raises(NumericalError, match="'w'"):
        check_finite_weights(model, bad)
    check_finite_weights(bad, bad)  # the input had it already


def test_checker_failure_of_the_rewrite_is_an_internal_error():
    from onnx_dwdecomp.errors import EXIT_INTERNAL_ERROR, InternalError
    from onnx_dwdecomp.verify import check_model

    model = _one_conv()
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(InternalError) as e:
        check_model(model)
    assert e.value.exit_code == EXIT_INTERNAL_ERROR == 3


def test_nonfinite_statistics_name_the_conv():
    from types import SimpleNamespace

    from onnx_dwdecomp.errors import NumericalError
    from onnx_dwdecomp.verify import finite_stats_solver

    stats = SimpleNamespace(mean_x=np.zeros(3), mean_xhat=np.zeros(3), cov_xhat=np.full((3, 3), np.nan),
                            cov_y_xhat=np.zeros((2, 3)), response_var=1.0)
    solve = finite_stats_solver(lambda layer, s, h: "solved")
    with pytest.raises(NumericalError, match="conv 'c1'.*cov_xhat"):
        solve(SimpleNamespace(name="c1"), stats, None)
    stats.cov_xhat = np.eye(3)
    assert solve(SimpleNamespace(name="c1"), stats, None) == "solved"


# ---- the feature axis and the near-dead rule on detection heads


def _detections(rng, anchors: int, classes: int, layout: str):
    """A detection head's output on 2 images: box cx, cy, w, h in pixels (RMS ~100–200), then
    sparse class probabilities — ~1e-4 on every anchor but a few, where one class peaks at
    0.5–0.9 (the detections). ``layout`` "v8": (N, 4+C, A); "v5": (N, A, 5+C) with objectness."""
    n = 2
    boxes = np.stack([rng.uniform(0, 320, (n, anchors)), rng.uniform(0, 320, (n, anchors)),
                      rng.uniform(8, 120, (n, anchors)), rng.uniform(8, 120, (n, anchors))], axis=1)
    cls = rng.uniform(0, 2e-4, (n, classes, anchors))
    peaks = rng.choice(anchors, size=(n, 6), replace=False)
    for i in range(n):
        for j, a in enumerate(peaks[i]):
            cls[i, j % classes, a] = rng.uniform(0.5, 0.9)
    if layout == "v8":
        return np.concatenate([boxes, cls], axis=1), peaks
    obj = cls.max(axis=1, keepdims=True)
    return np.concatenate([boxes, obj, cls], axis=1).transpose(0, 2, 1), peaks


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_a_detection_head_sees_its_class_probabilities(layout):
    """A rewrite that moves the detected class probabilities by 30 % of their peak (0.5–0.9 →
    0.35–0.63, detections at 0.5 change) and the boxes by 0.5 % must exceed the 2 % bound, while
    the plain relative L2 — owned by the pixel coordinates — is ~0.005. Before: the 2,100-entry
    last axis of the v8 layout made the whole output one feature (0.005), and with the right
    axis every class channel (RMS ≤ 1e-2 against boxes of RMS ~100) was pooled as near-dead."""
    rng = np.random.default_rng(7)
    y, peaks = _detections(rng, anchors=2100, classes=20, layout=layout)
    y_hat = y * (1 + 0.005 * rng.standard_normal(y.shape))
    feature_axis = 1 if layout == "v8" else 2
    assert feature_axes(y.shape) == (feature_axis,)
    moved = np.moveaxis(y_hat, feature_axis, 1).copy()
    first_class = 4 if layout == "v8" else 5
    for i in range(2):
        moved[i, first_class:, peaks[i]] *= 0.7
    y_hat = np.moveaxis(moved, 1, feature_axis)
    a = agreement(y, y_hat, scales_of([y]))
    assert a.rel_l2 < 0.01  # what the old measure saw
    assert a.feature_rel_l2 > 0.02
    assert a.worst_axis == feature_axis and a.worst_index >= first_class  # a class probability
    # the same head with only the tiny box noise stays well within the bound
    quiet = y * (1 + 0.005 * rng.standard_normal(y.shape))
    assert agreement(y, quiet, scales_of([y])).feature_rel_l2 < 0.02


def test_class_channels_that_never_fire_are_pooled():
    """Classes whose probability stays ~1e-4 on every anchor (no such object in the data): a
    rewrite that doubles them (a logit shift of 0.7 at the sigmoid's tail) changes no detection
    and must not read as an error of ~1 on each of them."""
    rng = np.random.default_rng(8)
    y, _ = _detections(rng, anchors=2100, classes=20, layout="v8")
    y[:, 4 + 6:] = rng.uniform(0, 2e-4, y[:, 4 + 6:].shape)  # classes 6.. never fire
    y_hat = y.copy()
    y_hat[:, 4 + 6:] *= 2.0
    scale = scales_of([y])
    assert scale[0].peak[4 + 6:].max() < NEAR_DEAD * np.sqrt(scale[0].mean_square.mean())
    assert agreement(y, y_hat, scale).feature_rel_l2 < 1e-3


def test_where_both_axes_qualify_the_worse_counts():
    """(N, Q, C+1) with Q = 50 queries and 8 classes: axis 1 and axis 2 both qualify. Query 7 is
    faint (1e-2 of the others) and off by 50 %: per class it is diluted by the loud queries,
    per query it is one of 50 features off by 0.5 — the worse (axis 1) is the output error."""
    rng = np.random.default_rng(9)
    y = rng.standard_normal((4, 50, 8))
    y[:, 7] *= 1e-2
    y_hat = y.copy()
    y_hat[:, 7] *= 1.5
    assert feature_axes(y.shape) == (1, 2)
    a = agreement(y, y_hat, scales_of([y]))
    assert a.worst_axis == 1 and a.worst_index == 7
    assert a.feature_rel_l2 == pytest.approx(0.5 / np.sqrt(50), rel=1e-6)  # one of 50 features off by 0.5
    per_class = np.linalg.norm(y_hat - y, axis=(0, 1)) / np.linalg.norm(y, axis=(0, 1))  # axis 2 alone
    assert np.sqrt(np.mean(per_class ** 2)) < 0.01


def test_an_empty_output_has_no_error():
    """A post-NMS output with no rows on the held-out samples: identical models agree (before:
    0/0 read as an infinite error, so every round missed)."""
    empty = np.zeros((0, 4), np.float32)
    scale = scales_of([np.random.default_rng(0).random((8, 4))])
    assert agreement(empty, empty, scale).feature_rel_l2 == 0.0
    assert agreement(empty, empty).feature_rel_l2 == 0.0
