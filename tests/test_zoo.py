"""Tests of onnx_dwdecomp.zoo: structure, channel table, validity, determinism of ShuffleNet V2."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.zoo import FORMS, STAGE_OUT_CHANNELS, shufflenet_v2

TINY = dict(num_classes=10, image_size=64)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _convs(model: onnx.ModelProto):
    """(node, weight shape, attrs) for every Conv, in graph order."""
    w = _weights(model)
    return [(n, w[n.input[1]].shape, _attrs(n)) for n in model.graph.node if n.op_type == "Conv"]


def _kind(shape: tuple[int, ...], attrs: dict) -> str:
    n, c_per_group, kh, kw = shape
    if attrs["group"] > 1 and c_per_group == 1 and attrs["group"] == n:
        return "depthwise"
    if (kh, kw) == (1, 1):
        return "pointwise"
    return "regular"


def _kinds(model: onnx.ModelProto) -> Counter:
    return Counter(_kind(shape, attrs) for _, shape, attrs in _convs(model))


def _run(model: onnx.ModelProto, batch: int, size: int = 64, seed: int = 0) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module", params=FORMS)
def tiny(request) -> tuple[str, onnx.ModelProto]:
    return request.param, shufflenet_v2(0.5, request.param, **TINY)


EXPECTED_KINDS = {
    "standard": Counter(regular=1, depthwise=19, pointwise=36),
    "merged": Counter(regular=20, pointwise=17),
    "depthwise_only": Counter(regular=20, pointwise=36),
}


def test_conv_kinds_per_form(tiny):
    form, model = tiny
    assert _kinds(model) == EXPECTED_KINDS[form]
    # every regular k x k conv is 3x3
    assert all(s[2:] == (3, 3) for _, s, a in _convs(model) if _kind(s, a) == "regular")


def test_conv_attributes_and_names(tiny):
    _, model = tiny
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    for node, shape, attrs in _convs(model):
        assert {"kernel_shape", "strides", "pads", "dilations", "group"} <= attrs.keys()
        k = shape[2]
        assert attrs["kernel_shape"] == [k, k] and attrs["pads"] == [k // 2] * 4
        assert attrs["dilations"] == [1, 1]
        assert node.input[1] == f"{node.name}.weight" and node.input[2] == f"{node.name}.bias"
    assert "stage2.0.branch2.relu1" in names and "stage2.0.branch2.conv2" in names
    assert "stage3.1.split" in names and "stage4.0.shuffle.transpose" in names


def test_strides(tiny):
    _, model = tiny
    strides = {n.name: a["strides"][0] for n, _, a in _convs(model)}
    assert strides["conv1.conv"] == 2
    spatial = "conv2"  # branch2's 3x3 is conv2 in every form
    for stage, repeats in zip((2, 3, 4), (4, 8, 4)):
        assert strides[f"stage{stage}.0.branch1.conv1"] == 2
        assert strides[f"stage{stage}.0.branch2.{spatial}"] == 2
        for i in range(1, repeats):
            assert strides[f"stage{stage}.{i}.branch2.{spatial}"] == 1
    assert sum(s == 2 for s in strides.values()) == 1 + 3 * 2
    maxpool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert _attrs(maxpool)["strides"] == [2, 2]


@pytest.mark.parametrize("width", sorted(STAGE_OUT_CHANNELS))
def test_channel_table(width):
    expected = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}[width]
    model = shufflenet_v2(width, "standard", **TINY)
    shapes = {n.name: s for n, s, _ in _convs(model)}
    assert shapes["conv1.conv"] == (expected[0], 3, 3, 3)
    c_in = expected[0]
    for stage, out in zip((2, 3, 4), expected[1:4]):
        b = out // 2
        assert shapes[f"stage{stage}.0.branch1.conv1"] == (c_in, 1, 3, 3)  # depthwise
        assert shapes[f"stage{stage}.0.branch1.conv2"] == (b, c_in, 1, 1)
        assert shapes[f"stage{stage}.0.branch2.conv1"] == (b, c_in, 1, 1)
        assert shapes[f"stage{stage}.1.branch2.conv1"] == (b, b, 1, 1)
        assert shapes[f"stage{stage}.1.branch2.conv2"] == (b, 1, 3, 3)
        assert shapes[f"stage{stage}.1.branch2.conv3"] == (b, b, 1, 1)
        c_in = out
    assert shapes["conv5.conv"] == (expected[4], expected[3], 1, 1)
    assert _weights(model)["fc.weight"].shape == (10, expected[4])


def test_merged_and_dwonly_channels():
    merged = {n.name: s for n, s, _ in _convs(shufflenet_v2(0.5, "merged", **TINY))}
    dwonly = {n.name: s for n, s, _ in _convs(shufflenet_v2(0.5, "depthwise_only", **TINY))}
    assert merged["stage3.0.branch1.conv1"] == (48, 48, 3, 3)  # the pair: 48 -> 48
    assert merged["stage3.1.branch2.conv2"] == (48, 48, 3, 3)
    assert merged["stage2.0.branch1.conv1"] == (24, 24, 3, 3)
    assert dwonly["stage3.0.branch1.conv1"] == (48, 48, 3, 3)
    assert dwonly["stage3.0.branch1.conv2"] == (48, 48, 1, 1)
    assert dwonly["stage3.1.branch2.conv2"] == (48, 48, 3, 3)
    assert dwonly["stage3.1.branch2.conv3"] == (48, 48, 1, 1)


def test_split_shuffle_pattern(tiny):
    _, model = tiny
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Split"] == 13 and ops["Concat"] == 16
    assert ops["Transpose"] == 16 and ops["Reshape"] == 32
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose")
    assert _attrs(transpose)["perm"] == [0, 2, 1, 3, 4]


def test_checker_and_io(tiny):
    _, model = tiny
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "output"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert out.type.tensor_type.shape.dim[0].dim_param == "N"


def test_runs_with_dynamic_batch(tiny):
    _, model = tiny
    y1 = _run(model, 1)
    y3 = _run(model, 3)
    assert y1.shape == (1, 10) and y3.shape == (3, 10)
    assert np.all(np.isfinite(y3))
    np.testing.assert_allclose(y3[0], y1[0], rtol=1e-4, atol=1e-5)  # same seed -> same x[0]
    assert 0.1 < y3.std() < 100


def test_static_batch():
    model = shufflenet_v2(0.5, "standard", dynamic_batch=False, **TINY)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert _run(model, 1).shape == (1, 10)


def test_full_size_activations_are_sane():
    y = _run(shufflenet_v2(0.5, "standard"), 1, size=224)
    assert y.shape == (1, 1000) and np.all(np.isfinite(y)) and 0.1 < y.std() < 100


def test_deterministic():
    a = shufflenet_v2(0.5, "merged", seed=3, **TINY).SerializeToString()
    b = shufflenet_v2(0.5, "merged", seed=3, **TINY).SerializeToString()
    c = shufflenet_v2(0.5, "merged", seed=4, **TINY).SerializeToString()
    assert a == b
    assert a != c


@pytest.mark.parametrize("form", FORMS)
def test_unfolded_bn_same_structure_and_function(form):
    folded = shufflenet_v2(0.5, form, **TINY)
    real = shufflenet_v2(0.5, form, fold_bn=False, **TINY)
    onnx.checker.check_model(real, full_check=True)
    conv_sig = [(n.name, s, a) for n, s, a in _convs(folded)]
    assert conv_sig == [(n.name, s, a) for n, s, a in _convs(real)]
    assert all(len(n.input) == 2 for n, _, _ in _convs(real))
    bns = [n for n in real.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == len(conv_sig)
    scale = _weights(real)[bns[0].input[1]]
    assert not np.allclose(scale, 1.0)
    # BN follows its conv directly
    producers = {o: n for n in real.graph.node for o in n.output}
    assert all(producers[bn.input[0]].op_type == "Conv" for bn in bns)
    others = lambda m: Counter(n.op_type for n in m.graph.node if n.op_type != "BatchNormalization")
    assert others(folded) == others(real)
    np.testing.assert_allclose(_run(real, 2), _run(folded, 2), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("opset", [11, 13, 18, 21])
def test_opsets(opset):
    model = shufflenet_v2(0.5, "standard", opset=opset, **TINY)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert len(split.input) == (2 if opset >= 13 else 1)
    mean = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    assert len(mean.input) == (2 if opset >= 18 else 1)
    reference = _run(shufflenet_v2(0.5, "standard", **TINY), 2)
    np.testing.assert_allclose(_run(model, 2), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(width=0.75), dict(form="dense"), dict(opset=10),
                                    dict(opset=22), dict(image_size=16), dict(num_classes=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(OptionError):
        shufflenet_v2(**kwargs)
