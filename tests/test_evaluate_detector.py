"""tools/evaluate_detector.py: decode of the YOLOv8 layout (N, 4+C, A), per-class NMS, box F1,
and the shipped models/detector model's output layout. numpy + onnxruntime only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import TOOLS, load_tool

ed = load_tool("evaluate_detector")

DETECTOR = Path(__file__).resolve().parents[1] / "models" / "detector"

C = 3  # classes in the hand-built outputs


def hand_output(objects, anchors: int = 20, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """One image's (4 + C, A) output: background anchors with tiny class probabilities and
    junk boxes, plus ``objects`` = [(anchor, (cx, cy, w, h), class, prob)]."""
    rng = np.random.default_rng(seed)
    out = np.zeros((4 + C, anchors), dtype=np.float32)
    out[:2] = rng.uniform(0, 96, (2, anchors))
    out[2:4] = rng.uniform(4, 30, (2, anchors))
    out[4:] = rng.uniform(0, 0.02, (C, anchors)) + noise
    for a, box, cls, p in objects:
        out[:4, a] = box
        out[4 + cls, a] = p
    return out


OBJECTS = [(3, (20, 30, 10, 12), 0, 0.9), (7, (60, 50, 20, 16), 2, 0.7), (11, (40, 80, 8, 8), 1, 0.6)]


def test_decode_returns_the_known_boxes_in_xyxy_best_first():
    boxes, scores, classes = ed.decode(hand_output(OBJECTS), conf=0.25)
    np.testing.assert_allclose(boxes, [[15, 24, 25, 36], [50, 42, 70, 58], [36, 76, 44, 84]])
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6], rtol=1e-6)
    assert classes.tolist() == [0, 2, 1]
    assert classes.dtype == np.int64


def test_decode_threshold_is_inclusive_and_filters_background():
    boxes, scores, _ = ed.decode(hand_output(OBJECTS), conf=np.float32(0.7))  # as stored
    assert len(boxes) == 2 and scores.min() == pytest.approx(0.7)
    assert len(ed.decode(hand_output(OBJECTS), conf=0.65)[0]) == 2
    assert len(ed.decode(hand_output(OBJECTS), conf=0.95)[0]) == 0
    # every anchor above threshold (background 0.3) -> all anchors, then NMS
    assert len(ed.decode(hand_output([], noise=0.3), conf=0.25)[0]) >= 10


def test_decode_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ed.decode(np.zeros((4, 10)))
    with pytest.raises(ValueError):
        ed.detect(np.zeros((4 + C, 10)))


def test_nms_is_per_class():
    # two heavily overlapping boxes: same class -> one survives, different classes -> both
    same = hand_output([(1, (30, 30, 20, 20), 0, 0.9), (2, (31, 30, 20, 20), 0, 0.8)])
    boxes, scores, classes = ed.decode(same, conf=0.25, iou=0.45)
    assert len(boxes) == 1 and scores[0] == pytest.approx(0.9)
    diff = hand_output([(1, (30, 30, 20, 20), 0, 0.9), (2, (31, 30, 20, 20), 1, 0.8)])
    boxes, scores, classes = ed.decode(diff, conf=0.25, iou=0.45)
    assert len(boxes) == 2 and sorted(classes.tolist()) == [0, 1]
    # disjoint boxes of one class both stay
    far = hand_output([(1, (20, 20, 10, 10), 0, 0.9), (2, (70, 70, 10, 10), 0, 0.8)])
    assert len(ed.decode(far, conf=0.25)[0]) == 2


def batch(n: int = 4, **kw) -> np.ndarray:
    return np.stack([hand_output(OBJECTS, seed=i, **kw) for i in range(n)])


def test_f1_of_identical_outputs_is_one():
    out = batch()
    r = ed.compare(out, out.copy())
    assert r["f1"] == 1.0 and r["n_ref"] == r["n_new"] == r["matches"] == 12


def test_f1_drops_when_a_class_peak_falls_below_threshold():
    ref = batch()
    new = ref.copy()
    new[0, 4 + 2, 7] = 0.1           # image 0: the class-2 object's peak below 0.25
    r = ed.compare(ref, new)
    assert r["n_ref"] == 12 and r["n_new"] == 11 and r["matches"] == 11
    assert r["f1"] == pytest.approx(22 / 23)
    # boxes barely moved (pixel scale) -> still 1.0: the metric reads classes, not only boxes
    moved = ref.copy()
    moved[:, :4] += 0.5
    assert ed.compare(ref, moved)["f1"] == 1.0


def test_f1_needs_the_same_class_and_enough_iou():
    ref = batch(1)
    swapped = ref.copy()
    swapped[0, 4 + 0, 3], swapped[0, 4 + 1, 3] = 0.0, 0.9   # same box, other class
    assert ed.compare(ref, swapped)["matches"] == 2
    shifted = ref.copy()
    shifted[0, 0, 3] += 8.0                                  # 10 px wide box moved 8 px: IoU 1/9
    assert ed.compare(ref, shifted)["matches"] == 2


def test_match_f1_against_ground_truth_and_empty_cases():
    gt = [(np.array([[0, 0, 10, 10]]), np.array([1]))]
    assert ed.match_f1(gt, [(np.array([[0, 0, 10, 10.5]]), np.array([1]))])["f1"] == 1.0
    assert ed.match_f1(gt, [(np.zeros((0, 4)), np.zeros(0, int))])["f1"] == 0.0
    empty = [(np.zeros((0, 4)), np.zeros(0, int))]
    assert ed.match_f1(empty, empty)["f1"] == 1.0
    with pytest.raises(ValueError):
        ed.match_f1(gt, gt + gt)


def test_feature_change_per_row():
    ref = batch()
    new = ref.copy()
    new[:, 5] *= 1.5
    ch = ed.feature_change(ref, new)
    assert ch.shape == (4 + C,)
    assert ch[5] == pytest.approx(0.5) and np.all(ch[[0, 1, 2, 3, 4, 6]] == 0)


def test_tool_does_not_import_torch():
    source = (TOOLS / "evaluate_detector.py").read_text()
    assert "import torch" not in source and "from torch" not in source


@pytest.mark.skipif(not (DETECTOR / "detector.onnx").exists(), reason="models/detector not built")
def test_shipped_detector_layout_and_scales():
    with np.load(DETECTOR / "test.npz") as data:
        images = data["images"][:16]
        gt = ed.ground_truth(data)
        assert data["boxes"].shape[:2] == data["labels"].shape
    assert images.dtype == np.float32 and images.ndim == 4
    out = ed.predict(DETECTOR / "detector.onnx", images)
    n_classes = out.shape[1] - 4
    assert out.shape[0] == 16 and n_classes == 4
    assert out.shape[2] == sum((images.shape[-1] // s) ** 2 for s in (8, 16, 32))
    probs = out[:, 4:]
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    box_rms = np.sqrt(np.mean(out[:, :4] ** 2))
    cls_rms = np.sqrt(np.mean(probs ** 2))
    assert box_rms > 10.0 and box_rms > 100 * cls_rms     # pixels vs sparse probabilities
    assert np.mean(probs.max(1) < 0.05) > 0.8             # most anchors near 0
    # every image's strongest class peak is a confident detection, F1 vs ground truth is high
    assert np.all(probs.max(axis=(1, 2)) > 0.5)
    r = ed.match_f1(gt[:16], [(b, c) for b, _, c in ed.detect(out)])
    assert r["f1"] >= 0.8


def test_calibration_set_is_float32_and_big_enough():
    if not (DETECTOR / "calib.npz").exists():
        pytest.skip("models/detector not built")
    with np.load(DETECTOR / "calib.npz") as data:
        assert data["images"].dtype == np.float32 and len(data["images"]) >= 48
