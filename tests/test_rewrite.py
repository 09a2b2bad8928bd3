"""Tests of onnx_dwdecomp.rewrite: numerical round-trip in onnxruntime and graph invariants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_model, correlated_images, rel_l2, run_model, separable_weight, square_net
from onnx_dwdecomp.candidates import conv_kinds, find_candidates
from onnx_dwdecomp.fold import fold_pointwise
from onnx_dwdecomp.pipeline import decompose
from onnx_dwdecomp.rewrite import NameAllocator, Replacement, apply_replacements, replacement_convs, to_onnx_nodes
from onnx_dwdecomp.solve import SeparableFactors, svd_factors

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


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


@pytest.mark.parametrize("r", [2, 3])
def test_roundtrip_multiplier_on_rank_r_weights(r):
    w = separable_weight(6, 4, 3, 3, rank=r, seed=3)
    model = conv_model(w, None, pads=[1, 1, 1, 1])
    err, new = _roundtrip(model, solver=lambda layer: svd_factors(layer.weight, layer.bias, r))
    assert err <= TOL
    # split form: r depthwise convs (group 4, one output channel per group), a Concat, 1×1
    by = {n.name: n for n in new.graph.node}
    inits = {t.name: t for t in new.graph.initializer}
    for j in range(r):
        dw = by[f"conv/depthwise_{j}"]
        assert _group(dw) == 4 and list(inits[f"conv/depthwise_{j}.weight"].dims) == [4, 1, 3, 3]
    assert list(inits["conv/pointwise.weight"].dims) == [6, 4 * r, 1, 1]


# ---------------------------------------------------- split depthwise form at multiplier r > 1


def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Plain float64 NCHW convolution (group 1, symmetric padding)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, kh, kw = w.shape
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], n, ho, wo))
    for u in range(kh):
        for v in range(kw):
            patch = x[:, :, u:u + stride * ho:stride, v:v + stride * wo:stride]
            y += np.einsum("oc,bchw->bohw", w[:, :, u, v].astype(np.float64), patch)
    return y + b.astype(np.float64).reshape(1, -1, 1, 1)


def _random_factors(n: int, c: int, r: int, seed: int = 0) -> SeparableFactors:
    """Generic (full-rank, not SVD-structured) separable factors in the grouped layout: depthwise
    channel i·r + j is input channel i's j-th filter, pointwise column i·r + j reads it."""
    rng = np.random.default_rng(seed)
    return SeparableFactors(depthwise=rng.standard_normal((c * r, 1, 3, 3)).astype(np.float32),
                            pointwise=rng.standard_normal((n, c * r)).astype(np.float32),
                            bias=rng.standard_normal(n).astype(np.float32), multiplier=r)


def _grouped_model(f: SeparableFactors, c: int, hw, stride: int) -> onnx.ModelProto:
    """The factors as ONE grouped conv (group c, c·r outputs) + 1×1: the previous layout."""
    n = f.pointwise.shape[0]
    inits = [numpy_helper.from_array(f.depthwise, "D"),
             numpy_helper.from_array(f.pointwise.reshape(n, -1, 1, 1), "P"),
             numpy_helper.from_array(f.bias, "B")]
    nodes = [helper.make_node("Conv", ["x", "D"], ["t"], group=c, strides=[stride, stride], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["t", "P", "B"], ["y"])]
    g = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n, "H", "W"])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# Generic factors in float32: onnxruntime's depthwise kernel vs its grouped GEMM, and a pointwise
# GEMM over permuted columns, add the same products in other orders. Each output sums c·r·9 + 1
# float32 products (~1e-7 relative rounding each, partly cancelling) -> observed ~1e-7 relative L2
# against the float64 reference; 1e-5 leaves two orders of magnitude of margin while any layout
# error (a wrong permutation of filters or columns) gives an error of order 1.
@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_split_form_equals_dense_and_grouped_forms(r, stride):
    n, c, hw = 7, 5, (9, 8)
    f = _random_factors(n, c, r, seed=r)
    w = np.zeros((n, c, 3, 3), np.float32)
    model = conv_model(w, np.zeros(n, np.float32), hw=hw, strides=[stride, stride], pads=[1, 1, 1, 1])
    layer = find_candidates(model).layers[0]
    new = apply_replacements(model, [Replacement(layer, f)])
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(10 + r).standard_normal((1, c, *hw)).astype(np.float32)
    got = run_model(new, {"x": x})[0]
    assert rel_l2(_conv_ref(x, f.dense_weight(), f.bias, stride, 1), got) <= TOL
    assert rel_l2(run_model(_grouped_model(f, c, hw, stride), {"x": x})[0], got) <= TOL
    # the in-memory form calibration/segments.py builds segments from computes the same
    nodes, inits = to_onnx_nodes(replacement_convs(Replacement(layer, f), NameAllocator.for_model(model)))
    g = helper.make_graph(nodes, "segment", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n, "H", "W"])],
                          initializer=inits)
    seg = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    seg.ir_version = 8
    onnx.checker.check_model(seg, full_check=True)
    def described(nodes):
        return [(nd.op_type, nd.name, list(nd.input), list(nd.output),
                 {a.name: helper.get_attribute_value(a) for a in nd.attribute}) for nd in nodes]
    assert described(seg.graph.node) == described(new.graph.node)
    assert np.array_equal(run_model(seg, {"x": x})[0], got)


