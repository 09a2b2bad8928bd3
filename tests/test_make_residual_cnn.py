"""Tests for tools/make_residual_cnn.py: a tiny build is a valid ONNX model that onnxruntime runs,
has the expected convs, is byte-for-byte deterministic, and its 3×3 weights are near-separable."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import load_tool
from onnx import numpy_helper

mrc = load_tool("make_residual_cnn")

TINY = ["--convs", "4", "--image-size", "16", "--images", "4", "--channels", "8", "--no-check"]
FILES = ("model.onnx", "calib.npz", "meta.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("res4")
    assert mrc.main(["--out-dir", str(out), *TINY]) == 0
    return out


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def test_tiny_model_is_valid_and_runs(tiny):
    model = onnx.load(str(tiny / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    convs = _convs(model)
    assert len(convs) == 5  # the stem and 2 blocks of 2
    assert all(list(next(a.ints for a in n.attribute if a.name == "kernel_shape")) == [3, 3] for n in convs)
    assert all(len(n.input) == 3 for n in convs)  # bias: batch norm already folded
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 2 and "BatchNormalization" not in ops and ops[-1] == "Gemm"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "input" and dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [3, 16, 16]

    calib = np.load(tiny / "calib.npz")
    assert list(calib.keys()) == ["input"]
    x = calib["input"]
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32
    # smooth, not white noise: neighbouring pixels are strongly correlated
    corr = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert corr > 0.8
    (logits,) = ort.InferenceSession(str(tiny / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    assert logits.shape == (4, 10) and np.isfinite(logits).all() and logits.std() > 1e-3

    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["conv3x3"] == 5 and meta["args"]["convs"] == 4 and "out_dir" not in meta["args"]
    assert meta["macs_per_image"] == 16 * 16 * 8 * 9 * (3 + 4 * 8) + 8 * 10


def test_deterministic(tiny, tmp_path):
    assert mrc.main(["--out-dir", str(tmp_path), *TINY]) == 0
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes(), name
    # np.savez would stamp the members with the time; ours carry a fixed one
    with zipfile.ZipFile(tmp_path / "calib.npz") as zf:
        assert {info.date_time for info in zf.infolist()} == {mrc.ZIP_TIME}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_another_seed_differs(tiny, tmp_path):
    assert mrc.main(["--out-dir", str(tmp_path), *TINY, "--seed", "1"]) == 0
    assert (tmp_path / "model.onnx").read_bytes() != (tiny / "model.onnx").read_bytes()


def _rank2_energy(w: np.ndarray) -> np.ndarray:
    """Per input channel c: the share of W[:, c] (C_out × 9) carried by its top 2 singular values."""
    s = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(w.shape[1], w.shape[0], 9), compute_uv=False)
    return (s[:, :2] ** 2).sum(axis=1) / (s**2).sum(axis=1)


def test_weights_near_separable(tiny):
    model = onnx.load(str(tiny / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in _convs(model):
        w = inits[node.input[1]]
        energy = _rank2_energy(w)
        assert energy.min() >= 0.9, (node.name, energy.min())
        if w.shape[1] > 3:  # the block convs: not exactly rank 2 (the noise is there)
            assert energy.max() < 1 - 1e-6, node.name
    # a plain random weight of the same shape is far from that
    rng = np.random.default_rng(0)
    assert _rank2_energy(rng.standard_normal((8, 8, 3, 3))).max() < 0.9


def test_layout_strides_and_macs():
    rows = mrc.layout(8, 2, 2)  # stem /2, blocks 2 and 4 down
    assert [s for _, s in rows] == [2, 1, 1, 2, 1, 1, 1, 2, 1]
    macs = mrc.count_macs(4, 33, 10, rows)
    assert macs["sides"] == [17, 17, 17, 9, 9, 9, 9, 5, 5]


def test_stride2_model_runs(tmp_path):
    args = ["--convs", "4", "--image-size", "17", "--images", "2", "--channels", "4", "--stem-stride", "2",
            "--stride2-every", "1", "--no-check", "--out-dir", str(tmp_path)]
    assert mrc.main(args) == 0
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("AveragePool") == 2
    x = np.load(tmp_path / "calib.npz")["input"]
    last = [n.output[0] for n in model.graph.node if n.op_type == "Relu"][-1]
    model.graph.output.extend([onnx.helper.make_empty_tensor_value_info(last)])
    logits, features = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert features.shape == (2, 4, 3, 3)  # 17 → 9 (stem) → 5 → 3
    # the numpy pass that fitted the scales computes what onnxruntime computes (both images, no crop)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["fit"]["images"] == 2 and meta["fit"]["crop"] == 17
    assert np.sqrt(np.mean(features**2)) == pytest.approx(meta["fit"]["convs"][-1]["output_rms"], abs=2e-4)


@pytest.mark.parametrize("bad", [["--convs", "3"], ["--convs", "0"], ["--channels", "0"]])
def test_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit):
        mrc.main(["--out-dir", str(tmp_path), *bad])
