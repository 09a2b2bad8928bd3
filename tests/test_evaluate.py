"""Tests for tools/evaluate.py (numpy + onnx + onnxruntime only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TOOLS, load_tool

EVALUATE_PY = TOOLS / "evaluate.py"
ev = load_tool("evaluate")


# ----------------------------------------------------------------- top1_accuracy

def test_top1_all_correct_and_all_wrong():
    logits = np.array([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    assert ev.top1_accuracy(logits, np.array([0, 1, 2])) == 1.0
    assert ev.top1_accuracy(logits, np.array([1, 2, 0])) == 0.0


def test_top1_fraction():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    # predictions 1, 0, 1, 0
    assert ev.top1_accuracy(logits, np.array([1, 0, 0, 1])) == pytest.approx(0.5)
    assert ev.top1_accuracy(logits, np.array([1, 0, 1, 1])) == pytest.approx(0.75)


def test_top1_ties_go_to_lowest_index():
    logits = np.array([[2.0, 2.0, 1.0], [0.0, 3.0, 3.0], [1.0, 1.0, 1.0]])
    assert ev.top1_accuracy(logits, np.array([0, 1, 0])) == 1.0
    assert ev.top1_accuracy(logits, np.array([1, 2, 2])) == 0.0


def test_top1_negative_logits():
    logits = -np.array([[3.0, 1.0, 2.0], [0.5, 0.1, 0.2]])
    # predictions 1, 1
    assert ev.top1_accuracy(logits, np.array([1, 0])) == pytest.approx(0.5)


def test_top1_returns_python_float():
    out = ev.top1_accuracy(np.eye(4), np.arange(4))
    assert type(out) is float


@pytest.mark.parametrize(
    "logits, labels",
    [
        (np.zeros(5), np.zeros(5, dtype=np.int64)),                # 1-D logits
        (np.zeros((2, 3, 4)), np.zeros(2, dtype=np.int64)),        # 3-D logits
        (np.zeros((4, 3)), np.zeros((4, 1), dtype=np.int64)),      # 2-D labels
        (np.zeros((4, 3)), np.zeros(3, dtype=np.int64)),           # N mismatch
        (np.zeros((0, 3)), np.zeros(0, dtype=np.int64)),           # empty
        (np.zeros((4, 3)), np.zeros(4, dtype=np.float32)),         # float labels
    ],
)
def test_top1_bad_shapes_raise(logits, labels):
    with pytest.raises(ValueError):
        ev.top1_accuracy(logits, labels)


# ----------------------------------------------------------------- evaluate()

def _linear_classifier(path: Path, weight: np.ndarray) -> None:
    """input (N, C, H, W) -> Flatten -> Gemm(B=weight) -> output (N, K)."""
    d, k = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W"], ["output"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", k])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def tiny_set(tmp_path):
    """Model whose class is the arg-max pixel of a 2x2 image, and 10 labelled images."""
    rng = np.random.default_rng(0)
    model_path = tmp_path / "argmax_pixel.onnx"
    _linear_classifier(model_path, np.eye(4))
    x = rng.normal(size=(10, 1, 2, 2)).astype(np.float32)
    truth = x.reshape(10, 4).argmax(1).astype(np.int64)
    return model_path, x, truth, tmp_path


def test_evaluate_perfect(tiny_set):
    model_path, x, truth, tmp = tiny_set
    npz = tmp / "set.npz"
    np.savez_compressed(npz, input=x, labels=truth)
    assert ev.evaluate(model_path, npz, batch_size=3) == 1.0


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 100])
def test_evaluate_known_fraction_any_batch(tiny_set, batch_size):
    model_path, x, truth, tmp = tiny_set
    labels = truth.copy()
    labels[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 4      # exactly 3 wrong of 10
    npz = tmp / "set.npz"
    np.savez(npz, input=x, labels=labels)
    assert ev.evaluate(model_path, npz, batch_size=batch_size) == pytest.approx(0.7)


def test_evaluate_uses_model_not_labels(tiny_set):
    """A model with permuted classes must score 0 where the identity scores 1."""
    model_path, x, truth, tmp = tiny_set
    shifted = tmp / "shifted.onnx"
    _linear_classifier(shifted, np.roll(np.eye(4), 1, axis=1))  # pixel j -> class j+1
    npz = tmp / "set.npz"
    np.savez(npz, input=x, labels=truth)
    assert ev.evaluate(shifted, npz) == 0.0
    np.savez(npz, input=x, labels=(truth + 1) % 4)
    assert ev.evaluate(shifted, npz) == 1.0


def test_evaluate_casts_float64_input(tiny_set):
    model_path, x, truth, tmp = tiny_set
    npz = tmp / "set.npz"
    np.savez(npz, input=x.astype(np.float64), labels=truth)
    assert ev.evaluate(model_path, npz) == 1.0


def test_predict_stacks_batches(tiny_set):
    model_path, x, _, _ = tiny_set
    out = ev.predict(model_path, x, batch_size=4)
    np.testing.assert_allclose(out, x.reshape(10, 4), rtol=1e-6)


def test_evaluate_missing_key_raises(tiny_set):
    model_path, x, _, tmp = tiny_set
    npz = tmp / "nolabels.npz"
    np.savez(npz, input=x)
    with pytest.raises(ValueError, match="labels"):
        ev.evaluate(model_path, npz)


def test_evaluate_length_mismatch_raises(tiny_set):
    model_path, x, truth, tmp = tiny_set
    npz = tmp / "bad.npz"
    np.savez(npz, input=x, labels=truth[:9])
    with pytest.raises(ValueError):
        ev.evaluate(model_path, npz)


def test_bad_batch_size_raises(tiny_set):
    model_path, x, _, _ = tiny_set
    with pytest.raises(ValueError):
        ev.predict(model_path, x, batch_size=0)


def test_cli_prints_accuracy(tiny_set, capsys):
    model_path, x, truth, tmp = tiny_set
    labels = truth.copy()
    labels[0] = (labels[0] + 1) % 4
    npz = tmp / "set.npz"
    np.savez(npz, input=x, labels=labels)
    assert ev.main([str(model_path), str(npz), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "90.00 %" in out and "(9/10)" in out


def test_evaluate_does_not_import_torch():
    source = EVALUATE_PY.read_text()
    assert "import torch" not in source
