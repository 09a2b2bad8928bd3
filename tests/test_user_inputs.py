"""Issue 22: the models and data users actually have — image folders on models with dynamic
H/W, quantized models, inputs without a sample axis (scalars, [1]-shaped scales, weights fed as
graph inputs), one error measure, ConvTranspose, hostile paths and declared sizes, the help.

Pipeline-level (``decompose`` / ``cli.main``) on tiny models; ``--select all`` everywhere (latency
selection times onnxruntime: slow and machine-dependent).
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp import decompose
from onnx_dwdecomp.data.dataset import DEFAULT_CALIB_SIZE, load_calibration
from onnx_dwdecomp.data.specs import InputSpec
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import CalibrationError
from onnx_dwdecomp.verify import agreement, output_scales

ALL = {"select": "all", "multiplier": 1}


def _dynamic_hw(c: int = 3) -> onnx.ModelProto:
    m = three_layer_net(c=c)
    for vi in list(m.graph.input) + list(m.graph.output):
        for k in (2, 3):
            vi.type.tensor_type.shape.dim[k].dim_param = "HW"[k - 2]
    return m


def _images(folder, n: int = 8, size=(20, 24)):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


# ---- 1. image folders on a model with dynamic H/W


@pytest.mark.parametrize("shape", [{"x": (1, 3, 16, 16)}, {"": (1, 3, 16, 16)}, {"x": (8, 3, 16, 16)}],
                         ids=["named", "bare dims", "batch 8"])
def test_image_folder_on_dynamic_hw_is_cropped_to_the_input_shape(tmp_path, shape):
    """Before: 'give the size to crop to with --input-shape' whatever --input-shape said (the data
    was read before the shape was applied)."""
    model, report = decompose(_dynamic_hw(), calib=str(_images(tmp_path / "imgs")), input_shapes=shape, **ALL)
    assert report.calibration["samples"] + report.calibration["heldout_samples"] == 8
    assert report.options["input_shapes"]["x"][2:] == [16, 16]
    assert len(report.layers) == 3


def test_image_folder_on_dynamic_hw_without_a_size_says_which_flag(tmp_path):
    with pytest.raises(CalibrationError, match="--input-shape"):
        decompose(_dynamic_hw(), calib=str(_images(tmp_path / "imgs")), **ALL)


# ---- 2. quantized models, 5. ConvTranspose


def _quantized(tmp_path, fmt: str) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    onnx.save(three_layer_net(), str(tmp_path / "float.onnx"))
    data = correlated_images(4, 6, 12, 12)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": data[i:i + 1]} for i in range(len(data))])

        def get_next(self):
            return next(self.feeds, None)

    out = tmp_path / f"{fmt}.onnx"
    quantize_static(str(tmp_path / "float.onnx"), str(out), Reader(), quant_format=getattr(QuantFormat, fmt))
    return str(out)


def test_qdq_model_says_what_to_do(tmp_path):
    """Before: only 'weight … is computed at run time, not a constant' per conv."""
    _, report = decompose(_quantized(tmp_path, "QDQ"), select="all")
    assert not report.layers
    assert all("quantized (QDQ)" in s.reason and "decompose the float model, then quantize" in s.reason
               for s in report.skipped)
    assert any(n.startswith("the model is quantized (QDQ format: the weights of all 3 Conv") for n in report.notes)


def test_qoperator_model_lists_its_convs_and_says_there_is_no_float_conv(tmp_path):
    """Before: empty tables, no word about QLinearConv."""
    _, report = decompose(_quantized(tmp_path, "QOperator"), select="all")
    assert [s.reason.split(":")[0] for s in report.skipped] == ["quantized conv (QLinearConv, QOperator format)"] * 3
    assert any("QOperator format: 3 QLinearConv" in n and "no float Conv" in n for n in report.notes)
    assert "QLinearConv" in report.render()


def test_a_model_without_convs_says_so():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, report = decompose(m, select="all")
    assert "the model has no Conv node: nothing to decompose" in report.notes


def test_conv_transpose_is_listed_among_the_skipped_convs():
    m = three_layer_net()
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("ConvTranspose", ["pre", "wt"], ["y"], name="up", strides=[2, 2]))
    m.graph.initializer.append(numpy_helper.from_array(np.full((6, 2, 2, 2), 0.1, np.float32), "wt"))
    out = m.graph.output[0].type.tensor_type.shape
    out.dim[1].dim_value, out.dim[2].dim_value, out.dim[3].dim_value = 2, 24, 24
    _, report = decompose(m, select="all")
    assert [(s.name, s.reason) for s in report.skipped if "ConvTranspose" in s.reason] == [
        ("up", "ConvTranspose (transposed conv): not decomposed, only Conv is")]


# ---- 3. inputs without a sample axis


def _scaled_net(scale_shape: list[int]) -> onnx.ModelProto:
    """three_layer_net() times a graph input ``scale`` of ``scale_shape`` (rank 0: a scalar)."""
    m = three_layer_net()
    m.graph.node[-1].output[0] = "unscaled"
    m.graph.node.append(helper.make_node("Mul", ["unscaled", "scale"], ["y"], name="scale_mul"))
    m.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, scale_shape))
    return m


def _run_reference(model, x, scale):
    from conftest import run_model
    return run_model(model, {"x": x, "scale": np.asarray(scale, np.float32)})[0]


@pytest.mark.parametrize("shape,value,per_run", [
    ([], np.float32(2.0), False),  # one value for every sample
    ([], np.linspace(1, 2, 16, dtype=np.float32), True),  # (N,): one per sample
    ([1], np.float32([2.0]), False),
    ([1], np.linspace(1, 2, 16, dtype=np.float32), True),  # (N,) for a [1] input: stacked on its axis 0
    ([1], np.linspace(1, 2, 16, dtype=np.float32)[:, None], True),  # (N, 1)
], ids=["scalar one", "scalar per sample", "[1] one", "[1] per sample (N,)", "[1] per sample (N,1)"])
def test_inputs_without_a_sample_axis_are_calibrated(shape, value, per_run):
    """Before: 'model input 'scale' is a scalar (rank 0): calibration data needs a batch axis'
    for every form; a [1] input needed --batch-size 1 found by trial."""
    x = correlated_images(16, 6, 12, 12)
    model = _scaled_net(shape)
    out, report = decompose(model, calib={"x": x, "scale": value}, **ALL)
    assert len(report.layers) == 3 and report.verification.samples == report.calibration["heldout_samples"]
    assert report.options["batch_size"] == (1 if per_run else 32)
    assert any("one sample at a time" in n for n in report.notes) == per_run
    # the rewritten model still takes the scale: output scales with it (tolerance: float32 round-off)
    s = np.array(3.0, np.float32).reshape(shape)
    np.testing.assert_allclose(_run_reference(out, x[:2], s), 1.5 * _run_reference(out, x[:2], s / 1.5),
                               rtol=1e-5, atol=1e-6)


def test_scalar_input_from_a_reader():
    x = correlated_images(12, 6, 12, 12)

    class Reader:
        def __init__(self):
            self.k = 0

        def get_next(self):
            if self.k >= 12:
                return None
            self.k += 4
            return {"x": x[self.k - 4:self.k], "scale": np.float32(self.k)}  # one value per feed

        def rewind(self):
            self.k = 0

    data = load_calibration(Reader(), [InputSpec("x", np.float32, (None, 6, 12, 12)), InputSpec("scale", np.float32, ())])
    assert data.unbatched == {"scale"} and data.max_batch == 1 and data.sample_shapes["scale"] == ()
    feeds = [b.feeds for b in data.iter_batches(1)]
    assert [float(f["scale"]) for f in feeds] == [4.0] * 4 + [8.0] * 4 + [12.0] * 4
    assert all(f["scale"].shape == () and f["x"].shape == (1, 6, 12, 12) for f in feeds)
    _, report = decompose(_scaled_net([]), calib=Reader(), **ALL)
    assert len(report.layers) == 3


def test_scalar_input_wrong_form_says_what_fits():
    with pytest.raises(CalibrationError, match=r"'scale': model input a scalar \(rank 0\): give one value of "
                                               r"shape \(\) for every sample, or one per sample, shape \(N,\)"):
        decompose(_scaled_net([]), calib={"x": correlated_images(8, 6, 12, 12), "scale": np.ones((8, 1), np.float32)},
                  **ALL)


def test_conv_weight_fed_as_a_graph_input_is_calibrated():
    """Before: "'x' has 48, 'w' has 16" (the weight's axis 0 read as samples)."""
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "W"], ["y"], name="conv_w", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 8, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])],
        initializer=[numpy_helper.from_array(
            (np.random.default_rng(1).standard_normal((8, 4, 3, 3)) / 6).astype(np.float32), "w0")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    w = np.random.default_rng(2).standard_normal((16, 8, 3, 3)).astype(np.float32)
    _, report = decompose(m, calib={"x": correlated_images(48, 4, 8, 8), "W": w}, **ALL)
    assert [layer.name for layer in report.layers] == ["conv0"]
    assert report.options["batch_size"] == 32  # one weight for all samples: batches as usual
    # per sample weights, (N, 16, 8, 3, 3): accepted too, one run per sample
    _, report = decompose(m, calib={"x": correlated_images(8, 4, 8, 8), "W": np.stack([w, 2 * w] * 4)}, **ALL)
    assert report.options["batch_size"] == 1


# ---- 4. one error measure


def test_near_dead_features_are_pooled_against_a_typical_feature():
    """60 live channels off by 1 %, 5 near-dead ones (RMS 1e-4 of the others) off by 1e-3 in
    absolute terms. Before: per-feature error 0.28 (the dead channels floored at 1e-3 of the
    RMS); now the pooled dead channels count once, against one typical channel's scale."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((64, 65))
    y[:, 60:] *= 1e-4
    y_hat = y.copy()
    y_hat[:, :60] += 0.01 * rng.standard_normal((64, 60))
    y_hat[:, 60:] += 1e-3 * rng.standard_normal((64, 5))
    a = agreement(y, y_hat, output_scales([("y", y)])["y"])
    assert a.feature_rel_l2 == pytest.approx(0.01, rel=0.15)  # tolerance: sampling noise of 64 rows
    # a small but live feature (1e-2 of the others, like a detection head's objectness) counts alone
    y[:, 60:] *= 100
    a = agreement(y, y_hat, output_scales([("y", y)])["y"])
    assert a.feature_rel_l2 > 0.05


def test_max_rel_error_gates_the_per_feature_error(tmp_path, capsys):
    """Output channel 5 of 6 is faint (1e-2 of the others) and the only one a rank-1 form cannot
    fit: the plain rel. L2 hides its error, the per-feature error does not. Before:
    --max-rel-error compared the plain rel. L2, so a bound between the two passed."""
    from conftest import conv_model, separable_weight

    w = separable_weight(6, 4, 3, 3, rank=1)
    w[5] = 0.01 * np.random.default_rng(5).standard_normal((4, 3, 3))
    onnx.save(conv_model(w, pads=[1, 1, 1, 1]), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", correlated_images(32, 4, 9, 8))
    argv = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "--select", "all", "--multiplier", "1",
            "--report", str(tmp_path / "r.json"), "--quiet"]
    assert main(argv + ["-o", str(tmp_path / "probe.onnx")]) == 0
    import json
    out = json.loads((tmp_path / "r.json").read_text())["verification"]["outputs"]["y"]
    assert out["feature_rel_l2"] > 10 * out["rel_l2"]
    bound = np.sqrt(out["feature_rel_l2"] * out["rel_l2"])  # between the two measures
    assert main(argv + ["-o", str(tmp_path / "gated.onnx"), "--max-rel-error", f"{bound:.6g}"]) == 1
    err = capsys.readouterr().err
    assert "output rel. error" in err and "per-feature relative L2" in err and not (tmp_path / "gated.onnx").exists()


def test_report_tables_use_one_name_and_unit(tmp_path):
    _, report = decompose(three_layer_net(), calib=correlated_images(16, 6, 12, 12), **ALL)
    text = report.render()
    layer = report.layers[0]
    assert f"{np.sqrt(layer.rel_error):.2e}" in text.splitlines()[2]  # relative RMS, not the squared ratio
    assert "rel L2" not in text and "per-feature  " not in text
    assert text.count("rel. error") >= 3  # both table headers and their legends


# ---- 6. hostile paths and declared sizes


def test_symlink_loop_is_an_error_line(tmp_path, capsys):
    """Before: 'internal error: RuntimeError: Symlink loop …', exit 3."""
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    onnx.save(three_layer_net(), str(tmp_path / "m.onnx"))
    assert main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "a"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: --calib {tmp_path / 'a'}: is a symbolic link loop; give a path to a real file\n"


def _declared_npz(path, declared, present: int):
    rows = np.tile(correlated_images(8, *declared[1:]), (present // 8, 1, 1, 1))
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": declared})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", head.getvalue() + rows.astype("<f4").tobytes())
    return path


def test_default_reads_at_most_the_default_calib_size(tmp_path, monkeypatch):
    """A compressed member declaring 80,000 samples (3.9 GB at 3 × 64 × 64): the default reads
    its first 512 rows only (25 MB, estimated from what is read), with a note. Before: all of
    it was estimated, then read."""
    path = _declared_npz(tmp_path / "big.npz", (80000, 3, 64, 64), DEFAULT_CALIB_SIZE)
    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "1G")
    data = load_calibration(path, [InputSpec("x", np.float32, (None, 3, 64, 64))])
    assert data.num_samples == DEFAULT_CALIB_SIZE == 512
    assert data.notes and data.notes[0].startswith("calibration: read the first 512 of 80000 samples")
    assert load_calibration(path, [InputSpec("x", np.float32, (None, 3, 64, 64))], calib_size=100).notes == ()
    with pytest.raises(Exception, match="--calib-size"):  # asked for all of it: the estimate stops it
        load_calibration(path, [InputSpec("x", np.float32, (None, 3, 64, 64))], calib_size=80000)


def test_default_cap_note_reaches_the_report():
    x = correlated_images(DEFAULT_CALIB_SIZE + 8, 6, 12, 12)
    _, report = decompose(three_layer_net(), calib=x, **ALL)
    assert report.calibration["samples"] + report.calibration["heldout_samples"] == DEFAULT_CALIB_SIZE
    assert any(n.startswith(f"calibration: read the first 512 of {DEFAULT_CALIB_SIZE + 8} samples") for n in report.notes)


# ---- 7. the help


def test_help_usage_shows_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    usage = out[:out.index("\n\n")]
    assert "onnx-dwdecomp [decompose] MODEL [OUTPUT]" in usage and "onnx-dwdecomp bench" in usage
    assert "--version" in usage
