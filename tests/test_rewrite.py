"""Tests of onnx_dwdecomp.rewrite: numerical round-trip in onnxruntime and graph invariants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, rel_l2, run_model, separable_weight
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.rewrite import Replacement, apply_replacements
from onnx_dwdecomp.solve import channel_factors, svd_factors

# Tolerance for the exact round-trips below: factors are exact up to float32 rounding, and the
# two-conv form sums in a different order than the regular conv -> ~1e-6 relative; 1e-5 margin.
TOL = 1e-5


def _rewrite_all(model, solver=None):
    cands = find_candidates(model)
    reps = []
    for layer in cands.layers:
        k = layer.kernel[0] * layer.kernel[1]
        f = solver(layer) if solver else svd_factors(layer.weight, layer.bias, k)
        reps.append(Replacement(layer, f))
    return apply_replacements(model, reps), reps


def _roundtrip(model, hw=(9, 8), seed=0, solver=None):
    c = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(seed).standard_normal((1, c, *hw)).astype(np.float32)
    new, reps = _rewrite_all(model, solver)
    assert len(reps) == 1
    onnx.checker.check_model(new, full_check=True)
    ref = run_model(model, {"x": x})[0]
    got = run_model(new, {"x": x})[0]
    assert got.shape == ref.shape
    return rel_l2(ref, got), new


def _w(n=10, c=3, kh=3, kw=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, kh, kw)).astype(np.float32)


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"pads": [0, 1, 1, 0]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
    {"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]},
], ids=["stride2", "asym_pads", "dilation2", "same_upper", "same_lower", "valid", "mixed"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_roundtrip_attrs(attrs, with_bias):
    w = _w()
    b = np.random.default_rng(1).standard_normal(10).astype(np.float32) if with_bias else None
    err, _ = _roundtrip(conv_model(w, b, **attrs))
    assert err <= TOL


@pytest.mark.parametrize("kh,kw", [(1, 3), (3, 1), (5, 5)])
def test_roundtrip_kernels(kh, kw):
    w = _w(n=kh * kw + 1, kh=kh, kw=kw)  # n >= kh·kw so rank kh·kw is available per channel
    err, _ = _roundtrip(conv_model(w, np.ones(len(w), np.float32), pads=[kh // 2, kw // 2, kh // 2, kw // 2]))
    assert err <= TOL


def test_roundtrip_multiplier_2_on_rank2_weights():
    w = separable_weight(6, 4, 3, 3, rank=2, seed=3)
    model = conv_model(w, None, pads=[1, 1, 1, 1])
    err, new = _roundtrip(model, solver=lambda layer: svd_factors(layer.weight, layer.bias, 2))
    assert err <= TOL
    dw = {n.name: n for n in new.graph.node}["conv/depthwise"]
    group = [a.i for a in dw.attribute if a.name == "group"][0]
    inits = {t.name: t for t in new.graph.initializer}
    assert group == 4 and list(inits["conv/depthwise.weight"].dims) == [8, 1, 3, 3]
    assert list(inits["conv/pointwise.weight"].dims) == [6, 8, 1, 1]


def test_channel_factors_rewrite_exact_at_full_rank():
    w = _w(n=6, c=2)
    err, new = _roundtrip(conv_model(w, np.ones(6, np.float32), pads=[1, 1, 1, 1]),
                          solver=lambda layer: channel_factors(layer.weight, layer.bias, 6))
    assert err <= TOL
    assert [n.name for n in new.graph.node] == ["conv/lowrank", "conv/lowrank_pointwise"]


def _chain_model():
    """x -> Relu(pre) -> Conv(c1, W, B) -> Sigmoid(post) -> Conv(c2, W2) -> y, with metadata."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((5, 4, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.zeros(3, np.float32), "unused_init")]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="pre"),
             helper.make_node("Conv", ["r", "W", "B"], ["c1_out"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1_out"], ["s"], name="post"),
             helper.make_node("Conv", ["s", "W2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 6, 6]),
                           helper.make_tensor_value_info("c1_out", TensorProto.FLOAT, [1, 4, 6, 6])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="unit", doc_string="doc")
    m.ir_version = 7
    onnx.helper.set_model_props(m, {"k": "v"})
    return m


def test_graph_invariants():
    m = _chain_model()
    before = m.SerializeToString()
    layer = [l for l in find_candidates(m).layers if l.name == "c1"][0]
    new = apply_replacements(m, [Replacement(layer, svd_factors(layer.weight, layer.bias, 1))])
    assert m.SerializeToString() == before  # input not mutated
    onnx.checker.check_model(new, full_check=True)
    names = [n.name for n in new.graph.node]
    assert names == ["pre", "c1/depthwise", "c1/pointwise", "post", "c2"]
    by = {n.name: n for n in new.graph.node}
    assert list(by["c1/pointwise"].output) == ["c1_out"]  # original output tensor kept
    assert by["c1/depthwise"].input[0] == "r"
    assert by["c1/pointwise"].input[0] == by["c1/depthwise"].output[0]
    for old in ("pre", "post", "c2"):
        orig = [n for n in m.graph.node if n.name == old][0]
        assert by[old].SerializeToString() == orig.SerializeToString()
    assert new.graph.input == m.graph.input and new.graph.output == m.graph.output
    assert list(new.opset_import) == list(m.opset_import) and new.ir_version == 7
    assert new.producer_name == "unit" and new.doc_string == "doc"
    assert [(p.key, p.value) for p in new.metadata_props] == [("k", "v")]
    inits = [t.name for t in new.graph.initializer]
    assert "W" not in inits and "B" not in inits  # old weights dropped
    assert "W2" in inits and "unused_init" in inits  # untouched ones kept
    assert {"c1/depthwise.weight", "c1/pointwise.weight", "c1/pointwise.bias"} <= set(inits)
    w2_old = [t for t in m.graph.initializer if t.name == "W2"][0]
    w2_new = [t for t in new.graph.initializer if t.name == "W2"][0]
    assert w2_new.SerializeToString() == w2_old.SerializeToString()


def test_name_collision_gets_suffix():
    extra = numpy_helper.from_array(np.zeros(1, np.float32), "conv/depthwise.weight")
    w = _w()
    model = conv_model(w, None, pads=[1, 1, 1, 1], extra_inits=[extra])
    err, new = _roundtrip(model)
    assert err <= TOL
    dw = [n for n in new.graph.node if n.name == "conv/depthwise"][0]
    assert dw.input[1] == "conv/depthwise.weight_1"
    inits = {t.name: t for t in new.graph.initializer}
    assert list(inits["conv/depthwise.weight"].dims) == [1]  # pre-existing tensor untouched
    names = [t.name for t in new.graph.initializer] + [n.name for n in new.graph.node]
    assert len(names) == len(set(names))


def test_shared_weight_initializer_kept():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W"], ["y"], name="b", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    layer = find_candidates(m, include=("a",)).layers[0]
    new = apply_replacements(m, [Replacement(layer, svd_factors(layer.weight, None, 4))])
    onnx.checker.check_model(new, full_check=True)
    assert "W" in [t.name for t in new.graph.initializer]
    assert [n.name for n in new.graph.node] == ["a/depthwise", "a/pointwise", "b"]
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert rel_l2(run_model(m, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL


def test_constant_producer_dropped_unnamed_conv():
    w = _w(n=9, c=2)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "v")),
             helper.make_node("Conv", ["x", "Wc"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 9, 5, 5])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    new, _ = _rewrite_all(m)
    assert [n.op_type for n in new.graph.node] == ["Conv", "Conv"]
    assert new.graph.node[0].name == "y/depthwise"  # unnamed: derived from the output tensor
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert rel_l2(run_model(m, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL
