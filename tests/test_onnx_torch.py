"""Tests for tools/onnx_torch.py: the ONNX -> torch interpreter against onnxruntime, its
parameters and gradients, and the write-back of trained weights into the ONNX graph.

Tolerance: both runtimes compute in float32 but sum in different orders, which leaves
differences around 1e-6 on these outputs (|y| up to ~10); an op interpreted wrongly is off by
O(0.1–1). ``assert_close`` allows 1e-4 absolute + 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TOOLS, load_tool, run_model, three_layer_net
from onnx import TensorProto, helper, numpy_helper

import onnx_dwdecomp

ot = load_tool("onnx_torch")
MNIST = TOOLS.parent / "models" / "mnist"


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def ops_model(seed: int = 0) -> onnx.ModelProto:
    """x (N, 4, 8, 8) -> y (N, 3) through the supported ops that neither the MNIST exports nor
    decomposed models contain: grouped strided Conv with asymmetric pads, Split, Slice with a
    negative end, Sub, Constant, Mul, Unsqueeze / Squeeze, GlobalAveragePool, Flatten,
    ReduceMean without keepdims, Concat, MatMul, Reshape with a 0 (copied) dimension, Identity,
    Gemm (transB, alpha, beta)."""
    rng = np.random.default_rng(seed)

    def floats(*shape):
        return rng.normal(size=shape).astype(np.float32)

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Wg"], ["c"], kernel_shape=[3, 3], group=2, strides=[2, 2], pads=[0, 0, 1, 1]),
        node("Split", ["c", "split"], ["a", "b"], axis=1),
        node("Slice", ["b", "starts", "ends", "axes"], ["bs"]),
        node("Sub", ["a", "bs"], ["d"]),
        node("Constant", [], ["half"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
        node("Mul", ["d", "half"], ["dm"]),
        node("Unsqueeze", ["dm", "axis2"], ["u"]),
        node("Squeeze", ["u", "axis2"], ["sq"]),
        node("GlobalAveragePool", ["sq"], ["g"]),
        node("Flatten", ["g"], ["f"]),
        node("ReduceMean", ["c"], ["r"], axes=[2, 3], keepdims=0),
        node("Concat", ["f", "r"], ["fr"], axis=1),
        node("MatMul", ["fr", "M"], ["mm"]),
        node("Reshape", ["mm", "keep0"], ["re"]),
        node("Identity", ["re"], ["i"]),
        node("Gemm", ["i", "G", "C"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = [numpy_helper.from_array(floats(6, 2, 3, 3), "Wg"), ints("split", [2, 4]), ints("starts", [1]),
             ints("ends", [-1]), ints("axes", [1]), ints("axis2", [2]), ints("keep0", [0, -1]),
             numpy_helper.from_array(floats(8, 5), "M"), numpy_helper.from_array(floats(3, 5), "G"),
             numpy_helper.from_array(floats(3), "C")]
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def images(model: onnx.ModelProto, n: int = 3, seed: int = 1) -> np.ndarray:
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    return np.random.default_rng(seed).normal(size=(n, *(d.dim_value for d in dims))).astype(np.float32)


def run_both(torch, model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(interpreter output, onnxruntime output) of ``model`` on ``x``."""
    module = ot.onnx_to_torch(model).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    return got, run_model(model, {model.graph.input[0].name: x})[0]


# ----------------------------------------------------------------- against onnxruntime

@pytest.mark.parametrize("name", ["shufflenetv2_x0.5_regular.onnx", "shufflenetv2_x0.5.onnx"])
def test_matches_onnxruntime_on_the_mnist_exports(torch, name):
    """The torch.onnx exports: Shape/Gather/Unsqueeze/Concat/Reshape/Cast/Div channel shuffles,
    depthwise convs (the standard net), MaxPool, ReduceMean, Gemm."""
    model = onnx.load(str(MNIST / name))
    with np.load(MNIST / "calib.npz") as data:
        x = np.ascontiguousarray(data["input"][:4], dtype=np.float32)
    got, ref = run_both(torch, model, x)
    assert got.shape == ref.shape == (4, 10)
    assert_close(got, ref)


def test_matches_onnxruntime_on_a_decomposed_model(torch):
    """What decompose writes: depthwise convs (channel multiplier 2), their Concat, pointwise convs."""
    model, _ = onnx_dwdecomp.decompose(three_layer_net(), method="svd", multiplier=2, select="all", verify=False)
    assert {n.op_type for n in model.graph.node} == {"Conv", "Concat", "Relu"}
    got, ref = run_both(torch, model, images(model))
    assert_close(got, ref)


def test_matches_onnxruntime_on_the_other_supported_ops(torch):
    model = ops_model()
    got, ref = run_both(torch, model, images(model))
    assert got.shape == (3, 3)
    assert_close(got, ref)


def test_unsupported_ops_are_refused(torch):
    model = ops_model()
    model.graph.node[3].op_type = "Max"  # Sub -> Max: same inputs, no interpreter for it
    with pytest.raises(ValueError, match=r"unsupported op\(s\) \['Max'\]"):
        ot.onnx_to_torch(model)


# ----------------------------------------------------------------- parameters and write-back

def test_trainable_initializers_are_conv_gemm_matmul_floats():
    assert ot.trainable_initializers(ops_model()) == ["Wg", "M", "G", "C"]  # not the int64 inputs


def test_parameters_get_gradients(torch):
    model = ops_model()
    module = ot.onnx_to_torch(model)
    assert module.param_names == ot.trainable_initializers(model)
    module(torch.from_numpy(images(model))).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.weights)


def test_trained_weights_written_back_give_the_modules_output(torch):
    """Change the parameters in torch, write them into the ONNX: onnxruntime computes what the
    module computes, and no longer what the original model computed."""
    model = ops_model()
    x = images(model)
    module = ot.onnx_to_torch(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.weights:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        got = module(torch.from_numpy(x)).numpy()
    updated = ot.replace_initializers(model, module.state_arrays())
    assert_close(run_model(updated, {"x": x})[0], got)
    assert np.abs(run_model(model, {"x": x})[0] - got).max() > 1e-2


def test_replace_initializers_changes_values_not_graph():
    model = ops_model()
    before = onnx.ModelProto()
    before.CopyFrom(model)
    zeros = {"G": np.zeros((3, 5), dtype=np.float64), "C": np.zeros(3)}  # dtype: converted to the model's
    out = ot.replace_initializers(model, zeros)
    assert model == before  # input untouched
    assert out.graph.node == model.graph.node
    new_g = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "G"))
    assert new_g.dtype == np.float32 and not new_g.any()
    x = images(model)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], np.zeros((3, 3), dtype=np.float32))
    assert np.abs(run_model(model, {"x": x})[0]).max() > 0


def test_replace_initializers_errors():
    model = ops_model()
    with pytest.raises(KeyError):
        ot.replace_initializers(model, {"nope": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        ot.replace_initializers(model, {"C": np.zeros(4)})