def test_split_form_structure_at_multiplier_2():
    c, n = 4, 6
    model = conv_model(_w(n=n, c=c), np.ones(n, np.float32), strides=[2, 2], dilations=[1, 1], pads=[1, 0, 1, 0])
    layer = find_candidates(model).layers[0]
    f = svd_factors(layer.weight, layer.bias, 2)
    new = apply_replacements(model, [Replacement(layer, f)])
    assert [(nd.op_type, nd.name) for nd in new.graph.node] == [
        ("Conv", "conv/depthwise_0"), ("Conv", "conv/depthwise_1"), ("Concat", "conv/depthwise_concat"),
        ("Conv", "conv/pointwise")]
    assert conv_kinds(new) == {"depthwise": 2, "pointwise": 1}
    dw0, dw1, cat, pw = new.graph.node
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    orig = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    for j, dw in enumerate((dw0, dw1)):
        attrs = {a.name: helper.get_attribute_value(a) for a in dw.attribute}
        assert attrs["group"] == c and list(dw.input[:1]) == ["x"] and len(dw.input) == 2  # no bias
        weight = inits[dw.input[1]]
        assert weight.shape == (c, 1, 3, 3)  # one output channel per group
        assert np.array_equal(weight, f.depthwise[j::2])  # input channel i's j-th filter
        assert {k: attrs[k] for k in ("strides", "pads", "dilations", "kernel_shape")} == {
            "strides": orig["strides"], "pads": orig["pads"], "dilations": orig["dilations"],
            "kernel_shape": [3, 3]}
    assert list(cat.input) == [dw0.output[0], dw1.output[0]]
    assert helper.get_attribute_value(cat.attribute[0]) == 1 and cat.attribute[0].name == "axis"
    assert list(pw.input[:1]) == list(cat.output) and list(pw.output) == ["y"]
    p = inits[pw.input[1]].reshape(n, 2 * c)
    for i in range(c):  # concat channel j·C + i ← grouped channel i·r + j
        for j in range(2):
            assert np.array_equal(p[:, j * c + i], f.pointwise[:, i * 2 + j])
    assert np.array_equal(inits[pw.input[2]], f.bias)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "VALID"])
