"""Exporter quirks, end to end through ``decompose`` / the CLI, each with a model built here.

Already covered elsewhere (not repeated here):

- auto_pad SAME_UPPER/SAME_LOWER/VALID, asymmetric pads, dilations, strides, with and without
  bias: ``test_rewrite.py::test_roundtrip_attrs``; 1×3, 3×1, 5×5 kernels:
  ``test_rewrite.py::test_roundtrip_kernels`` (graph surgery only; the pipeline runs below).
- weights as ``Constant`` / behind ``Identity``/``Cast``: ``test_candidates.py::
  test_weight_via_constant_identity_cast`` (detection), ``test_rewrite.py::
  test_constant_producer_dropped_unnamed_conv`` (rewrite of a Constant weight).
- external data in → external data out: ``test_modelio.py::test_external_data_input_gives_external_data_output``.
- grouped / depthwise / 1×1 / 1-D convs skipped with a reason: ``test_candidates.py::test_skip_reasons``.
- opsets 11, 13, 18, 21 of the ShuffleNet builder: ``test_zoo.py::test_opsets`` (builder only).

Exact round trips use weights whose every channel slice is rank 1, so multiplier 1 reproduces
them up to float32 rounding (relative L2 ≤ 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import correlated_images, rel_l2, run_model, separable_weight
from onnx_dwdecomp import modelio
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.pipeline import DecomposeOptions
from onnx_dwdecomp.pipeline import decompose as _decompose

TOL = 1e-5
# Latency-aware selection (if present) times onnxruntime and may keep small convs: these tests
# are about graph handling, so they rewrite every candidate.
ALL = {"select": "all"} if "select" in DecomposeOptions.__dataclass_fields__ else {}
ALL_FLAG = ["--select", "all"] if ALL else []


def decompose(model, **opts):
    return _decompose(model, **ALL, **opts)


def _model(nodes, inits, x_shape, y_name="y", y_shape=("n", "c", "h", "w"), opset=17, extra_inputs=(),
           y_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *extra_inputs],
        [helper.make_tensor_value_info(y_name, y_type, y_shape)], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    return model


def _exact(model, x, **opts):
    """Decompose at multiplier 1 (data-free) and return (new model, report, rel. L2 on ``x``)."""
    new, report = decompose(model, **opts)
    onnx.checker.check_model(new, full_check=True)
    err = rel_l2(run_model(model, {"x": x})[0], run_model(new, {"x": x})[0])
    return new, report, err


def _ops(model):
    return [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------- weights as constants


@pytest.mark.parametrize("style", ["constant", "identity_cast_f64", "cast_f16_constant"])
def test_weight_producers_rewritten_and_dropped(style):
    w = separable_weight(6, 4, 3, 3, rank=1, seed=1)
    b = np.linspace(-1, 1, 6).astype(np.float32)
    if style == "constant":  # Paddle2ONNX: weights and bias as Constant nodes
        nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "v")),
                 helper.make_node("Constant", [], ["Bc"], value=numpy_helper.from_array(b, "vb"))]
        inits, wname, bname = [], "Wc", "Bc"
    elif style == "identity_cast_f64":  # double initializer → Identity → Cast(float)
        nodes = [helper.make_node("Identity", ["W64"], ["Wi"]),
                 helper.make_node("Cast", ["Wi"], ["Wf"], to=TensorProto.FLOAT)]
        inits, wname, bname = [numpy_helper.from_array(w.astype(np.float64), "W64"),
                               numpy_helper.from_array(b, "B")], "Wf", "B"
    else:  # fp16 Constant → Cast(float): the weight the conv sees is the rounded fp16 value
        w = w.astype(np.float16).astype(np.float32)
        nodes = [helper.make_node("Constant", [], ["W16"], value=numpy_helper.from_array(w.astype(np.float16), "v")),
                 helper.make_node("Cast", ["W16"], ["Wf"], to=TensorProto.FLOAT)]
        inits, wname, bname = [numpy_helper.from_array(b, "B")], "Wf", "B"
    nodes.append(helper.make_node("Conv", ["x", wname, bname], ["y"], name="conv", pads=[1, 1, 1, 1]))
    model = _model(nodes, inits, [1, 4, 7, 7], y_shape=[1, 6, 7, 7])
    x = np.random.default_rng(0).standard_normal((1, 4, 7, 7)).astype(np.float32)
    new, report, err = _exact(model, x)
    assert [l.name for l in report.layers] == ["conv"]
    assert _ops(new) == ["Conv", "Conv"]  # the Constant/Identity/Cast producers are gone
    assert err <= (1e-3 if style == "cast_f16_constant" else TOL), err  # fp16 rounding breaks exact rank 1
    assert {t.name for t in new.graph.initializer} == {"conv/depthwise.weight", "conv/pointwise.weight",
                                                        "conv/pointwise.bias"}


# --------------------------------------------------------------------------- kernels and padding


@pytest.mark.parametrize("kh,kw", [(1, 3), (3, 1), (5, 5), (7, 7)])
@pytest.mark.parametrize("attrs", [
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID", "dilations": [2, 1]},
    {"pads": [0, 2, 1, 0], "dilations": [1, 2], "strides": [1, 2]},  # asymmetric pads
], ids=["same_upper", "same_lower_s2", "valid_dil", "asym_pads_dil"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_kernels_padding_bias_through_pipeline(kh, kw, attrs, with_bias):
    w = separable_weight(5, 3, kh, kw, rank=1, seed=kh * 10 + kw)
    inputs, inits = ["x", "W"], [numpy_helper.from_array(w, "W")]
    if with_bias:
        inputs.append("B")
        inits.append(numpy_helper.from_array(np.arange(5, dtype=np.float32), "B"))
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kh, kw], **attrs)
    model = _model([node], inits, [1, 3, 15, 14])
    x = np.random.default_rng(1).standard_normal((1, 3, 15, 14)).astype(np.float32)
    new, report, err = _exact(model, x)
    assert err <= TOL, err
    assert report.verification.worst_rel_l2() <= TOL
    dw = new.graph.node[0]
    got = {a.name: helper.get_attribute_value(a) for a in dw.attribute}
    assert got["kernel_shape"] == [kh, kw] and got["group"] == 3
    for key, value in attrs.items():
        assert got[key] == (value.encode() if isinstance(value, str) else value)
    assert (len(new.graph.node[1].input) == 3)  # pointwise always carries the (maybe zero) bias


# --------------------------------------------------------------------------- opsets


def _opset_net(opset: int) -> onnx.ModelProto:
    """Conv → Relu → Split(2) → Concat → Conv → ReduceMean: ops whose signature changed across 11..21."""
    rng = np.random.default_rng(opset)
    w1, w2 = separable_weight(8, 4, 3, 3, 1, seed=opset), separable_weight(6, 8, 3, 3, 1, seed=opset + 1)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B1")]
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "split"))
        split = helper.make_node("Split", ["r", "split"], ["s0", "s1"], axis=1)
    else:
        split = helper.make_node("Split", ["r"], ["s0", "s1"], axis=1, split=[4, 4])
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["c2", "axes"], ["y"], keepdims=0)
    else:
        mean = helper.make_node("ReduceMean", ["c2"], ["y"], axes=[2, 3], keepdims=0)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"]), split,
             helper.make_node("Concat", ["s1", "s0"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]), mean]
    return _model(nodes, inits, ["N", 4, 8, 8], y_shape=["N", 6], opset=opset)


@pytest.mark.parametrize("opset", range(11, 22))
def test_opsets_11_to_21(opset):
    model = _opset_net(opset)
    x = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    new, report, err = _exact(model, x)
    assert [l.name for l in report.layers] == ["conv1", "conv2"]
    assert err <= TOL
    assert list(new.opset_import) == list(model.opset_import) and new.ir_version == model.ir_version


# --------------------------------------------------------------------------- batch and spatial dims


@pytest.mark.parametrize("batch", [3, "N"], ids=["static_batch_3", "dynamic_batch"])
def test_static_and_dynamic_batch_with_calibration(tmp_path, batch):
    w = separable_weight(6, 3, 3, 3, rank=1, seed=4)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = _model([node], [numpy_helper.from_array(w, "W")], [batch, 3, 10, 10])
    calib = tmp_path / "c.npy"
    np.save(calib, correlated_images(10, 3, 10, 10, seed=1))  # 10 is not a multiple of 3: padding
    # svd: exact on these weights, yet it runs the calibration passes (padded fixed batches)
    new, report = decompose(model, calib=str(calib), batch_size=4, method="svd")
    assert report.calibration["samples"] >= 1 and report.verification.inputs == "held-out calibration samples"
    assert new.graph.input[0] == model.graph.input[0]  # batch dim kept as it was
    assert report.verification.worst_rel_l2() <= TOL
    n = 3 if batch == 3 else 5
    x = np.random.default_rng(3).standard_normal((n, 3, 10, 10)).astype(np.float32)
    assert rel_l2(run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL


def _dynamic_spatial_model():
    w = separable_weight(6, 3, 3, 3, rank=1, seed=5)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])
    return _model([node], [numpy_helper.from_array(w, "W")], ["N", 3, "H", "W"], y_shape=["N", 6, "h", "w"])


def test_dynamic_spatial_dims_need_a_shape():
    with pytest.raises(OptionError, match="--input-shape x:"):
        decompose(_dynamic_spatial_model())


def test_dynamic_spatial_dims_from_input_shape_flag():
    model = _dynamic_spatial_model()
    new, report = decompose(model, input_shapes={"x": (2, 3, 12, 16)})
    assert report.options["input_shapes"] == {"x": [2, 3, 12, 16]}
    # MACs at 12×16, stride 2: 6·8 positions · 2 images · (6·3·9) regular MACs
    assert report.layers[0].macs_before == 2 * 6 * 8 * 6 * 3 * 9
    assert new.graph.input[0] == model.graph.input[0]  # still dynamic in the output
    for hw in [(5, 7), (20, 9)]:  # and runs at other sizes
        x = np.random.default_rng(0).standard_normal((1, 3, *hw)).astype(np.float32)
        assert rel_l2(run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL


def test_dynamic_spatial_dims_from_calibration_data():
    model = _dynamic_spatial_model()
    data = correlated_images(6, 3, 14, 10, seed=2)
    new, report = decompose(model, calib=data)
    assert report.options["input_shapes"] == {"x": [1, 3, 14, 10]}
    assert report.layers[0].macs_before == 7 * 5 * 6 * 3 * 9
    assert new.graph.input[0] == model.graph.input[0]


@pytest.mark.parametrize("calibrated", [False, True], ids=["svd", "gsvd"])
def test_sequence_tensors_before_the_conv(calibrated):
    """SplitToSequence → ConcatFromSequence → Conv: static inference leaves the conv input's
    shape unknown, so it is observed with onnxruntime, whose sequence outputs are lists (they
    once crashed with AttributeError)."""
    c = 4
    w = separable_weight(6, c, 3, 3, rank=1, seed=8)
    nodes = [helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1, keepdims=1),
             helper.make_node("ConcatFromSequence", ["seq"], ["xc"], axis=1),
             helper.make_node("Conv", ["xc", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], ["n", c, 8, 8], y_shape=["n", 6, 8, 8])
    calib = correlated_images(8, c, 8, 8, seed=3) if calibrated else None
    new, report = decompose(model, calib=calib)
    assert [layer.name for layer in report.layers] == ["conv"]
    x = correlated_images(2, c, 8, 8, seed=4)
    assert rel_l2(run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]) <= (TOL if not calibrated else 1e-3)


# --------------------------------------------------------------------------- subgraphs and groups


def _control_flow_model(shared_constant: bool):
    """conv_main (3×3, weight W) feeds an If whose then-branch convs with the *same* W and
    whose else-branch is a Loop (2 trips) of a 3×3 conv with Wl; output is the If result."""
    c = 4
    w = separable_weight(c, c, 3, 3, rank=1, seed=6)
    wl = separable_weight(c, c, 3, 3, rank=1, seed=7)
    pads = dict(pads=[1, 1, 1, 1])
    def out_vi(name, elem, shape=("n", "c", "h", "w")):
        return helper.make_tensor_value_info(name, elem, shape)
    then_g = helper.make_graph([helper.make_node("Conv", ["h", "W"], ["t"], name="then_conv", **pads)],
                               "then", [], [out_vi("t", TensorProto.FLOAT)])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["v_in", "Wl"], ["v_out"], name="loop_conv", **pads)],
        "body", [out_vi("i", TensorProto.INT64, []), out_vi("cond_in", TensorProto.BOOL, []),
                 out_vi("v_in", TensorProto.FLOAT)],
        [out_vi("cond_out", TensorProto.BOOL, []), out_vi("v_out", TensorProto.FLOAT)])
    else_g = helper.make_graph([helper.make_node("Loop", ["trips", "", "h"], ["e"], name="loop", body=body)],
                               "else", [], [out_vi("e", TensorProto.FLOAT)])
    nodes, inits = [], [numpy_helper.from_array(wl, "Wl"), numpy_helper.from_array(np.array(2, np.int64), "trips")]
    if shared_constant:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "v")))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    nodes += [helper.make_node("Conv", ["x", "W"], ["h"], name="conv_main", **pads),
              helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    return _model(nodes, inits, [1, c, 6, 6], extra_inputs=[cond]), c


@pytest.mark.parametrize("shared_constant", [False, True], ids=["initializer", "constant_node"])
def test_convs_inside_if_and_loop_are_skipped_with_reason(shared_constant):
    model, c = _control_flow_model(shared_constant)
    new, report = decompose(model)
    assert [l.name for l in report.layers] == ["conv_main"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"then_conv", "loop_conv"}
    assert "inside the If subgraph of 'branch'" in reasons["then_conv"]
    assert "inside the Loop subgraph of 'loop'" in reasons["loop_conv"]
    assert all("subgraphs are not rewritten" in r for r in reasons.values())
    onnx.checker.check_model(new, full_check=True)
    # the then-branch still reads W, so W (initializer or Constant) must survive the rewrite
    x = np.random.default_rng(0).standard_normal((1, c, 6, 6)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "cond": np.array(flag)}
        assert rel_l2(run_model(model, feeds)[0], run_model(new, feeds)[0]) <= TOL


def test_grouped_conv_skipped_with_reason_in_report(tmp_path, capsys):
    w_g = np.random.default_rng(0).standard_normal((8, 2, 3, 3)).astype(np.float32)
    w = separable_weight(4, 8, 3, 3, rank=1, seed=8)
    nodes = [helper.make_node("Conv", ["x", "Wg"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["g", "W"], ["y"], name="regular", pads=[1, 1, 1, 1])]
    model = _model(nodes, [numpy_helper.from_array(w_g, "Wg"), numpy_helper.from_array(w, "W")], [1, 4, 6, 6])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    report_path = tmp_path / "r.json"
    assert main([str(src), "--report", str(report_path), *ALL_FLAG]) == 0
    out = capsys.readouterr().out
    assert "grouped" in out and "group=2" in out  # the table names the skipped conv and why
    d = json.loads(report_path.read_text())
    assert [l["name"] for l in d["layers"]] == ["regular"]
    assert d["skipped"] == [{"name": "grouped", "reason": "grouped conv (group=2); only group=1 is decomposed"}]
    new = onnx.load(str(tmp_path / "m.dw.onnx"))
    assert new.graph.node[0].SerializeToString() == model.graph.node[0].SerializeToString()


# --------------------------------------------------------------------------- > 2 GB models


def _big_model(folder: Path, table_bytes: int) -> Path:
    """A small conv net plus a ``table_bytes`` float table read by a Gather, saved with external
    data. The table's data file is created sparse (``truncate``), so building costs no time or
    disk; loading it reads zeros."""
    rows = -(-table_bytes // (4 * 256))
    w = separable_weight(6, 3, 3, 3, rank=1, seed=9)
    table = onnx.TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[rows, 256])
    data = folder / "big.onnx.data"
    with open(data, "wb") as fh:
        fh.truncate(rows * 256 * 4)
    table.raw_data = b""  # set_external_data insists on the field being present
    onnx.external_data_helper.set_external_data(table, "big.onnx.data", 0, rows * 256 * 4)
    table.ClearField("raw_data")
    table.data_location = TensorProto.EXTERNAL
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["table", "idx"], ["emb"], axis=0)]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 256])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0, rows - 1], np.int64), "idx"),
                     table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save_model(model, str(path))
    return path


def _check_big_run(tmp_path, src: Path):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--quiet", *ALL_FLAG]) == 0
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.iterdir()
            if p.name in before} == before  # input and its data untouched
    data = tmp_path / "out.onnx.data"
    assert data.exists() and data.stat().st_size > (tmp_path / "big.onnx.data").stat().st_size - 1
    assert out.stat().st_size < 100_000  # the model file itself holds no weights
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    y, emb = sess.run(None, {"x": x})
    assert emb.shape == (2, 256) and not emb.any()
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert rel_l2(ref, y) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "out.onnx", "out.onnx.data"]


LOW_LIMIT = 64 << 10


def _lower_protobuf_limit(monkeypatch):
    """Pretend protobuf's limit is 64 KiB: our constant, and onnx's serialising helpers refuse
    bigger models the way they refuse a real > 2 GiB one."""
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", LOW_LIMIT)
    for owner, name in ((onnx.shape_inference, "infer_shapes"), (onnx.checker, "check_model")):
        real = getattr(owner, name)

        def limited(model, *args, _real=real, **kwargs):
            if isinstance(model, onnx.ModelProto) and model.ByteSize() > LOW_LIMIT:
                raise ValueError("Failed to serialize proto")  # what onnx says above 2 GiB
            return _real(model, *args, **kwargs)
        monkeypatch.setattr(owner, name, limited)


def test_over_protobuf_limit_path_with_lowered_limit(tmp_path, monkeypatch):
    """Same code path as a > 2 GiB model (``test_over_2gib_model``), with the limit lowered to
    64 KiB and a 256 KiB table: external data in and out, shape inference on a stripped copy,
    onnxruntime sessions through a temporary folder."""
    _lower_protobuf_limit(monkeypatch)
    _check_big_run(tmp_path, _big_model(tmp_path, 256 << 10))


def test_over_protobuf_limit_in_memory_model_gets_external_data(tmp_path, monkeypatch):
    """A model that is not external on input but exceeds the limit is written with external data."""
    _lower_protobuf_limit(monkeypatch)
    model = onnx.load(str(_big_model(tmp_path, 256 << 10)))  # loads the table into memory
    new, _ = decompose(model)
    out = tmp_path / "mem.onnx"
    modelio.save_model_atomic(new, out, external_data=False)
    assert (tmp_path / "mem.onnx.data").stat().st_size >= 256 << 10
    assert out.stat().st_size < 64 << 10


@pytest.mark.slow
def test_over_2gib_model(tmp_path):
    """A real 2.1 GB model (about 11 GB of RAM and three minutes; run with ``-m slow --tb=native``,
    the default traceback would print the 2 GB protobuf)."""
    _check_big_run(tmp_path, _big_model(tmp_path, (2 << 30) + (64 << 20)))
