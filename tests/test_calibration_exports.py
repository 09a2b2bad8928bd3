"""Cut tensors of torch.onnx-style exports (issue #12): shapes computed inside the graph.

Each model computes something from shapes (``Shape → Gather → Cast → Range → …``, 0-d
scalars, batch-size dependent targets) or carries an activation whose sample axis is not
axis 0 across the cut before a decomposed conv. It is compared with a *reference*: the same
network with those computations replaced by initializers, moved after the cut, or left out
where they are the identity. Both evaluate the same float32 ops on the same values, so every
conv sees bit-identical inputs and the calibrated statistics, factors and held-out errors are
equal (compared exactly), and the two decomposed models give the same outputs (to float32
rounding: the pipeline may fold a reference's constant ``Add`` into a conv bias).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import correlated_images, rel_l2, run_model
from onnx_dwdecomp import decompose
from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
from onnx_dwdecomp.calibration.segments import plan_segments
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.data.dataset import load_calibration
from onnx_dwdecomp.errors import CalibrationError
from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info, resolve_input_shapes
from onnx_dwdecomp.solve import gsvd_factors

C, F, H, W = 3, 5, 6, 7  # input channels, features, spatial size
CONVS = ["conv1", "conv2", "conv3"]


def _node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, **attrs)


def _i64(name, value):
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _f32(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _net(pre, post, inits=(), x_shape=("N", C, H, W), conv2_in="r", conv2_cin=F, conv2_cout=F):
    """x → conv1 → Relu → r, ``pre`` nodes, conv2(``conv2_in``) → c2, ``post`` nodes → z, conv3(z) → y.

    The cut before conv2 is crossed by whatever ``pre`` makes and ``post`` reads; opset 17.
    """
    rng = np.random.default_rng(0)
    shapes = {1: (F, C), 2: (conv2_cout, conv2_cin), 3: (F, F)}
    weights = []
    for k, (cout, cin) in shapes.items():
        weights += [_f32(f"W{k}", rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)),
                    _f32(f"B{k}", 0.1 * rng.standard_normal(cout))]
    conv = [_node("Conv", [i, f"W{k}", f"B{k}"], [o], name=f"conv{k}", pads=[1, 1, 1, 1])
            for k, i, o in ((1, "x", "a"), (2, conv2_in, "c2"), (3, "z", "y"))]
    nodes = [conv[0], _node("Relu", ["a"], ["r"]), *pre, conv[1], *post, conv[2]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              initializer=weights + list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _calibrate(model, x, batch, budget=CalibrationOptions.memory_budget):
    """calibrate_and_solve as the pipeline calls it (gsvd at multiplier 1); also returns each layer's stats."""
    specs = graph_inputs(model)
    data = load_calibration(x, specs)
    shapes, _ = resolve_input_shapes(specs, {}, data.sample_shapes)
    stats = {}

    def solve(layer, layer_stats, *_):  # *_: whatever else calibrate_and_solve passes (held-out error)
        stats[layer.name] = layer_stats
        return gsvd_factors(layer.weight, layer.bias, layer_stats, 1)
    outcome = calibrate_and_solve(model, find_candidates(model).layers, data, infer_tensor_info(model, shapes), solve,
                                  CalibrationOptions(batch_size=batch, memory_budget=budget),
                                  fixed_batch=specs[0].shape[0])
    return outcome, stats


