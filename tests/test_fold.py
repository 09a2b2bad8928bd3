"""Tests of onnx_dwdecomp.fold: BN / per-channel affine folding and pointwise-pair merging.

Numerical tolerance: folding is exact in real arithmetic and the new weights are computed in
float64, so folded and unfolded float32 models differ only by float32 rounding in onnxruntime
(observed ≤ 2e-7 relative L2 here). ``TOL = 1e-5`` leaves a 50× margin for other CPUs and
kernels while any real mistake (a wrong epsilon, scale applied to the wrong axis, a missed
shift) shows up at 1e-3 or more.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_l2, run_model
from onnx_dwdecomp import zoo
from onnx_dwdecomp.candidates import conv_kinds
from onnx_dwdecomp.fold import fold_batchnorm, fold_pointwise
from onnx_dwdecomp.pipeline import decompose

TOL = 1e-5
C, N, HW = 4, 6, 7


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _bn_params(rng, prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}.{p}") for p, a in (
        ("scale", rng.uniform(0.5, 2.0, channels)), ("bias", rng.normal(0, 0.5, channels)),
        ("mean", rng.normal(0, 0.5, channels)), ("var", rng.uniform(0.1, 2.0, channels)))]


def _model(nodes, inits, outputs=("y",), c_in=C, hw=HW, extra_inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, hw, hw]), *extra_inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"]) for o in outputs],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _x(c_in=C, hw=HW, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((2, c_in, hw, hw)).astype(np.float32)}


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    for ra, rb in zip(run_model(a, feeds), run_model(b, feeds)):
        assert rel_l2(ra, rb) <= TOL


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


# ------------------------------------------------------------------------------ BN / affine fold

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, C], ids=["regular", "depthwise"])
def test_conv_bn_folds_exactly(bias, group):
    rng = np.random.default_rng(0)
    out_c = N if group == 1 else C
    inits = [numpy_helper.from_array(_f(rng, out_c, C // group, 3, 3), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(_f(rng, out_c), "B"))
        inputs.append("B")
    inits += _bn_params(rng, "bn", out_c)
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", pads=[1, 1, 1, 1], group=group),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                              name="bn", epsilon=1e-3)]
    model = _model(nodes, inits)
    before = model.SerializeToString()
    result = fold_batchnorm(model)
    assert model.SerializeToString() == before  # input never mutated
    assert result.modified and [(f.node, f.op, f.conv) for f in result.folds] == [("bn", "BatchNormalization", "conv")]
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    assert _ops(new) == {"Conv": 1}
    conv = new.graph.node[0]
    assert conv.name == "conv" and list(conv.output) == ["y"]  # the BN's output name is kept
    assert {t.name for t in new.graph.initializer} == {"W", "B"} if bias else {"W", "conv.bias"}
    _same_outputs(model, new, _x())


def test_mul_add_chain_with_broadcast_shapes_folds():
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_f(rng, N, C, 3, 3), "W"), numpy_helper.from_array(_f(rng, N), "B"),
             numpy_helper.from_array(_f(rng, 1, N, 1, 1), "m4"), numpy_helper.from_array(_f(rng, N, 1, 1), "a3"),
             numpy_helper.from_array(np.float32(0.5), "s0"), numpy_helper.from_array(_f(rng, 1), "a1")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "m4"], ["t1"], name="mul4"),
             helper.make_node("Add", ["a3", "t1"], ["t2"], name="add3"),  # constant first: still folds
             helper.make_node("Mul", ["t2", "s0"], ["t3"], name="scalar"),
             helper.make_node("Add", ["t3", "a1"], ["y"], name="add1"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    model = _model(nodes, inits, outputs=("y", "z"))
    result = fold_batchnorm(model)
    assert [f.node for f in result.folds] == ["mul4", "add3", "scalar", "add1"]
    assert _ops(result.model) == {"Conv": 1, "Relu": 1}
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    assert {t.name for t in result.model.graph.initializer} == {"W", "B"}  # constants dropped, none added
    _same_outputs(model, result.model, _x())


def _conv_then(node_after, extra_inits=(), outputs=("y",), extra_nodes=()):
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_f(rng, N, C, 3, 3), "W"), *_bn_params(rng, "bn", N), *extra_inits]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), node_after, *extra_nodes]
    return _model(nodes, inits, outputs=outputs)


_BN = ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"]


@pytest.mark.parametrize("case, reason", [
    ("two_consumers", "2 consumers"),
    ("graph_output", "graph output"),
    ("per_width_mul", "not per-channel"),
    ("runtime_operand", "computed at run time"),
    ("training_mode", "training_mode"),
])
def test_refusals_leave_the_graph_alone(case, reason):
    rng = np.random.default_rng(3)
    if case == "two_consumers":
        model = _conv_then(helper.make_node("BatchNormalization", _BN, ["y"], name="bn"), outputs=("y", "r"),
                           extra_nodes=[helper.make_node("Relu", ["c"], ["r"], name="relu")])
    elif case == "graph_output":
        model = _conv_then(helper.make_node("BatchNormalization", _BN, ["y"], name="bn"), outputs=("y", "c"))
    elif case == "per_width_mul":  # (W,) broadcasts along the last axis, not along channels
        model = _conv_then(helper.make_node("Mul", ["c", "v"], ["y"], name="mul"),
                           [numpy_helper.from_array(_f(rng, HW - 2), "v")])
    elif case == "runtime_operand":
        model = _conv_then(helper.make_node("Add", ["c", "c"], ["y"], name="add"))
    else:
        model = _conv_then(helper.make_node("BatchNormalization", _BN, ["y"], name="bn", training_mode=1))
    result = fold_batchnorm(model)
    assert not result.modified and result.model is model
    if "bn" in {n.name for n in model.graph.node}:
        assert len(result.refused) == 1 and result.refused[0].name == "bn"
        assert reason in result.refused[0].reason, result.refused[0].reason
    else:  # Mul/Add that are not foldable are simply left alone, not reported
        assert result.refused == ()


def test_constant_node_params_and_shared_weight():
    """Paddle-style Constant-node weights, and one initializer shared by two convs with different
    BNs: each conv gets its own folded weight, the dead producers and the shared tensor go."""
    rng = np.random.default_rng(4)
    w = _f(rng, N, C, 3, 3)
    nodes = [helper.make_node("Constant", [], ["Wc"], name="wconst", value=numpy_helper.from_array(w, "wv")),
             helper.make_node("Identity", ["Wc"], ["Wi"], name="wid"),
             helper.make_node("Conv", ["x", "Wi"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "a.scale", "a.bias", "a.mean", "a.var"], ["y0"], name="bn0"),
             helper.make_node("Conv", ["x", "S"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "b.scale", "b.bias", "b.mean", "b.var"], ["t"], name="bn1"),
             helper.make_node("Conv", ["t", "S2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "y0"], ["y"], name="sum"),
             helper.make_node("Conv", ["x", "S"], ["y2"], name="conv_shared_plain", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(_f(rng, N, C, 3, 3), "S"), numpy_helper.from_array(_f(rng, N, N, 3, 3), "S2"),
             *_bn_params(rng, "a", N), *_bn_params(rng, "b", N)]
    model = _model(nodes, inits, outputs=("y", "y2"))
    result = fold_batchnorm(model)
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    assert {f.node for f in result.folds} == {"bn0", "bn1"}
    assert _ops(new) == {"Conv": 4, "Add": 1}  # Constant + Identity gone with bn0
    names = [t.name for t in new.graph.initializer]
    assert len(names) == len(set(names))
    by = {n.name: n for n in new.graph.node}
    assert by["conv1"].input[1] != "S" and by["conv_shared_plain"].input[1] == "S"  # S still used
    _same_outputs(model, new, _x())


@pytest.mark.parametrize("form", ["standard", "depthwise_only", "merged"])
def test_zoo_unfolded_bn_equals_exporter_folded(form):
    """Folding the zoo's BN nodes gives the graph the legacy exporter writes (fold_bn=True)."""
    unfolded = zoo.shufflenet_v2(0.5, form, fold_bn=False, image_size=32, num_classes=10)
    folded = zoo.shufflenet_v2(0.5, form, fold_bn=True, image_size=32, num_classes=10)
    result = fold_batchnorm(unfolded)
    assert len(result.folds) == _ops(unfolded)["BatchNormalization"] and not result.refused
    assert _ops(result.model) == _ops(folded)
    assert result.model.ByteSize() <= folded.ByteSize()  # no duplicated weights
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    _same_outputs(folded, result.model, feeds)
    _same_outputs(unfolded, result.model, feeds)


