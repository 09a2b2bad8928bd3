"""Shared tiny-model builders for the onnx_dwdecomp tests (everything here is small and fast)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.timing import latency

from onnx_dwdecomp.timing import model as model_latency
from onnx_dwdecomp.calibration.moments import MomentSums

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """Import ``tools/<name>.py`` (tools/ is not a package) as module ``tools_<name>``, once."""
    key = f"tools_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up by name while the class is built
        spec.loader.exec_module(module)
    return sys.modules[key]


def separable_weight(n: int, c: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A weight whose every channel slice W[:, i] (n, kh·kw) is exactly rank ``rank``."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((n, c, rank))
    f = rng.standard_normal((c, rank, kh * kw))
    return np.einsum("nis,isk->nik", p, f).reshape(n, c, kh, kw).astype(np.float32)


def conv_model(weight: np.ndarray, bias: np.ndarray | None = None, *, hw=(9, 8), name: str = "conv",
               opset: int = 17, extra_inits: list | None = None, **attrs) -> onnx.ModelProto:
    """x[1, c, H, W] -> Conv(weight, bias, **attrs) -> y (one node, fully typed)."""
    n, c = weight.shape[:2]
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name=name, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n, "H", "W"])],
                              initializer=inits + list(extra_inits or []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run_model(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - ref) / np.linalg.norm(ref))


def correlated_images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Images with strong spatial and cross-channel correlation (smoothed, mixed noise)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c, h + 4, w + 4))
    # spatial box blur -> neighbouring taps correlated
    s = sum(z[:, :, i:i + h, j:j + w] for i in range(5) for j in range(5)) / 5.0
    mix = rng.standard_normal((c, c)) + 2.0 * np.eye(c)
    out = np.einsum("ij,njhw->nihw", mix, s) + 0.5 * rng.standard_normal((c, 1, 1))
    return out.astype(np.float32)


def three_layer_net(c: int = 6, width: int = 12, seed: int = 0, hw: int = 12) -> onnx.ModelProto:
    """x[N, c, hw, hw] -> (Conv 3x3 + bias -> Relu) x 3 -> y; dynamic batch, opset 17."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur, cin = "x", c
    for k in range(3):
        cout = width if k < 2 else c
        inits += [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        out = f"r{k}" if k < 2 else "y"
        nodes.append(helper.make_node("Relu", [f"c{k}"], [out], name=f"relu{k}"))
        cur, cin = out, cout
    return square_net(nodes, inits, c, hw, "net")


def square_net(nodes: list, inits: list, c: int, hw: int, name: str) -> onnx.ModelProto:
    """Graph ``x`` (N, c, hw, hw) → ``y`` (N, c, hw, hw) from ``nodes``/``inits``, opset 17."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, hw, hw])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def stats_from_samples(weight: np.ndarray, x: np.ndarray, x_hat: np.ndarray | None = None):
    """LayerStats from explicit channel-major patch rows via calibration.moments.MomentSums (x_hat
    defaults to x)."""
    c, k = weight.shape[1], int(np.prod(weight.shape[2:]))

    def tap_major(a):  # MomentSums takes rows in extract_patches' tap-major order
        return np.ascontiguousarray(a.reshape(len(a), c, k).transpose(0, 2, 1), dtype=np.float32).reshape(len(a), -1)
    sums = MomentSums(weight)
    sums.add(tap_major(x), tap_major(x if x_hat is None else x_hat))
    return sums.stats()


@pytest.fixture
def tiny_net():
    return three_layer_net()


@pytest.fixture(autouse=True)
def _fast_model_check(monkeypatch):
    """The whole-model check of a plan (model_latency.py) times two models for about a second;
    tests get a fake timing that calls every plan 2× faster. Tests of the check itself
    replace ``ort_model_timer`` again (or restore it from :data:`REAL_MODEL_TIMER`)."""
    monkeypatch.setattr(model_latency, "ort_model_timer",
                        lambda *args, **kwargs: latency.Timing(1.0, 0.5, runs=10))


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path_factory, monkeypatch):
    """Latency selection's persistent timing cache goes to a folder of each test's own, never
    the user's, and no test reads timings another test stored (some inject fake timers)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


def fake_node_times(ratios: dict[int, float]):
    """A stand-in for node_profile.profile_node_times: every conv of the given model takes 1 ms
    inside it, except the nodes rewrite.py emits for a conv at multiplier r (r depthwise convs),
    which take ``ratios[r]`` ms together (all on the pointwise conv, the depthwise ones 0); the
    model 1 ms more than its convs."""
    import re

    from onnx_dwdecomp.timing.node_profile import NodeTimes

    emitted = re.compile(r"(.*)/(depthwise(?:_\d+)?|depthwise_concat|pointwise)(?:_\d+)?")

    def profile(model, feeds, *, threads, providers, **_):
        depthwise: dict[str, int] = {}
        node_ms = {}
        for node in model.graph.node:
            m = emitted.fullmatch(node.name)
            if m is None:
                if node.op_type == "Conv":
                    node_ms[node.name] = 1.0
            elif m.group(2).startswith("depthwise") and m.group(2) != "depthwise_concat":
                depthwise[m.group(1)] = depthwise.get(m.group(1), 0) + 1
                node_ms[node.name] = 0.0
        for node in model.graph.node:
            m = emitted.fullmatch(node.name)
            if m is not None and m.group(2) == "pointwise":
                node_ms[node.name] = ratios[depthwise[m.group(1)]]
        return NodeTimes(node_ms, sum(node_ms.values()) + 1.0, 0.0, 5)
    return profile