def _check(model, reference, x, batch=4):
    """Same calibration as ``reference``, exactly; both decompose, run and agree."""
    fixed = graph_inputs(model)[0].shape[0]
    feeds = {"x": x[:fixed or batch]}
    np.testing.assert_array_equal(run_model(model, feeds)[0], run_model(reference, feeds)[0])  # truly equivalent
    (outcome, stats), (ref_outcome, ref_stats) = _calibrate(model, x, batch), _calibrate(reference, x, batch)
    assert list(stats) == list(ref_stats) == CONVS
    for name in CONVS:
        got, want = stats[name], ref_stats[name]
        assert got.count == want.count > 0
        for field in ("mean_x", "mean_xhat", "cov_xhat", "cov_y_xhat", "response_var"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{name}.{field}")
        np.testing.assert_array_equal(outcome.layers[name].factors.dense_weight(),
                                      ref_outcome.layers[name].factors.dense_weight())
        assert outcome.layers[name].heldout_error == ref_outcome.layers[name].heldout_error
    new, report = decompose(model, calib=x, batch_size=batch, method="gsvd", multiplier=1, select="all")
    new_ref, _ = decompose(reference, calib=x, batch_size=batch, method="gsvd", multiplier=1, select="all")
    assert [layer.name for layer in report.layers] == CONVS
    assert [n.op_type for n in new.graph.node].count("Conv") == 6  # every conv rewritten into two
    out = run_model(new, feeds)[0]
    assert np.isfinite(out).all()
    # the pipeline may fold a reference's constant Add into a conv bias: float32 rounding
    assert rel_l2(run_model(new_ref, feeds)[0], out) <= 1e-5


def _images(n, h=H, w=W):
    return correlated_images(n, C, h, w, seed=1)


# ------------------------------------------------------------------------------ the models


def _anchor_net(x_shape=("N", C, H, W)):
    """torch.onnx's anchor grid: ``Shape(feat) → Gather(2) (0-d) → Cast → Mul``, ``Range``,
    ``Unsqueeze → Concat → Expand``; the 0-d stride and the 1-d ranges and grid shape cross the
    cut before conv2 and are used after it."""
    pre = [_node("Shape", ["r"], ["s"]),
           _node("Gather", ["s", "i2"], ["h"]), _node("Gather", ["s", "i3"], ["w"]),
           _node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT), _node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
           _node("Mul", ["hf", "half"], ["stride"]),
           _node("Range", ["zero", "hf", "one"], ["ys"]), _node("Range", ["zero", "wf", "one"], ["xs"]),
           _node("Unsqueeze", ["h", "ax0"], ["h1"]), _node("Unsqueeze", ["w", "ax0"], ["w1"]),
           _node("Concat", ["ones2", "h1", "w1"], ["grid_shape"], axis=0)]
    post = [_node("Reshape", ["ys", "col"], ["ycol"]), _node("Reshape", ["xs", "row"], ["xrow"]),
            _node("Expand", ["ycol", "grid_shape"], ["gy"]), _node("Expand", ["xrow", "grid_shape"], ["gx"]),
            _node("Add", ["gy", "gx"], ["g"]), _node("Mul", ["g", "stride"], ["anchors"]),
            _node("Add", ["c2", "anchors"], ["z"])]
    inits = [_i64("i2", 2), _i64("i3", 3), _f32("half", 0.5), _f32("zero", 0.0), _f32("one", 1.0),
             _i64("ax0", [0]), _i64("ones2", [1, 1]), _i64("col", [1, 1, -1, 1]), _i64("row", [1, 1, 1, -1])]
    return _net(pre, post, inits, x_shape)


def _anchor_reference(h=H, w=W):
    grid = (np.arange(h, dtype=np.float32)[:, None] + np.arange(w, dtype=np.float32)) * np.float32(h * 0.5)
    return _net([], [_node("Add", ["c2", "anchors"], ["z"])], [_f32("anchors", grid.reshape(1, 1, h, w))],
                ("N", C, h, w))


def _reshape_net(x_shape=("N", C, H, W)):
    """0-d arithmetic on Shape outputs (``H·W``, ``Size / N`` cast like the data) feeding a
    ``Concat`` that builds a Reshape target; the targets and the scale are used after conv2."""
    pre = [_node("Shape", ["r"], ["s"]),
           *[_node("Gather", ["s", f"i{k}"], [d]) for k, d in enumerate("nchw")],
           _node("Mul", ["h", "w"], ["hw"]),
           *[_node("Unsqueeze", [d, "ax0"], [d + "1"]) for d in ("n", "c", "hw")],
           _node("Concat", ["n1", "c1", "hw1"], ["flat_shape"], axis=0),
           _node("Size", ["r"], ["numel"]), _node("Div", ["numel", "n"], ["per_sample"]),
           _node("CastLike", ["per_sample", "r"], ["scale"])]
    post = [_node("Reshape", ["c2", "flat_shape"], ["t"]), _node("Softmax", ["t"], ["sm"], axis=2),
            _node("Mul", ["sm", "scale"], ["sms"]), _node("Reshape", ["sms", "s"], ["back"]),
            _node("Add", ["c2", "back"], ["z"])]
    inits = [_i64(f"i{k}", k) for k in range(4)] + [_i64("ax0", [0])]
    return _net(pre, post, inits, x_shape)


def _reshape_reference(h=H, w=W):
    post = [_node("Reshape", ["c2", "flat_shape"], ["t"]), _node("Softmax", ["t"], ["sm"], axis=2),
            _node("Mul", ["sm", "scale"], ["sms"]), _node("Reshape", ["sms", "s"], ["back"]),
            _node("Add", ["c2", "back"], ["z"])]
    inits = [_i64("flat_shape", [-1, F, h * w]), _i64("s", [-1, F, h, w]), _f32("scale", F * h * w)]
    return _net([], post, inits, ("N", C, h, w))