def test_nothing_to_fold_returns_the_input_model():
    folded = zoo.shufflenet_v2(0.5, "standard", fold_bn=True, image_size=32, num_classes=10)
    for result in (fold_batchnorm(folded), fold_pointwise(folded, [])):
        assert result.model is folded and not result.modified and result.refused == ()


# ---------------------------------------------------------------------------- pointwise merging

def _pointwise_pair(between: str, *, second_attrs=None, extra_consumer=False):
    """x → dw3x3 → P1 (1×1, bias) → [between] → P2 (1×1) → Relu → z."""
    rng = np.random.default_rng(5)
    m, n = 5, 3
    inits = [numpy_helper.from_array(_f(rng, C, 1, 3, 3), "D"), numpy_helper.from_array(_f(rng, m, C, 1, 1), "P1.w"),
             numpy_helper.from_array(_f(rng, m), "P1.b"), numpy_helper.from_array(_f(rng, n, m, 1, 1), "P2.w"),
             numpy_helper.from_array(_f(rng, n), "P2.b")]
    nodes = [helper.make_node("Conv", ["x", "D"], ["d"], name="dw", group=C, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "P1.w", "P1.b"], ["p"], name="p1")]
    cur = "p"
    if between == "bn":
        inits += _bn_params(rng, "bn", m)
        nodes.append(helper.make_node("BatchNormalization", ["p", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
                                      ["q"], name="bn"))
        cur = "q"
    elif between == "mul_add":
        inits += [numpy_helper.from_array(_f(rng, m, 1, 1), "s"), numpy_helper.from_array(_f(rng, 1, m, 1, 1), "t")]
        nodes += [helper.make_node("Mul", ["p", "s"], ["q1"], name="mul"),
                  helper.make_node("Add", ["q1", "t"], ["q"], name="add")]
        cur = "q"
    elif between == "relu":
        nodes.append(helper.make_node("Relu", ["p"], ["q"], name="act"))
        cur = "q"
    nodes += [helper.make_node("Conv", [cur, "P2.w", "P2.b"], ["y"], name="p2", **(second_attrs or {})),
              helper.make_node("Relu", ["y"], ["z"], name="relu")]
    outputs = ("z",)
    if extra_consumer:
        nodes.append(helper.make_node("Neg", [cur], ["side"], name="side"))
        outputs = ("z", "side")
    return _model(nodes, inits, outputs=outputs)


@pytest.mark.parametrize("between", ["none", "bn", "mul_add"])
def test_pointwise_pairs_merge_exactly(between):
    model = _pointwise_pair(between)
    before = model.SerializeToString()
    result = fold_pointwise(model, ["p1"])
    assert model.SerializeToString() == before
    new = result.model
    onnx.checker.check_model(new, full_check=True)
    through = {"none": (), "bn": ("bn",), "mul_add": ("mul", "add")}[between]
    assert [(m.first, m.through, m.into) for m in result.folds] == [("p1", through, "p2")]
    assert _ops(new) == {"Conv": 2, "Relu": 1}
    p2 = next(n for n in new.graph.node if n.name == "p2")
    assert list(p2.input) == ["d", "P2.w", "P2.b"] and list(p2.output) == ["y"]
    shapes = {t.name: tuple(t.dims) for t in new.graph.initializer}
    assert shapes == {"D": (C, 1, 3, 3), "P2.w": (3, C, 1, 1), "P2.b": (3,)}
    _same_outputs(model, new, _x())


@pytest.mark.parametrize("between, attrs, extra, reason", [
    ("relu", None, False, "feeds Relu"),
    ("none", {"strides": [2, 2]}, False, "strides"),
    ("none", {"pads": [1, 1, 1, 1]}, False, "pads"),
    ("bn", None, True, "2 consumers"),
])
def test_pointwise_refusals(between, attrs, extra, reason):
    model = _pointwise_pair(between, second_attrs=attrs, extra_consumer=extra)
    result = fold_pointwise(model, ["p1", "nonexistent"])
    assert not result.modified and result.model is model
    assert [r.name for r in result.refused] == ["p1", "nonexistent"]
    assert reason in result.refused[0].reason, result.refused[0].reason


def test_first_conv_must_be_pointwise():
    result = fold_pointwise(_pointwise_pair("none"), ["dw"])
    assert not result.modified and "not a plain 1×1 conv" in result.refused[0].reason


# ------------------------------------------- decomposition lands on the native ShuffleNet V2 graph

def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


NATIVE = {"regular": 1, "depthwise": 19, "pointwise": 36}


@pytest.fixture(scope="module", params=[(1.0, "depthwise_only"), (0.5, "merged")], ids=lambda p: f"x{p[0]}-{p[1]}")
def decomposed(request):
    width, form = request.param
    kw = dict(image_size=32, num_classes=10)
    source = zoo.shufflenet_v2(width, form, fold_bn=False, **kw)
    new, report = decompose(source, select="all", exclude=("conv1.conv",))
    native = zoo.shufflenet_v2(width, "standard", fold_bn=True, **kw)
    return source, new, report, native


def test_decomposed_counterpart_has_native_structure(decomposed):
    source, new, report, native = decomposed
    assert conv_kinds(native) == NATIVE
    assert conv_kinds(new) == NATIVE
    assert _ops(new) == _ops(native)  # no BN, Identity, Reshape or Transpose added or left over
    assert len(report.layers) == 19 and len(report.folded) == _ops(source)["BatchNormalization"]
    expected_merges = 19 if "depthwise_only" in source.graph.name else 0
    assert len(report.merged) == expected_merges
    onnx.checker.check_model(new, full_check=True)
    # the graph around the convs is the native one, name for name (the zoo's merged form
    # numbers its ReLUs differently, so those are compared by count above)
    keep = {"Split", "Concat", "Reshape", "Transpose", "MaxPool", "ReduceMean", "Gemm"}
    if expected_merges:
        keep.add("Relu")
    assert ([n.name for n in new.graph.node if n.op_type in keep]
            == [n.name for n in native.graph.node if n.op_type in keep])


def test_decomposed_counterpart_has_no_weight_overhead(decomposed, tmp_path):
    """Same weights as the native net except the depthwise biases (the decomposition puts the
    bias on the pointwise conv), each stored once; the file is its weights plus the graph."""
    _, new, _, native = decomposed
    names = [t.name for t in new.graph.initializer]
    assert len(names) == len(set(names))
    big = [numpy_helper.to_array(t).tobytes() for t in new.graph.initializer if np.prod(t.dims) > 16]
    assert len(big) == len(set(big))  # no tensor stored twice under two names
    shapes = {t.name: tuple(t.dims) for t in native.graph.initializer}
    dw_bias = sum(4 * shapes[n.input[2]][0] for n in native.graph.node
                  if n.op_type == "Conv" and len(n.input) > 2 and shapes[n.input[1]][1] == 1
                  and shapes[n.input[1]][2:] != (1, 1))
    assert _weight_bytes(new) == _weight_bytes(native) - dw_bias
    path = tmp_path / "m.onnx"
    onnx.save(new, str(path))
    graph_bytes = path.stat().st_size - _weight_bytes(new)
    native_graph_bytes = native.ByteSize() - _weight_bytes(native)
    # names like "<conv>/depthwise.weight" are a little longer than the native ones: ≤ 10 %
    assert 0 < graph_bytes <= 1.10 * native_graph_bytes, (graph_bytes, native_graph_bytes)


# ---- issue 15: no fold produces NaN/Inf; IR < 4 models stay valid


@pytest.mark.parametrize("case, reason", [
    ("zero_variance", "var + epsilon = 0 ≤ 0"),
    ("nan_mean", "NaN/Inf"),
    ("nan_weight", "conv weight holds NaN/Inf"),
    ("overflow", "would overflow float32"),
])
def test_fold_that_would_give_nonfinite_weights_is_refused(case, reason):
    rng = np.random.default_rng(4)
    w = _f(rng, N, C, 3, 3)
    params = {p: a.astype(np.float32) for p, a in (("scale", rng.uniform(0.5, 2.0, N)), ("bias", rng.normal(0, 1, N)),
                                                     ("mean", rng.normal(0, 1, N)), ("var", rng.uniform(0.1, 2, N)))}
    eps = 1e-5
    if case == "zero_variance":
        params["var"][:] = 0
        eps = 0.0
    elif case == "nan_mean":
        params["mean"][2] = np.nan
    elif case == "nan_weight":
        w[0, 0, 0, 0] = np.nan
    else:
        w[:] = 1e30
        params["scale"][:] = 1e30
    inits = [numpy_helper.from_array(w, "W")] + [numpy_helper.from_array(a, f"bn.{p}") for p, a in params.items()]
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
                    helper.make_node("BatchNormalization", _BN, ["y"], name="bn", epsilon=eps)], inits)
    with np.errstate(all="raise"):  # no numpy warning either
        result = fold_batchnorm(model)
    assert not result.modified and result.model is model
    assert len(result.refused) == 1 and reason in result.refused[0].reason, result.refused


def test_pointwise_merge_that_would_overflow_is_refused():
    model = _pointwise_pair("none")
    for t in model.graph.initializer:
        if t.name in ("P1.w", "P2.w"):
            t.CopyFrom(numpy_helper.from_array(np.full(tuple(t.dims), 1e30, np.float32), t.name))
    result = fold_pointwise(model, ["p1"])
    assert not result.modified and "overflow" in result.refused[0].reason


def test_folding_an_ir3_model_lists_the_new_initializers_as_inputs():
    """IR version 3: every initializer must be a graph input; the folded BN's parameters leave
    the inputs and the conv's new bias joins them."""
    model = _conv_then(helper.make_node("BatchNormalization", _BN, ["y"], name="bn"))
    model.ir_version = 3
    model.opset_import[0].version = 8
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    result = fold_batchnorm(model)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    inputs = {vi.name for vi in result.model.graph.input}
    assert {t.name for t in result.model.graph.initializer} | {"x"} == inputs
    _same_outputs(model, result.model, _x())
