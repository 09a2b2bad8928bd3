"""Tests of onnx_dwdecomp.candidates: which convs are decomposed and why others are skipped."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.errors import ModelError, OptionError


def _graph_model(nodes, inits, inputs=None, x_shape=(1, 4, 8, 8)):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    outs = [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    g = helper.make_graph(nodes, "g", inputs, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _w(*shape, name="W", dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _one(node_kwargs, wshape, **kw):
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c", **node_kwargs)
    return _graph_model([node], [_w(*wshape)], **kw)


def test_regular_conv_is_candidate():
    cands = find_candidates(_one({"pads": [1, 0, 1, 0], "strides": [2, 1]}, (8, 4, 3, 3)))
    assert [layer.name for layer in cands.layers] == ["c"] and not cands.skipped
    layer = cands.layers[0]
    assert layer.pads == (1, 0, 1, 0) and layer.strides == (2, 1) and layer.kernel == (3, 3)
    assert layer.bias is None and layer.input == "x" and layer.output == "y" and layer.node_index == 0


@pytest.mark.parametrize("attrs,wshape,x_shape,needle", [
    ({}, (8, 4, 1, 1), (1, 4, 8, 8), "pointwise"),
    ({"group": 4}, (8, 1, 3, 3), (1, 4, 8, 8), "depthwise"),
    ({"group": 2}, (8, 2, 3, 3), (1, 4, 8, 8), "grouped"),
    ({}, (8, 4, 3), (1, 4, 8), "1-D kernel"),
])
def test_skip_reasons(attrs, wshape, x_shape, needle):
    cands = find_candidates(_one(attrs, wshape, x_shape=x_shape))
    assert not cands.layers
    assert len(cands.skipped) == 1 and cands.skipped[0].name == "c"
    assert needle in cands.skipped[0].reason


def test_weight_as_graph_input_is_skipped():
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 4, 3, 3])]
    # also with an initializer of the same name (IR<4 style: overridable at run time)
    for inits in ([], [_w(8, 4, 3, 3)]):
        cands = find_candidates(_graph_model([node], inits, inputs=inputs))
        assert not cands.layers
        assert "run time" in cands.skipped[0].reason


def test_non_float_weight_skipped():
    cands = find_candidates(_graph_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c")],
                                         [_w(8, 4, 3, 3, dtype=np.int8)]))
    assert not cands.layers and "floating" in cands.skipped[0].reason


def _two_convs():
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="stem.conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W2"], ["y"], name="head.conv", pads=[1, 1, 1, 1])]
    return _graph_model(nodes, [_w(4, 4, 3, 3), _w(8, 4, 3, 3, name="W2")])


def test_include_exclude_patterns():
    m = _two_convs()
    c = find_candidates(m, include=("stem.*",))
    assert [l.name for l in c.layers] == ["stem.conv"]
    assert [(s.name, s.reason) for s in c.skipped] == [("head.conv", "not matched by --include")]
    c = find_candidates(m, exclude=("stem.*",))
    assert [l.name for l in c.layers] == ["head.conv"]
    assert [(s.name, s.reason) for s in c.skipped] == [("stem.conv", "excluded by --exclude")]
    c = find_candidates(m, include=("*.conv",), exclude=("head*",))
    assert [l.name for l in c.layers] == ["stem.conv"]
    with pytest.raises(OptionError, match="nomatch"):
        find_candidates(m, include=("nomatch",))


def test_unnamed_conv_gets_display_name():
    node = helper.make_node("Conv", ["x", "W"], ["out_t"])
    c = find_candidates(_graph_model([node], [_w(8, 4, 3, 3)]))
    assert c.layers[0].name == "Conv@out_t"


def test_weight_via_constant_identity_cast():
    w = np.arange(8 * 4 * 9, dtype=np.float32).reshape(8, 4, 3, 3)
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "v")),
        helper.make_node("Conv", ["x", "Wc"], ["h"], name="c_const", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["W64"], ["Wi"]),
        helper.make_node("Cast", ["Wi"], ["Wf"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["Bc"], value_floats=[0.5] * 4),
        helper.make_node("Conv", ["h", "Wf", "Bc"], ["y"], name="c_cast", pads=[1, 1, 1, 1]),
    ]
    w2 = np.ones((4, 8, 3, 3), np.float64)
    model = _graph_model(nodes, [numpy_helper.from_array(w2, "W64")])
    c = find_candidates(model)
    assert [l.name for l in c.layers] == ["c_const", "c_cast"] and not c.skipped
    np.testing.assert_array_equal(c.layers[0].weight, w)
    assert c.layers[1].weight.dtype == np.float32
    np.testing.assert_array_equal(c.layers[1].bias, np.full(4, 0.5, np.float32))


def test_kernel_shape_mismatch_raises():
    with pytest.raises(ModelError, match="kernel_shape"):
        find_candidates(_one({"kernel_shape": [5, 5]}, (8, 4, 3, 3)))


def test_bias_shape_mismatch_raises():
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="c")
    with pytest.raises(ModelError, match="bias"):
        find_candidates(_graph_model([node], [_w(8, 4, 3, 3), _w(5, name="B")]))


def test_find_candidates_does_not_mutate():
    m = _two_convs()
    before = m.SerializeToString()
    find_candidates(m, include=("stem.*",))
    assert m.SerializeToString() == before


# ---- issue 15: non-finite weights never reach the solvers; IR < 4 weights are constants


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nonfinite_weight_or_bias_is_skipped_with_the_reason(value, where):
    w = np.ones((8, 4, 3, 3), np.float32)
    b = np.zeros(8, np.float32)
    (w if where == "weight" else b).flat[5] = value
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="c")
    cands = find_candidates(_graph_model([node], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]))
    assert not cands.layers
    assert cands.skipped[0].reason == f"{where} holds 1 NaN/Inf value(s); left as it is"


def test_ir3_initializers_listed_as_inputs_are_constants():
    """Before IR 4 every initializer had to be a graph input too: that is how weights were
    stored, so such a conv is a candidate (from IR 4 on the initializer is an overridable default)."""
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
              helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 4, 3, 3])]
    model = _graph_model([node], [_w(8, 4, 3, 3)], inputs=inputs)
    model.ir_version = 3
    assert [layer.name for layer in find_candidates(model).layers] == ["c"]
    model.ir_version = 4
    assert not find_candidates(model).layers
