"""Tests of onnx_dwdecomp.latency: the decision rule, the cache, the probe models, and the
pipeline's use of them. No test asserts a measured time: timings depend on the machine, so the
decision logic is driven by injected cost functions and the real timer is only checked for
well-formed results."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import run_model
from onnx_dwdecomp import latency, zoo
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.latency import (MIN_GAIN, ConvConfig, LatencySelector, Timing, TimingError,
                                   conv_pair_models, decide, ort_timer)
from onnx_dwdecomp.pipeline import decompose


def _config(c=8, n=16, hw=10, stride=1, mult=1, threads=1, auto_pad="NOTSET", pads=(1, 1, 1, 1),
            dilations=(1, 1), kernel=(3, 3), mid_group=None, bias=True):
    return ConvConfig((1, c, hw, hw), n, kernel, (stride, stride), pads, dilations, auto_pad,
                      c * mult, c if mid_group is None else mid_group, bias, "float32", threads)


@pytest.mark.parametrize("regular, separable, rewrite", [
    (1.0, 0.50, True),
    (1.0, 1.0 - MIN_GAIN, True),   # exactly at the threshold counts as faster
    (1.0, 0.96, False),            # 4 % faster: within noise, keep
    (1.0, 1.30, False),            # slower (the 3-channel-stem case)
    (0.0, 0.0, False),             # degenerate timing never rewrites
])
def test_decide_threshold(regular, separable, rewrite):
    d = decide(Timing(regular, separable, runs=10))
    assert d.rewrite is rewrite
    assert f"{separable:.3f} ms" in d.reason and f"{regular:.3f} ms" in d.reason
    assert d.reason.startswith("faster" if rewrite else "not faster")
    assert d.timing == Timing(regular, separable, 10)


def test_min_gain_is_configurable():
    t = Timing(1.0, 0.85, runs=5)
    assert LatencySelector(lambda c: t, threads=1, min_gain=0.10).decide(_config()).rewrite
    assert not LatencySelector(lambda c: t, threads=1, min_gain=0.20).decide(_config()).rewrite


def test_cache_times_each_configuration_once():
    calls = []

    def timer(config):
        calls.append(config)
        return Timing(1.0, 0.5 if config.input_shape[1] > 3 else 1.2, runs=3)

    sel = LatencySelector(timer, threads=2)
    a, b = _config(threads=2), _config(threads=2)
    assert a == b and hash(a) == hash(b)
    assert sel.decide(a).rewrite and sel.decide(b).rewrite
    assert calls == [a]  # same configuration: measured once
    stem = _config(c=3, n=24, hw=224, stride=2, threads=2)
    assert not sel.decide(stem).rewrite
    # every field that changes the latency is part of the key
    for other in (_config(mult=2, threads=2), _config(threads=1), _config(hw=12, threads=2),
                  _config(stride=2, threads=2), _config(bias=False, threads=2),
                  _config(auto_pad="SAME_UPPER", threads=2)):
        sel.decide(other)
    assert len(calls) == len(sel.cache) == 8


def test_timer_failure_keeps_the_conv_and_is_cached():
    calls = []

    def timer(config):
        calls.append(config)
        raise TimingError("onnxruntime cannot run it")

    sel = LatencySelector(timer, threads=1)
    for _ in range(2):
        d = sel.decide(_config())
        assert not d.rewrite and d.timing is None and "not timed" in d.reason
    assert len(calls) == 1
    with pytest.raises(TimingError):
        sel.timing(_config())


@pytest.mark.parametrize("kw", [
    dict(),
    dict(stride=2, hw=11),
    dict(auto_pad="SAME_UPPER", stride=2, pads=(0, 0, 0, 0)),
    dict(dilations=(2, 2), pads=(2, 1, 2, 1), kernel=(3, 5)),
    dict(mult=2),
    dict(mid_group=1, bias=False),  # channel decomposition: k×k to d' channels, group 1
])
def test_probe_models_match_the_real_replacement(kw):
    config = _config(**kw)
    regular, separable = conv_pair_models(config)
    for m in (regular, separable):
        onnx.checker.check_model(m, full_check=True)
    c, mid, group = config.input_shape[1], config.mid_channels, config.mid_group
    shapes = {t.name: tuple(t.dims) for t in separable.graph.initializer}
    assert shapes["D"] == (mid, c // group, *config.kernel)
    assert shapes["P"] == (config.out_channels, mid, 1, 1)
    assert [n.op_type for n in regular.graph.node] == ["Conv"]
    assert ("B" in {t.name for t in regular.graph.initializer}) is config.bias
    x = {"x": np.zeros(config.input_shape, np.float32)}
    assert run_model(regular, x)[0].shape == run_model(separable, x)[0].shape


def test_ort_timer_returns_medians_within_budget():
    t = ort_timer(_config(c=4, n=4, hw=6), budget_s=0.01, min_runs=3, max_runs=5)
    assert 3 <= t.runs <= 5
    assert np.isfinite(t.regular_ms) and t.regular_ms > 0
    assert np.isfinite(t.separable_ms) and t.separable_ms > 0


def test_ort_timer_failure_is_a_timing_error():
    with pytest.raises(TimingError, match="onnxruntime cannot run"):
        ort_timer(_config(c=4, n=4, hw=2, pads=(0, 0, 0, 0)))  # 3×3 kernel on a 2×2 input


# ------------------------------------------------------------------------------- pipeline


def _stem_is_slow(config: ConvConfig) -> Timing:
    """A cost model shaped like the measurements: few input channels gain nothing."""
    c = config.input_shape[1]
    return Timing(1.0, 1.25 if c <= 3 else 0.4, runs=1)


def test_pipeline_latency_selection_keeps_the_stem(monkeypatch):
    monkeypatch.setattr(latency, "ort_timer", _stem_is_slow)
    model = zoo.shufflenet_v2(0.5, "depthwise_only", fold_bn=False, image_size=32, num_classes=10)
    new, report = decompose(model, threads=1)
    assert report.select == "latency"
    by = {s.name: s for s in report.selection}
    assert len(by) == 20
    assert not by["conv1.conv"].rewritten and by["conv1.conv"].reason.startswith("not faster")
    assert (by["conv1.conv"].regular_ms, by["conv1.conv"].separable_ms) == (1.0, 1.25)
    assert all(s.rewritten and s.separable_ms == 0.4 for n, s in by.items() if n != "conv1.conv")
    assert [layer.name for layer in report.layers] == [n for n in by if n != "conv1.conv"]
    assert any(s.name == "conv1.conv" and "kept regular" in s.reason for s in report.skipped)
    d = json.loads(report.to_json())
    assert d["select"] == "latency" and d["options"]["select"] == "latency" and d["options"]["threads"] == 1
    assert {"name", "rewritten", "reason", "regular_ms", "separable_ms"} == set(d["selection"][0])
    assert len(d["folded"]) == 56 and len(d["merged"]) == 19
    text = report.render()
    assert "latency selection" in text and "conv1.conv" in text and "keep" in text
    assert "depend on the machine" in text
    # the selected result is the native structure, stem included, without --exclude
    kinds = {"Conv": 0}
    for node in new.graph.node:
        kinds[node.op_type] = kinds.get(node.op_type, 0) + 1
    assert kinds["Conv"] == 56 and "BatchNormalization" not in kinds


def test_select_all_times_nothing(monkeypatch):
    def boom(config):
        raise AssertionError("select='all' must not time anything")

    monkeypatch.setattr(latency, "ort_timer", boom)
    model = zoo.shufflenet_v2(0.5, "merged", image_size=32, num_classes=10)
    _, report = decompose(model, select="all", verify=False)
    assert len(report.layers) == 20 and all(s.rewritten for s in report.selection)
    assert "latency selection" not in report.render()


def test_select_and_threads_validation(tmp_path, capsys):
    model = zoo.shufflenet_v2(0.5, "merged", image_size=32, num_classes=10)
    with pytest.raises(OptionError, match="--select"):
        decompose(model, select="fastest")
    with pytest.raises(OptionError, match="--threads"):
        decompose(model, threads=0)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for argv in (["--select", "fastest"], ["--threads", "x"]):
        assert main([str(path), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1