def _transposed_net(x_shape):
    """``Transpose(perm=[1,0,2,3])`` of r (F, N, H, W) carried over the cut, transposed back after
    conv2 and added to its output; the reference adds r itself."""
    perm = {"perm": [1, 0, 2, 3]}
    model = _net([_node("Transpose", ["r"], ["rt"], **perm)],
                 [_node("Transpose", ["rt"], ["back"], **perm), _node("Add", ["c2", "back"], ["z"])], x_shape=x_shape)
    return model, _net([], [_node("Add", ["c2", "r"], ["z"])], x_shape=x_shape)


# ------------------------------------------------------------------------------ the tests


def test_plan_segments_classifies_cut_tensors():
    """Shape-derived cut tensors (through Shape, Size, EyeLike, and CastLike's type input) are
    kept per batch; data-dependent and random ones are not, nor is a conv's input."""
    pre = [_node("Shape", ["r"], ["s"]), _node("Size", ["r"], ["k"]), _node("CastLike", ["k", "r"], ["kf"]),
           _node("Flatten", ["r"], ["flat"]), _node("EyeLike", ["flat"], ["eye"]),
           _node("Mul", ["r", "kf"], ["m"]), _node("RandomNormalLike", ["r"], ["noise"], dtype=TensorProto.FLOAT),
           _node("Expand", ["P", "s"], ["pos"])]
    post = [_node("Reshape", ["eye", "s"], ["e4"]), _node("Add", ["e4", "m"], ["z0"]),
            _node("Add", ["z0", "noise"], ["z1"]), _node("Add", ["z1", "c2"], ["z"])]
    model = _net(pre, post, [_f32("P", np.ones((1, F, H, W)))], conv2_in="pos")
    segment = plan_segments(model, [0, len(pre) + 2, len(pre) + 3 + len(post)])[1]
    assert segment.outputs == ("eye", "m", "noise", "pos", "s")
    assert segment.per_batch == ("eye", "s")  # pos: conv2's input; noise: random; m: data


def test_torch_anchor_grid_crosses_cuts():
    model = _anchor_net()
    _check(model, _anchor_reference(), _images(10))
    assert set(plan_segments(model, [0, 13, 21])[1].per_batch) == {"stride", "ys", "xs", "grid_shape"}


def test_scalar_shape_arithmetic_builds_reshape_targets():
    _check(_reshape_net(), _reshape_reference(), _images(10))


