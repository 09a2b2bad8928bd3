"""shapes.py: ``--input-shape`` parsing, graph inputs, resolving dynamic dims, shape inference
and cost counting (MACs, parameters), each checked against numbers worked out by hand.

Every count here is an integer computed exactly (no tolerance): a conv's MACs are
``out positions × C_out × C_in/group × kh × kw``, a parameter count is a sum of element counts.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, three_layer_net
from onnx_dwdecomp import shapes
from onnx_dwdecomp.data.specs import InputSpec
from onnx_dwdecomp.errors import ModelError, OptionError
from onnx_dwdecomp.shapes import (ModelCost, TensorInfo, graph_inputs, infer_tensor_info, model_cost, node_macs,
                                  parse_input_shape, parse_input_shapes, resolve_input_shapes, split_shapes)

F32 = np.dtype("float32")


# --- parse_input_shape / parse_input_shapes -------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("x:1,3,224,224", ("x", (1, 3, 224, 224))),
    ("1,3,8,8", ("", (1, 3, 8, 8))),  # bare dims: the model's only input
    ("input:0:1,3,8,8", ("input:0", (1, 3, 8, 8))),  # TF-style names keep their colon (last ':' splits)
    ("x:7", ("x", (7,))),
    (f"x:{2**63 - 1}", ("x", (2**63 - 1,))),  # the largest int64 is allowed
])
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text, message", [
    (":1,3,8,8", "NAME:D0"),  # a colon with no name
    ("x", "integers"),  # a name with no dims
    ("x:", "integers"),
    ("x:1,,8", "integers"),
    ("x:1,a,8", "integers"),
    ("x:1,3.5", "integers"),
    ("x:1,0,8", "positive"),
    ("x:-1,3,8", "positive"),
    (f"x:1,{2**63}", r"below 2\^63"),
])
def test_parse_input_shape_rejects(text, message):
    with pytest.raises(OptionError, match=message) as err:
        parse_input_shape(text)
    assert repr(text) in str(err.value)  # the message quotes the value the user gave


def test_parse_input_shapes_by_name():
    assert parse_input_shapes(["a:1,4,10,10", "b:1,8,10,10"]) == {"a": (1, 4, 10, 10), "b": (1, 8, 10, 10)}
    assert parse_input_shapes(["2,6,12,12"]) == {"": (2, 6, 12, 12)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("values, message", [
    (["a:1,2", "a:1,3"], "'a' twice"),
    (["1,2", "3,4"], "'bare dims' twice"),
    (["1,2", "a:1,3"], "bare dims are for a single-input model"),
    (["a:1,3", "1,2"], "bare dims are for a single-input model"),  # in either order
])
def test_parse_input_shapes_rejects(values, message):
    with pytest.raises(OptionError, match=message):
        parse_input_shapes(values)


# --- split_shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    (["x:1,3,8,8"], (["x:1,3,8,8"], [])),
    (["x:1,3,8,8", "m.onnx"], (["x:1,3,8,8"], ["m.onnx"])),
    (["a:1,4", "b:1,8", "model.onnx", "out.onnx"], (["a:1,4", "b:1,8"], ["model.onnx", "out.onnx"])),
    (["1,3,8,8", "models/net"], (["1,3,8,8"], ["models/net"])),  # a path without ':' ends the shapes
    (["2,6,12,12", "7"], (["2,6,12,12", "7"], [])),  # digits (and commas) are shapes
    (["x:1,3", "D:/M.ONNX"], (["x:1,3"], ["D:/M.ONNX"])),  # the .onnx test ignores case (a colon: not a NAME:)
    (["C:/models/a.onnx", "x:1,3"], ([], ["C:/models/a.onnx", "x:1,3"])),  # a .onnx path with a colon
    (["m.onnx", "x:1,3"], ([], ["m.onnx", "x:1,3"])),  # everything after the first positional stays
    ([], ([], [])),
])
def test_split_shapes(values, expected):
    assert split_shapes(values) == expected


# --- graph_inputs --------------------------------------------------------------------------------

def _vi(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_graph_inputs_skips_initializers_listed_as_inputs():
    model = conv_model(np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32), hw=(6, 5))
    model.graph.input.append(_vi("W", [4, 3, 3, 3]))  # old exporters list weights as inputs
    model.graph.input.append(_vi("B", [4]))
    assert graph_inputs(model) == [InputSpec("x", F32, (1, 3, 6, 5))]


def test_graph_inputs_dynamic_dims_and_dtypes():
    model = _model([helper.make_node("Identity", ["a"], ["y"]), helper.make_node("Identity", ["ids"], ["z"])],
                   [_vi("a", ["N", 3, None, 0]), _vi("ids", [2, 5], TensorProto.INT64), _vi("s", [])],
                   [_vi("y", None), _vi("z", None)])
    specs = graph_inputs(model)
    assert [s.name for s in specs] == ["a", "ids", "s"]  # graph order
    # named, unnamed and 0 dims are all unknown (None)
    assert specs[0].shape == (None, 3, None, None) and specs[0].dtype == F32
    assert specs[1].shape == (2, 5) and specs[1].dtype == np.dtype("int64")
    assert specs[2].shape == ()  # a scalar input has rank 0


def test_graph_inputs_rejects_non_tensor_input():
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
    model = _model([helper.make_node("SequenceLength", ["seq"], ["n"])], [seq], [_vi("n", [], TensorProto.INT64)])
    with pytest.raises(ModelError, match="'seq' is not a tensor"):
        graph_inputs(model)


# --- resolve_input_shapes ------------------------------------------------------------------------

def _spec(name, *dims):
    return InputSpec(name, F32, dims)


def test_resolve_fixed_shapes_unchanged_without_notes():
    assert resolve_input_shapes([_spec("x", 2, 3, 8, 8), _spec("s")]) == ({"x": (2, 3, 8, 8), "s": ()}, [])


def test_resolve_dynamic_batch_defaults_to_one_with_a_note():
    shapes_, notes = resolve_input_shapes([_spec("x", None, 3, 8, 8), _spec("m", 1, 4)])
    assert shapes_ == {"x": (1, 3, 8, 8), "m": (1, 4)}
    assert len(notes) == 1  # only the dynamic input gets a note
    assert "'x'" in notes[0] and "batch 1" in notes[0] and "--input-shape" in notes[0]


@pytest.mark.parametrize("dims", [(None, 3, None, 8), (1, 3, 8, None), (None, None)])
def test_resolve_other_unknown_dims_error_names_input_and_flag(dims):
    with pytest.raises(OptionError) as err:
        resolve_input_shapes([_spec("pixels", 1, 3, 4, 4), _spec("img", *dims)])
    msg = str(err.value)
    assert "'img'" in msg and "--input-shape img:D0,D1,..." in msg
    assert "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")" in msg  # the model's dims, ? unknown


def test_resolve_override_wins_and_fixes_every_dim():
    specs = [_spec("x", None, 3, None, None), _spec("y", None, 4)]
    shapes_, notes = resolve_input_shapes(specs, {"x": (2, 3, 10, 12)})
    assert shapes_ == {"x": (2, 3, 10, 12), "y": (1, 4)}
    assert len(notes) == 1 and "'y'" in notes[0]  # the overridden input needs no note


def test_resolve_override_beats_calibration_data_shape():
    shapes_, _ = resolve_input_shapes([_spec("x", None, 3, None, None)], {"x": (4, 3, 6, 6)},
                                      data_shapes={"x": (3, 9, 9)})
    assert shapes_ == {"x": (4, 3, 6, 6)}


def test_resolve_data_shapes_fill_unknown_dims_only():
    specs = [_spec("x", None, 3, None, 7)]
    shapes_, notes = resolve_input_shapes(specs, data_shapes={"x": (3, 9, 7)})
    assert shapes_ == {"x": (1, 3, 9, 7)} and len(notes) == 1  # data never give the batch: still 1, noted
    # a dim the model fixes is the model's (the data loader checks the data against it, not this)
    shapes_, _ = resolve_input_shapes(specs, data_shapes={"x": (5, 9, 99)})
    assert shapes_ == {"x": (1, 3, 9, 7)}


@pytest.mark.parametrize("override, message", [
    ({"img": (1, 3, 8, 8)}, r"names 'img', but the model's inputs are \['x'\]"),
    ({"x": (1, 3, 8)}, r"rank 3 given, the model's input has rank 4 \(\?, 3, \?, \?\)"),
    ({"x": (1, 4, 8, 8)}, "dim 1 is fixed to 3 in the model, got 4"),
])
def test_resolve_override_errors(override, message):
    with pytest.raises(OptionError, match=message):
        resolve_input_shapes([_spec("x", None, 3, None, None)], override)


def test_resolve_does_not_mutate_overrides():
    overrides = {"x": (1, 3, 8, 8)}
    resolve_input_shapes([_spec("x", None, 3, 8, 8)], overrides)
    assert overrides == {"x": (1, 3, 8, 8)}


# --- infer_tensor_info / node_macs / model_cost on a hand-checkable model ------------------------

def _arange(name, shape):
    return numpy_helper.from_array((np.arange(np.prod(shape)) / 100).astype(np.float32).reshape(shape), name)


def cost_net() -> onnx.ModelProto:
    """x[N, 4, 9, 8] → full 3×3 conv (pad 1) → strided 3×3 conv (stride 2, no pad) → depthwise
    3×3 (group 6, pad 1) → grouped 1×1 (group 2) → Flatten → Gemm (transB) → MatMul by a
    ``Constant`` → y[N, 5]. ``wa`` is also listed as a graph input (an initializer, not an input)."""
    inits = [_arange("wa", (6, 4, 3, 3)), _arange("ba", (6,)), _arange("ws", (6, 6, 3, 3)),
             _arange("wd", (6, 1, 3, 3)), _arange("wg", (4, 3, 1, 1)), _arange("gb", (10, 48)), _arange("gc", (10,))]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="full", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "ws"], ["s"], name="strided", strides=[2, 2]),
        helper.make_node("Conv", ["s", "wd"], ["d"], name="depthwise", group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "wg"], ["g"], name="grouped", group=2),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "gb", "gc"], ["h"], name="fc", transB=1),
        helper.make_node("Constant", [], ["mw"], name="const", value=_arange("mwv", (10, 5))),
        helper.make_node("MatMul", ["h", "mw"], ["y"], name="mm"),
    ]
    return _model(nodes, [_vi("x", ["N", 4, 9, 8]), _vi("wa", [6, 4, 3, 3])], [_vi("y", ["N", 5])], inits)


# By hand, batch 1. Output sizes: full conv keeps 9×8; strided: (9-3)//2+1 = 4, (8-3)//2+1 = 3.
COST_NET_MACS = {
    "full": 9 * 8 * 6 * 4 * 3 * 3,       # 15552
    "strided": 4 * 3 * 6 * 6 * 3 * 3,    # 3888
    "depthwise": 4 * 3 * 6 * 1 * 3 * 3,  # 648: C_in / group = 1
    "grouped": 4 * 3 * 4 * 3 * 1 * 1,    # 144: C_in / group = 6 / 2
    "flatten": 0,
    "fc": 10 * 48,                       # 480: out features × in features
    "const": 0,
    "mm": 5 * 10,                        # 50
}
# wa + ba + ws + wd + wg + gb + gc + the Constant's tensor
COST_NET_PARAMS = 216 + 6 + 324 + 54 + 12 + 480 + 10 + 50


def test_cost_net_is_valid():
    onnx.checker.check_model(cost_net(), full_check=True)


def test_infer_tensor_info_shapes_at_resolved_input_shape():
    model = cost_net()
    specs = graph_inputs(model)
    assert [s.name for s in specs] == ["x"]
    resolved, _ = resolve_input_shapes(specs)
    infos = infer_tensor_info(model, resolved)
    expected = {"x": (1, 4, 9, 8), "a": (1, 6, 9, 8), "s": (1, 6, 4, 3), "d": (1, 6, 4, 3), "g": (1, 4, 4, 3),
                "f": (1, 48), "h": (1, 10), "mw": (10, 5), "y": (1, 5),
                "wa": (6, 4, 3, 3), "wd": (6, 1, 3, 3), "gc": (10,)}  # initializers too
    assert {k: infos[k].shape for k in expected} == expected
    assert all(infos[k].dtype == F32 for k in expected)
    # the model itself keeps its dynamic batch (inference works on a copy)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_node_macs_and_model_cost_by_hand():
    model = cost_net()
    infos = infer_tensor_info(model, {"x": (1, 4, 9, 8)})
    assert {n.name: node_macs(n, infos) for n in model.graph.node} == COST_NET_MACS
    assert model_cost(model, infos) == ModelCost(sum(COST_NET_MACS.values()), COST_NET_PARAMS)


def test_model_cost_scales_macs_with_batch_not_params():
    model = cost_net()
    cost = model_cost(model, infer_tensor_info(model, {"x": (3, 4, 9, 8)}))
    assert cost == ModelCost(3 * sum(COST_NET_MACS.values()), COST_NET_PARAMS)


def test_model_cost_params_without_shapes_and_macs_zero_when_unknown():
    # no tensor infos: params are still counted, no MACs can be
    assert model_cost(cost_net(), {}) == ModelCost(0, COST_NET_PARAMS)


def test_three_layer_net_cost():
    model = three_layer_net(c=6, width=12, hw=12)
    cost = model_cost(model, infer_tensor_info(model, {"x": (1, 6, 12, 12)}))
    macs = 144 * 12 * 6 * 9 + 144 * 12 * 12 * 9 + 144 * 6 * 12 * 9  # padded 3×3 convs keep 12×12
    params = (12 * 6 * 9 + 12) + (12 * 12 * 9 + 12) + (6 * 12 * 9 + 6)
    assert cost == ModelCost(macs, params)


def _infos(**shapes_):
    return {k: TensorInfo(v, F32) for k, v in shapes_.items()}


def test_node_macs_conv_1d_and_3d():
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    assert node_macs(conv, _infos(x=(1, 4, 10), w=(8, 4, 3), y=(1, 8, 8))) == 8 * 8 * 4 * 3
    assert node_macs(conv, _infos(x=(2, 2, 5, 5, 5), w=(3, 2, 3, 3, 3), y=(2, 3, 3, 3, 3))) == 2 * 27 * 3 * 2 * 27


def test_node_macs_conv_transpose():
    # stride-2 2×2 transposed conv, C_in 4 → C_out 2: each of the 1·4·3·3 input values is
    # multiplied into C_out/group · kh · kw = 2·2·2 outputs (ONNX weight layout (C_in, C_out/group, k...))
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])
    assert node_macs(node, _infos(x=(1, 4, 3, 3), w=(4, 2, 2, 2), y=(1, 2, 6, 6))) == 36 * 8
    grouped = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2)
    assert node_macs(grouped, _infos(x=(1, 4, 3, 3), w=(4, 3, 3, 3), y=(1, 6, 5, 5))) == 36 * 27
    assert node_macs(node, _infos(w=(4, 2, 2, 2), y=(1, 2, 6, 6))) == 0  # input shape unknown


def test_node_macs_conv_transpose_matches_an_actual_model():
    """The transposed conv count above, on a real model whose shapes come from inference."""
    w = _arange("w", (4, 2, 2, 2))
    model = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])],
                   [_vi("x", [1, 4, 3, 3])], [_vi("y", None)], [w])
    infos = infer_tensor_info(model, {"x": (1, 4, 3, 3)})
    assert infos["y"].shape == (1, 2, 6, 6)
    assert model_cost(model, infos) == ModelCost(36 * 8, 32)


@pytest.mark.parametrize("attrs, a_shape, expected", [
    ({}, (3, 7), 3 * 5 * 7),
    ({"transA": 1}, (7, 3), 3 * 5 * 7),  # A given as (K, M)
    ({"transB": 1}, (3, 7), 3 * 5 * 7),  # transB does not change K's axis in A
    ({"transA": 0}, (3, 7), 3 * 5 * 7),
])
def test_node_macs_gemm(attrs, a_shape, expected):
    node = helper.make_node("Gemm", ["a", "b"], ["y"], **attrs)
    assert node_macs(node, _infos(a=a_shape, y=(3, 5))) == expected


@pytest.mark.parametrize("a, y, expected", [
    ((3, 7), (3, 5), 3 * 5 * 7),
    ((2, 4, 3, 7), (2, 4, 3, 5), 2 * 4 * 3 * 5 * 7),  # batched: every output element costs K
    ((7,), (5,), 5 * 7),  # 1-D A: a vector–matrix product
])
def test_node_macs_matmul(a, y, expected):
    assert node_macs(helper.make_node("MatMul", ["a", "b"], ["y"]), _infos(a=a, y=y)) == expected


def test_node_macs_zero_for_other_ops_and_unknown_shapes():
    assert node_macs(helper.make_node("Relu", ["x"], ["y"]), _infos(x=(1, 3), y=(1, 3))) == 0
    assert node_macs(helper.make_node("Conv", ["x", "w"], ["y"]), _infos(x=(1, 3, 4, 4), w=(2, 3, 3, 3))) == 0
    assert node_macs(helper.make_node("Gemm", ["a", "b"], ["y"]), _infos(y=(3, 5))) == 0
    assert node_macs(helper.make_node("MatMul", ["a", "b"], ["y"]), {"a": TensorInfo(None, F32),
                                                                      "y": TensorInfo((3, 5), F32)}) == 0


def test_node_macs_is_exact_beyond_int32():
    # 1·512·1024·1024 outputs × 512·3·3 taps = 2.47e12: no int32 (or float) overflow/rounding
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    macs = node_macs(node, _infos(x=(1, 512, 1026, 1026), w=(512, 512, 3, 3), y=(1, 512, 1024, 1024)))
    assert macs == 512 * 1024 * 1024 * 512 * 9 and isinstance(macs, int)


def test_model_cost_counts_constant_tensors_only():
    nodes = [helper.make_node("Constant", [], ["c"], value=_arange("cv", (2, 3))),
             helper.make_node("Constant", [], ["f"], value_float=1.5),  # not a tensor attribute
             helper.make_node("Add", ["x", "c"], ["s"]), helper.make_node("Mul", ["s", "f"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_arange("unused", (4,))])
    assert model_cost(model, {}) == ModelCost(0, 6 + 4)


def test_infer_tensor_info_observes_runtime_computed_shapes(monkeypatch):
    """Shape → Div → Mul → Reshape: static inference cannot follow Div, so the Reshape output is
    observed with one onnxruntime run at the resolved input shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array([1, 1, 2, 1], np.int64))),
        helper.make_node("Constant", [], ["twice"], value=numpy_helper.from_array(np.array([1, 1, 1, 2], np.int64))),
        helper.make_node("Div", ["sx", "half"], ["q"]),
        helper.make_node("Mul", ["q", "twice"], ["target"]),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = _model(nodes, [_vi("x", ["N", 3, 8, 5])], [_vi("y", None)])
    observed = []
    real = shapes._observed_tensor_info
    monkeypatch.setattr(shapes, "_observed_tensor_info", lambda m, s, names: observed.append(names) or real(m, s, names))
    infos = infer_tensor_info(model, {"x": (2, 3, 8, 5)})
    assert observed == [["y"]]  # only what static inference missed is run for
    assert infos["y"] == TensorInfo((2, 3, 4, 10), F32)  # (2, 3, 8/2, 5·2)
    assert infos["sx"].shape == (4,) and infos["sx"].dtype == np.dtype("int64")


def test_infer_tensor_info_static_model_needs_no_run(monkeypatch):
    monkeypatch.setattr(shapes, "_observed_tensor_info", lambda *a: pytest.fail("onnxruntime run not needed"))
    infos = infer_tensor_info(conv_model(np.ones((5, 2, 3, 3), np.float32), hw=(7, 6), strides=[2, 2]),
                              {"x": (1, 2, 7, 6)})
    assert infos["y"].shape == (1, 5, 3, 2)  # (7-3)//2+1, (6-3)//2+1


def test_infer_tensor_info_bad_model_is_a_model_error():
    # (1, 4, 6, 6) + (3,) does not broadcast: static inference leaves y unknown, onnxruntime fails
    model = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", ["N", 4, 6, 6])], [_vi("y", None)],
                   [_arange("w", (3,))])
    with pytest.raises(ModelError, match="cannot determine tensor shapes"):
        infer_tensor_info(model, {"x": (1, 4, 6, 6)})
