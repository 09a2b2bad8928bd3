"""model_latency.py: the chosen plan timed as a whole model against the all-regular one."""

from __future__ import annotations

import pytest

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp import decompose
from onnx_dwdecomp.timing import latency
from onnx_dwdecomp.timing import model as model_latency
from onnx_dwdecomp.timing.latency import Timing
from onnx_dwdecomp.timing.model import MODEL_MIN_GAIN, check_faster, ort_model_timer
from onnx_dwdecomp.timing.cache import TimingCache
from test_plan import fast_r1, mixed_net  # noqa: F401  (fixture)

REAL_TIMER = ort_model_timer  # conftest replaces the module's timer with a fake in every test


def test_a_plan_that_is_not_faster_as_a_whole_is_not_handed_back(fast_r1, monkeypatch):  # noqa: F811
    """The per-conv timings call conv0's r = 1 form 2× faster, but the whole model runs at the
    same speed: the all-regular model is returned and the report says why."""
    calls = []
    monkeypatch.setattr(model_latency, "ort_model_timer",
                        lambda *a, **k: calls.append(1) or Timing(1.0, 1.0, runs=10))
    model, rep = decompose(mixed_net(), calib=correlated_images(40, 6, 12, 12, seed=4))
    b = rep.budget
    assert calls and rep.layers == () and b["rounds"][-1]["fallback"] is True
    assert b["model_latency"]["faster"] is False and b["model_latency"]["ratio"] == 1.0
    assert any(f"ran ≥ {100 * MODEL_MIN_GAIN:g} % faster than the all-regular model" in n for n in rep.notes)
    assert "not faster, not used" in rep.render()


def test_a_faster_plan_is_kept_and_recorded(fast_r1, monkeypatch):  # noqa: F811
    """The fake profiles price conv0's rewrite at 1.0 → 0.5 ms inside a model of 4.0 ms (3 convs
    of 1 ms + 1 ms); the whole model measures 6.0 → 5.5 ms. The frontier's model latency of the
    chosen plan stays on the profile's scale — 1 − 0.5 / 4.0 — not the check's."""
    monkeypatch.setattr(model_latency, "ort_model_timer", lambda *a, **k: Timing(6.0, 5.5, runs=10))
    _, rep = decompose(mixed_net(), calib=correlated_images(40, 6, 12, 12, seed=4))
    m = rep.budget["model_latency"]
    assert [layer.name for layer in rep.layers] == ["conv0"]
    assert m["faster"] is True and m["ratio"] == pytest.approx(5.5 / 6) and m["regular_ms"] == 6.0
    assert rep.budget["model_ms"] == 4.0
    chosen = [p for p in rep.budget["frontier"] if p["chosen"]]
    assert chosen and all(p["model_latency_ratio"] == pytest.approx(1 - 0.5 / 4.0) for p in chosen)


def test_prices_inside_the_model_predict_the_model_before_it_is_timed(fast_r1, monkeypatch):  # noqa: F811
    """The profiles give the all-regular model's time (3 convs of 1 ms + 1 ms) before any plan is
    timed, and it stays the frontier's reference whatever the whole-model check measures; no
    predicted model latency is below what the convs leave."""
    monkeypatch.setattr(model_latency, "ort_model_timer", lambda *a, **k: Timing(1.0, 1.0, runs=10))
    _, rep = decompose(mixed_net(), calib=correlated_images(40, 6, 12, 12, seed=4))
    assert rep.budget["model_ms"] == 4.0  # the profile's, not the check's 1.0 ms
    ratios = [p["model_latency_ratio"] for p in rep.budget["frontier"]]
    assert all(r is not None and 0 <= r <= 1 for r in ratios)


def test_check_faster_is_cached_and_decides_on_the_noise_band(tmp_path, monkeypatch):
    net = three_layer_net()
    feeds = {"x": correlated_images(1, 6, 12, 12)}
    calls = []

    def timer(*args, **kwargs):
        calls.append(args[-1] if len(args) > 5 else 1)
        return Timing(1.0, 0.9, runs=20)

    monkeypatch.setattr(model_latency, "ort_model_timer", timer)
    cache = TimingCache(tmp_path / "t.json")
    first = check_faster(net, net, feeds, threads=1, providers=("CPUExecutionProvider",), cache=cache)
    assert first.rewrite and len(calls) == 1
    again = check_faster(net, net, feeds, threads=1, providers=("CPUExecutionProvider",),
                         cache=TimingCache(tmp_path / "t.json"))
    assert again.rewrite and again.timing.cached and len(calls) == 1  # read from the cache file
    # a ratio whose band straddles 1 − MODEL_MIN_GAIN is re-timed, then kept on the safe side
    monkeypatch.setattr(model_latency, "ort_model_timer",
                        lambda *a, **k: Timing(1.0, 0.98, runs=20, ratio_halfwidth=0.05))
    unsure = check_faster(net, three_layer_net(seed=1), feeds, threads=1, providers=("CPUExecutionProvider",),
                          cache=None)
    assert not unsure.rewrite and unsure.timing.retimes == latency.MAX_RETIMES


def test_the_real_timer_times_two_models():
    net = three_layer_net()
    data = net.SerializeToString()
    t = REAL_TIMER(data, data, {"x": correlated_images(1, 6, 12, 12)}, 1, ("CPUExecutionProvider",),
                   budget_s=0.02, min_runs=5, max_runs=10)
    assert 5 <= t.runs <= 10 and t.regular_ms > 0 and t.separable_ms > 0


def test_a_model_whose_first_input_is_a_scalar_is_checked(tmp_path):
    """The whole-model check's input takes its batch from the first input with a batch axis;
    a scalar first input (a scale, a threshold) crashed with IndexError."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    net = three_layer_net(c=6, width=16)
    g = net.graph
    g.node[-1].output[0] = "y0"
    g.node.append(helper.make_node("Mul", ["y0", "s"], ["y"], name="scale"))
    inputs = [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])] + list(g.input)
    del g.input[:]
    g.input.extend(inputs)
    onnx.checker.check_model(net)
    np.savez(tmp_path / "c.npz", s=np.array(2.0, np.float32), x=correlated_images(40, 6, 12, 12, seed=1))
    _, rep = decompose(net, calib=str(tmp_path / "c.npz"), max_error=0.3)
    assert rep.budget["mode"] == "max_error"


def test_a_verdict_may_take_a_few_forward_passes_and_at_least_30_s():
    """The whole-model check's time limit: 3 forward passes of the calibration set, at least
    30 s. Under the floor a model whose two runs take 0.2 s a round still gets every re-timing
    (10, then 30, then 90 rounds: 2 + 6 + 18 = 26 s), so quick models decide as before."""

    from onnx_dwdecomp.timing.model import check_time_limit

    assert check_time_limit(None) == 30.0 and check_time_limit(4.8) == 30.0
    assert check_time_limit(20.0) == 60.0