def test_constant_of_shape():
    """``ConstantOfShape`` of a sliced shape (C, H, W: no batch axis) and of the whole shape (N, …)."""
    pre = [_node("Shape", ["r"], ["s"]), _node("Slice", ["s", "one", "four"], ["chw"]),
           _node("ConstantOfShape", ["chw"], ["half_map"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
           _node("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32)))]
    post = [_node("Mul", ["half_map", "ones"], ["m"]), _node("Add", ["c2", "m"], ["z"])]
    model = _net(pre, post, [_i64("one", [1]), _i64("four", [4])])
    reference = _net([], [_node("Add", ["c2", "m"], ["z"])], [_f32("m", np.full((F, H, W), 0.5))])
    _check(model, reference, _images(10))


@pytest.mark.parametrize("batch_dim", ["N", 4], ids=["dynamic_partial_last_batch", "fixed_padded_last_batch"])
def test_batch_size_dependent_shapes(batch_dim):
    """``Shape(x)[0]`` (0-d) and targets built from it cross the cut; 10 samples in batches of 4:
    the last holds 2 (dynamic batch: N = 2 there) or is padded to 4 (fixed batch)."""
    by_n = [_node("Unsqueeze", ["n", "ax0"], ["n1"]), _node("Concat", ["n1", "minus1"], ["flat"], axis=0),
            _node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT)]
    use = [_node("Reshape", ["c2", "flat"], ["t"]), _node("Concat", ["n1", "k"], ["bshape"], axis=0),
           _node("Expand", ["row", "bshape"], ["rows"]), _node("Add", ["t", "rows"], ["t2"]),
           _node("Div", ["t2", "nf"], ["t3"]), _node("Reshape", ["t3", "s"], ["z"])]
    inits = [_i64("i0", 0), _i64("ax0", [0]), _i64("minus1", [-1]), _i64("k", [F * H * W]),
             _f32("row", np.linspace(-1, 1, F * H * W).reshape(1, -1))]
    x_shape = (batch_dim, C, H, W)
    model = _net([_node("Shape", ["r"], ["s"]), _node("Gather", ["s", "i0"], ["n"]), *by_n], use, inits, x_shape)
    # reference: the same computations after the cut, from conv2's output (same shape)
    reference = _net([], [_node("Shape", ["c2"], ["s"]), _node("Gather", ["s", "i0"], ["n"]), *by_n, *use], inits,
                     x_shape)
    _check(model, reference, _images(10))


@pytest.mark.parametrize("make, make_reference", [(_anchor_net, _anchor_reference),
                                                  (_reshape_net, _reshape_reference)], ids=["anchor", "reshape"])
def test_dynamic_spatial_inputs(make, make_reference):
    """Symbolic H/W inputs, calibration data 8×9: the shape tensors follow the data."""
    _check(make(("N", C, "H", "W")), make_reference(8, 9), _images(10, 8, 9))


def test_shape_condition_read_inside_an_if_body():
    """A 0-d bool from the shapes is the If's condition and a 0-d scalar is read only inside its
    branches (outer-scope reads): both cross the cut."""
    body = {branch: helper.make_graph([_node(op, ["c2", "hf"], [branch])], branch, [],
                                      [helper.make_tensor_value_info(branch, TensorProto.FLOAT, None)])
            for branch, op in (("then", "Add"), ("else", "Sub"))}
    pre = [_node("Shape", ["r"], ["s"]), _node("Gather", ["s", "i2"], ["h"]),
           _node("Greater", ["h", "three"], ["big"]), _node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT)]
    post = [_node("If", ["big"], ["z"], then_branch=body["then"], else_branch=body["else"])]
    model = _net(pre, post, [_i64("i2", 2), _i64("three", 3)])
    reference = _net([], [_node("Add", ["c2", "hf"], ["z"])], [_f32("hf", H)])
    _check(model, reference, _images(10))
    assert plan_segments(model, [0, 6, 8])[1].per_batch == ("big", "hf")


@pytest.mark.parametrize("batch_dim, n", [("N", 10), (F, 12)], ids=["leading_dim_differs", "leading_dim_coincides"])
def test_activation_with_sample_axis_1_crosses_a_cut(batch_dim, n):
    """A transposed activation (F, N, H, W) over the cut is kept batch by batch, bit-exact. With a
    fixed batch of F its leading dim is the batch's row count in every batch, yet the padded last
    batch must come back as computed."""
    _check(*_transposed_net((batch_dim, C, H, W)), _images(n))


def test_per_batch_values_spill_to_disk_too(tmp_path, monkeypatch):
    """With a 1-byte budget the transposed activation's per-batch values (over a page each) go to
    memory-mapped files as well: the same statistics, nothing left on disk."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the private folder goes here
    model, reference = _transposed_net(("N", C, 12, 12))
    x = _images(10, 12, 12)
    (kept, kept_stats), (spilled, spilled_stats) = _calibrate(model, x, 4), _calibrate(model, x, 4, budget=1)
    assert kept.spilled_bytes == 0
    # rt: 10 samples × F·12·12 float32 on top of what the reference spills
    assert spilled.spilled_bytes - _calibrate(reference, x, 4, budget=1)[0].spilled_bytes >= 10 * F * 144 * 4
    for name in CONVS:
        np.testing.assert_array_equal(kept_stats[name].cov_y_xhat, spilled_stats[name].cov_y_xhat)
        assert kept.layers[name].heldout_error == spilled.layers[name].heldout_error
    assert list(tmp_path.iterdir()) == []


def test_conv_input_without_a_sample_axis_is_an_error():
    """conv2 reads a transposed activation (F, N, H, W): no per-sample statistics, a clear error."""
    perm = {"perm": [1, 0, 2, 3]}
    model = _net([_node("Transpose", ["r"], ["rt"], **perm)],
                 [_node("Transpose", ["c2"], ["z"], **perm)],
                 x_shape=(4, C, H, W), conv2_in="rt", conv2_cin=4, conv2_cout=4)
    with pytest.raises(CalibrationError, match="'rt'"):
        _calibrate(model, _images(10), 4)


def test_conv_on_a_shape_derived_input():
    """A conv over a parameter expanded to the batch by ``Expand(P, Shape(r))`` still gets
    per-sample statistics (a Conv's axis 0 is its batch); a 0-d ``H`` crosses the same cut."""
    pos = np.random.default_rng(2).standard_normal((1, F, H, W))
    pre = [_node("Shape", ["r"], ["s"]), _node("Expand", ["P", "s"], ["pos"]),
           _node("Gather", ["s", "i2"], ["h"]), _node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT)]
    post = [_node("Mul", ["r", "hf"], ["rs"]), _node("Add", ["c2", "rs"], ["z"])]
    model = _net(pre, post, [_f32("P", pos), _i64("i2", 2)], conv2_in="pos")
    # reference: pos = r·0 + P, equal to the expanded P (r ≥ 0 is finite) but data-dependent
    reference = _net([_node("Mul", ["r", "zero"], ["r0"]), _node("Add", ["r0", "P"], ["pos"])],
                     post, [_f32("P", pos), _f32("zero", 0.0), _f32("hf", H)], conv2_in="pos")
    _check(model, reference, _images(10))