def test_split_form_keeps_auto_pad(auto_pad):
    model = conv_model(_w(n=5, c=3), None, strides=[2, 2], auto_pad=auto_pad)
    layer = find_candidates(model).layers[0]
    new = apply_replacements(model, [Replacement(layer, svd_factors(layer.weight, None, 9))])  # exact at r = 9
    dws = [nd for nd in new.graph.node if nd.op_type == "Conv" and nd.name != "conv/pointwise"]
    assert len(dws) == 9
    for dw in dws:
        attrs = {a.name: helper.get_attribute_value(a) for a in dw.attribute}
        assert attrs["auto_pad"] == auto_pad.encode() and "pads" not in attrs and attrs["strides"] == [2, 2]
    x = np.random.default_rng(0).standard_normal((1, 3, 9, 8)).astype(np.float32)
    assert rel_l2(run_model(model, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL


@pytest.mark.parametrize("between", ["none", "mul"])
def test_split_form_pointwise_merges_into_following_1x1(between):
    """3×3 → (Mul) → 1×1 at r = 2: fold_pointwise merges the new pointwise conv into the 1×1,
    which then reads the Concat; the function is unchanged."""
    rng = np.random.default_rng(4)
    c, m, n = 4, 6, 5
    w = separable_weight(m, c, 3, 3, rank=2, seed=4)
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((n, m, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B2"),
             numpy_helper.from_array(rng.standard_normal((1, m, 1, 1)).astype(np.float32), "S")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv", pads=[1, 1, 1, 1])]
    if between == "mul":
        nodes.append(helper.make_node("Mul", ["h", "S"], ["hs"], name="scale"))
    nodes.append(helper.make_node("Conv", ["hs" if between == "mul" else "h", "W2", "B2"], ["y"], name="pw2"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 7, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, 7, 7])],
                          initializer=inits if between == "mul" else inits[:4])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    layer = find_candidates(model, include=("conv",)).layers[0]
    new = apply_replacements(model, [Replacement(layer, svd_factors(layer.weight, layer.bias, 2))])
    merged = fold_pointwise(new, ["conv/pointwise"])
    assert [(mg.first, mg.into) for mg in merged.folds] == [("conv/pointwise", "pw2")] and not merged.refused
    out = merged.model
    onnx.checker.check_model(out, full_check=True)
    assert [nd.op_type for nd in out.graph.node] == ["Conv", "Conv", "Concat", "Conv"]
    assert conv_kinds(out) == {"depthwise": 2, "pointwise": 1}
    by = {nd.name: nd for nd in out.graph.node}
    assert by["pw2"].input[0] == by["conv/depthwise_concat"].output[0] and list(by["pw2"].output) == ["y"]
    shapes = {t.name: tuple(t.dims) for t in out.graph.initializer}
    assert shapes[by["pw2"].input[1]] == (n, 2 * c, 1, 1)
    x = rng.standard_normal((1, c, 7, 7)).astype(np.float32)
    assert rel_l2(run_model(model, {"x": x})[0], run_model(out, {"x": x})[0]) <= TOL


def test_calibrated_pipeline_at_multiplier_2():
    """calibration/driver.py runs the decomposed copy through each previous layer's replacement
    (``to_onnx_nodes(replacement_convs(...))``), at r = 2 a segment with a Concat. On a net whose
    weights are exactly rank 2 per channel slice the decomposed stream equals the original one
    only if that segment computes the right function; then each asymmetric gsvd solve is exact
    and so is the whole net (float32 rounding through 3 layers: ~1e-6; a wrong channel order in
    the segment would corrupt the next layer's inputs and give an error of order 1)."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for k, (cin, cout) in enumerate([(6, 12), (12, 12), (12, 6)]):
        w = separable_weight(cout, cin, 3, 3, rank=2, seed=k) / np.float32(np.sqrt(9 * cin))
        inits += [numpy_helper.from_array(w, f"w{k}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        cur = "y" if k == 2 else f"r{k}"
        nodes.append(helper.make_node("Relu", [f"c{k}"], [cur], name=f"relu{k}"))
    net = square_net(nodes, inits, 6, 12, "rank2_net")
    x = correlated_images(24, 6, 12, 12, seed=1)
    new, report = decompose(net, calib=x, batch_size=8, method="gsvd", multiplier=2, select="all")
    assert [layer.multiplier for layer in report.layers] == [2, 2, 2]
    assert report.calibration is not None
    assert sum(nd.op_type == "Concat" for nd in new.graph.node) == 3
    assert conv_kinds(new) == {"depthwise": 6, "pointwise": 3}
    err = report.verification.outputs["y"].rel_l2
    assert err <= 1e-4, err


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


@pytest.mark.parametrize("r, taken", [(1, "conv/depthwise"), (9, "conv/depthwise_0")])
def test_name_collision_gets_suffix(r, taken):
    extra = numpy_helper.from_array(np.zeros(1, np.float32), f"{taken}.weight")
    w = _w()
    model = conv_model(w, None, pads=[1, 1, 1, 1], extra_inits=[extra])
    err, new = _roundtrip(model, solver=lambda layer: svd_factors(layer.weight, layer.bias, r))
    if r == 9:
        assert err <= TOL
    dw = [n for n in new.graph.node if n.name == taken][0]
    assert dw.input[1] == f"{taken}.weight_1"
    inits = {t.name: t for t in new.graph.initializer}
    assert list(inits[f"{taken}.weight"].dims) == [1]  # pre-existing tensor untouched
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
    assert [n.name for n in new.graph.node] == [f"a/depthwise_{j}" for j in range(4)] + [
        "a/depthwise_concat", "a/pointwise", "b"]
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
    assert [n.op_type for n in new.graph.node] == ["Conv"] * 9 + ["Concat", "Conv"]  # r = 9: split form
    assert new.graph.node[0].name == "y/depthwise_0"  # unnamed: derived from the output tensor
    assert new.graph.node[9].name == "y/depthwise_concat" and new.graph.node[10].name == "y/pointwise"
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert rel_l2(run_model(m, {"x": x})[0], run_model(new, {"x": x})[0]) <= TOL
