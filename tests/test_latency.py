"""Tests of onnx_dwdecomp.latency: the decision rule and its noise band, the per-run cache, the
probe models, and the pipeline's use of them. No test asserts a measured time: timings depend on
the machine, so the decision logic is driven by injected cost functions (some returning per-round
samples) and the real timer is only checked for well-formed results. The persistent cache is
tested in test_timing_cache.py."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from conftest import conv_model, run_model
from onnx_dwdecomp import zoo
from onnx_dwdecomp.timing import latency
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.candidates import ConvLayer, conv_kinds, find_candidates
from onnx_dwdecomp.timing.latency import (BAND_Z, MAX_RETIMES, MIN_GAIN, RETIME_FACTOR, ConvConfig, LatencySelector,
                                   Timing, TimingError, conv_pair_models, decide, ort_timer, within_noise)
from onnx_dwdecomp.pipeline import decompose
from onnx_dwdecomp.rewrite import Replacement, apply_replacements
from onnx_dwdecomp.solve import svd_factors


def _config(c=8, n=16, hw=10, stride=1, mult=1, threads=1, auto_pad="NOTSET", pads=(1, 1, 1, 1),
            dilations=(1, 1), kernel=(3, 3), mid_group=None, bias=True, providers=("CPUExecutionProvider",)):
    return ConvConfig((1, c, hw, hw), n, kernel, (stride, stride), pads, dilations, auto_pad,
                      c * mult, c if mid_group is None else mid_group, bias, "float32", threads, providers)


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
    assert LatencySelector(lambda c, scale: t, threads=1, min_gain=0.10).decide(_config()).rewrite
    assert not LatencySelector(lambda c, scale: t, threads=1, min_gain=0.20).decide(_config()).rewrite


def test_cache_times_each_configuration_once():
    calls = []

    def timer(config, scale):
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
                  _config(auto_pad="SAME_UPPER", threads=2), _config(threads=2, providers=("X", "Y"))):
        sel.decide(other)
    assert len(calls) == len(sel.timings) == 9 and not sel.cache_hits


def test_timer_failure_keeps_the_conv_and_is_cached():
    calls = []

    def timer(config, scale):
        calls.append(config)
        raise TimingError("onnxruntime cannot run it")

    sel = LatencySelector(timer, threads=1)
    for _ in range(2):
        d = sel.decide(_config())
        assert not d.rewrite and d.timing is None and "not timed" in d.reason
    assert len(calls) == 1
    with pytest.raises(TimingError):
        sel.timing(_config())


# ------------------------------------------------------------------------------- noise band


def _noisy(ratio: float, spread: float):
    """A timer of 5·scale rounds: regular 1 ms, separable ``ratio·exp(spread·u)`` with
    ``u = -1, -½, 0, ½, 1`` repeated, so every call has median ratio ``ratio`` and per-round
    log-ratio MAD ``spread / 2``; also returns the list of scales it was called with."""
    scales = []

    def timer(config, scale):
        scales.append(scale)
        u = np.tile(np.linspace(-1, 1, 5), scale)
        return Timing.from_samples(np.ones(u.size), ratio * np.exp(spread * u))

    return timer, scales


def _halfwidth(ratio, spread, n):
    """The band of the module docstring for _noisy's samples: σ = 1.4826 · spread/2."""
    return BAND_Z * math.sqrt(math.pi / 2) * 1.4826 * (spread / 2) / math.sqrt(n) * ratio


def test_from_samples_summarises_the_rounds():
    t = Timing.from_samples([1.0, 2.0, 1.0, 1.0, 1.0], [0.5, 1.0, 0.5, 0.5, 0.5])
    assert (t.regular_ms, t.separable_ms, t.runs, t.retimes, t.cached) == (1.0, 0.5, 5, 0, False)
    assert t.ratio_halfwidth == 0.0  # every round has ratio ½: noise that hits both cancels
    u = np.linspace(-1, 1, 5)
    t = Timing.from_samples(np.full(5, 2.0), 1.8 * np.exp(0.1 * u))
    assert t.ratio == pytest.approx(0.9) and t.regular_iqr_ms == 0.0
    assert t.separable_iqr_ms == pytest.approx(1.8 * (np.exp(0.05) - np.exp(-0.05)))
    assert t.ratio_halfwidth == pytest.approx(_halfwidth(0.9, 0.1, 5))
    for bad in (([], []), ([1.0, 2.0], [1.0])):
        with pytest.raises(ValueError):
            Timing.from_samples(*bad)


@pytest.mark.parametrize("ratio, rewrite", [(0.5, True), (1.3, False)])
def test_clear_win_or_loss_is_decided_at_once(ratio, rewrite):
    timer, scales = _noisy(ratio, spread=0.1)
    d = LatencySelector(timer, threads=1).decide(_config())
    assert d.rewrite is rewrite and scales == [1]
    assert (d.timing.runs, d.timing.retimes, d.timing.retimed) == (5, 0, False)
    assert d.timing.ratio_halfwidth == pytest.approx(_halfwidth(ratio, 0.1, 5))
    assert "re-timed" not in d.reason and "within noise" not in d.reason


@pytest.mark.parametrize("ratio, rewrite", [(0.94, True), (0.96, False)])
def test_threshold_inside_the_band_is_retimed_with_more_rounds(ratio, rewrite):
    # |ratio − 0.95| = 0.01: inside the band of 5 rounds, outside that of 15
    assert _halfwidth(ratio, 0.02, 5) > 0.01 > _halfwidth(ratio, 0.02, 15)
    timer, scales = _noisy(ratio, spread=0.02)
    sel = LatencySelector(timer, threads=1)
    d = sel.decide(_config())
    assert scales == [1, RETIME_FACTOR] and d.rewrite is rewrite
    assert (d.timing.runs, d.timing.retimes, d.timing.retimed) == (15, 1, True)
    assert "re-timed 1×" in d.reason and "within noise" not in d.reason
    assert sel.timings[_config()] == d.timing  # the re-timing replaced the first measurement
    assert sel.decide(_config()) == d and len(scales) == 2  # and is not repeated


def test_still_inside_the_band_after_the_last_retiming_keeps_the_conv_regular():
    timer, scales = _noisy(0.94, spread=0.3)  # the medians would say 6 % faster
    d = LatencySelector(timer, threads=1).decide(_config())
    assert scales == [RETIME_FACTOR ** k for k in range(MAX_RETIMES + 1)] == [1, 3, 9]
    assert not d.rewrite and d.timing.retimes == MAX_RETIMES and d.timing.runs == 45
    assert within_noise(d.timing) and d.reason.startswith("within noise after 2 re-timings, kept regular")


def test_a_retiming_that_would_pass_the_time_limit_is_not_run():
    """A whole-model check's verdict has a time limit (timing/model.py, a few forward passes of
    the job): _noisy's rounds are 1 + 0.94 ms, so 5 rounds take ~9.7 ms and the 3× re-timing
    would add ~29 ms. Under a 30 ms limit it is not run and the conv stays regular — the safe
    side, though the medians say 6 % faster; with 40 ms it runs (and the next, ×9, would not)."""
    timer, scales = _noisy(0.94, spread=0.3)
    d = LatencySelector(timer, threads=1, time_limit_s=0.030).decide(_config())
    assert scales == [1] and not d.rewrite and d.timing.runs == 5
    assert d.reason.startswith("within noise, and a re-timing would not fit in the 0.03 s this timing may take; kept "
                               "regular: separable 0.940 ms vs regular 1.000 ms")
    timer, scales = _noisy(0.94, spread=0.3)
    d = LatencySelector(timer, threads=1, time_limit_s=0.040).decide(_config())
    assert scales == [1, 3] and not d.rewrite and d.timing.retimes == 1


def test_the_time_limit_counts_what_a_timing_took_on_the_clock():
    """Warm-ups, sessions and the extra rounds under load are not in a timing's medians: the limit
    counts the wall seconds the timing took. A timer that takes 50 ms for 5 rounds whose medians
    add to ~10 ms: the re-timing (~150 ms more) does not fit in 100 ms."""
    import time

    noisy, scales = _noisy(0.94, spread=0.3)

    def slow(config, scale):
        time.sleep(0.05 * scale)
        return noisy(config, scale)

    d = LatencySelector(slow, threads=1, time_limit_s=0.100).decide(_config())
    assert scales == [1] and not d.rewrite


@pytest.mark.parametrize("separable, halfwidth, rewrite, scales", [
    (0.5, 0.25, True, [1]),                  # θ = 0.75 exactly on the upper band edge: decided
    (1.0, 0.25, False, [1]),                 # θ exactly on the lower band edge: decided
    (0.5, 0.25 + 1e-12, False, [1, 3, 9]),   # θ just inside: re-timed, still inside: regular
])
def test_threshold_at_the_band_edge(separable, halfwidth, rewrite, scales):
    calls = []

    def timer(config, scale):
        calls.append(scale)
        return Timing(1.0, separable, 10, ratio_halfwidth=halfwidth)

    d = LatencySelector(timer, threads=1, min_gain=0.25).decide(_config())
    assert d.rewrite is rewrite and calls == scales
    assert within_noise(d.timing, 0.25) is (len(scales) > 1)


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
    if group == c and mid > c:  # split depthwise form: r convs of c·1 filters (as rewrite.py emits)
        assert [shapes[f"D{j}"] for j in range(mid // c)] == [(c, 1, *config.kernel)] * (mid // c)
    else:
        assert shapes["D"] == (mid, c // group, *config.kernel)
    assert shapes["P"] == (config.out_channels, mid, 1, 1)
    assert [n.op_type for n in regular.graph.node] == ["Conv"]
    assert ("B" in {t.name for t in regular.graph.initializer}) is config.bias
    x = {"x": np.zeros(config.input_shape, np.float32)}
    assert run_model(regular, x)[0].shape == run_model(separable, x)[0].shape


def _structure(model: onnx.ModelProto) -> list[tuple]:
    """Per node: op, group, weight shape, spatial attributes of k×k convs, and which earlier
    nodes' outputs (by position) or graph inputs it reads: the form, without the names."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    made = {out: k for k, node in enumerate(model.graph.node) for out in node.output}
    rows = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        reads = [made.get(i, "input" if i in {v.name for v in model.graph.input} else "const")
                 for i in node.input]
        row = [node.op_type, reads]
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            row += [attrs.get("group", 1), w, len(node.input) == 3]
            if w[2:] != (1, 1):
                row += [{k: attrs.get(k) for k in ("strides", "pads", "dilations", "auto_pad")}]
        else:
            row += [attrs]
        rows.append(tuple(row))
    return rows


@pytest.mark.parametrize("r", [1, 2, 3])
def test_probe_separable_model_has_the_rewritten_form(r):
    """The separable probe is the graph rewrite.py emits for the same conv: at r > 1, r depthwise
    convs (group C, one output channel per group), Concat(axis 1) in order, then the 1×1."""
    c, n = 6, 10
    w = np.random.default_rng(0).standard_normal((n, c, 3, 3)).astype(np.float32)
    model = conv_model(w, np.ones(n, np.float32), hw=(10, 10), strides=[2, 2], pads=[1, 1, 1, 1])
    layer = find_candidates(model).layers[0]
    rewritten = apply_replacements(model, [Replacement(layer, svd_factors(layer.weight, layer.bias, r))])
    config = ConvConfig.of(layer, (1, c, 10, 10), mid_channels=c * r, mid_group=c, threads=1)
    _, probe = conv_pair_models(config)
    onnx.checker.check_model(probe, full_check=True)
    assert _structure(probe) == _structure(rewritten)
    ops = [node.op_type for node in probe.graph.node]
    assert ops == ["Conv"] * r + (["Concat"] if r > 1 else []) + ["Conv"]
    assert conv_kinds(probe) == {"depthwise": r, "pointwise": 1}
    x = {"x": np.zeros(config.input_shape, np.float32)}
    assert run_model(probe, x)[0].shape == run_model(model, x)[0].shape


def test_ort_timer_returns_medians_within_budget():
    for scale in (1, 2):
        t = ort_timer(_config(c=4, n=4, hw=6), scale, budget_s=0.01, min_runs=3, max_runs=5)
        assert 3 * scale <= t.runs <= 5 * scale
        assert np.isfinite(t.regular_ms) and t.regular_ms > 0
        assert np.isfinite(t.separable_ms) and t.separable_ms > 0
        assert min(t.regular_iqr_ms, t.separable_iqr_ms, t.ratio_halfwidth) >= 0
        assert np.isfinite(t.ratio_halfwidth) and t.retimes == 0 and not t.cached


def test_providers_reach_the_probe_sessions():
    layer = ConvLayer("conv", 0, "x", "y", np.zeros((16, 8, 3, 3), np.float32), None, (1, 1), (1, 1, 1, 1),
                      (1, 1), "NOTSET")
    sel = LatencySelector(threads=1, providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    config = sel.config(layer, (1, 8, 10, 10), mid_channels=16, mid_group=8)
    assert config.providers == ("NoSuchExecutionProvider", "CPUExecutionProvider")
    assert config.mid_channels == 16 and config.threads == 1
    d = sel.decide(config)  # the real timer: onnxruntime would silently fall back to the CPU
    assert not d.rewrite and "NoSuchExecutionProvider not available" in d.reason
    assert LatencySelector(threads=1).config(layer, (1, 8, 10, 10), mid_channels=8, mid_group=8).providers \
        == ("CPUExecutionProvider",)


def test_ort_timer_failure_is_a_timing_error():
    with pytest.raises(TimingError, match="onnxruntime cannot run"):
        ort_timer(_config(c=4, n=4, hw=2, pads=(0, 0, 0, 0)))  # 3×3 kernel on a 2×2 input


# ------------------------------------------------------------------------------- pipeline


def _stem_is_slow(config: ConvConfig, scale: int = 1) -> Timing:
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
    def boom(config, scale):
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


@pytest.mark.parametrize("mult", [1, 2])
def test_probe_models_with_a_merged_pointwise(mult):
    """merged_channels = m: the regular probe is the conv followed by its 1×1 conv (n → m), the
    separable probe ends in the merged pointwise conv (C·r → m) — both write m channels."""
    from dataclasses import replace

    config = replace(_config(c=8, n=16, mult=mult), merged_channels=12)
    regular, separable = latency.conv_pair_models(config)
    assert [n.op_type for n in regular.graph.node] == ["Conv", "Conv"]
    inits = {t.name: tuple(t.dims) for t in separable.graph.initializer}
    assert inits["P"] == (12, 8 * mult, 1, 1)
    x = np.random.default_rng(0).standard_normal((1, 8, 10, 10)).astype(np.float32)
    assert run_model(regular, {"x": x})[0].shape == run_model(separable, {"x": x})[0].shape == (1, 12, 10, 10)
    assert "+1×1→12" in config.describe()
    assert config != _config(c=8, n=16, mult=mult)  # another cache key than the isolated pair


def test_a_timing_under_load_decides_the_run_but_is_not_cached(tmp_path):
    """The README command beside CPU hogs once froze ×0.913 in the cache where a quiet `bench`
    measured ×0.98. A wall-clock timing taken under load is used for this run's decision, never
    stored; a quiet one is stored and reused however busy the next run's machine is."""
    from onnx_dwdecomp.timing.cache import TimingCache

    loaded = Timing(1.0, 0.8, runs=30, clock="wall", contention=1.5, load_average=3.2, loaded=True)
    quiet = Timing(1.0, 0.97, runs=30, clock="wall")
    cache = TimingCache(tmp_path / "cache.json", onnxruntime_version="x", cpu="y")
    sel = LatencySelector(lambda config, scale: loaded, threads=2, cache=cache)
    assert sel.decide(_config(threads=2)).rewrite  # this run decides on what it measured
    assert TimingCache(tmp_path / "cache.json", onnxruntime_version="x", cpu="y").get(_config(threads=2)) is None
    assert "under load" in loaded.load_text() and "not cached" in loaded.load_text()
    LatencySelector(lambda config, scale: quiet, threads=2, cache=cache).decide(_config(threads=2))
    busy_rerun = LatencySelector(lambda config, scale: loaded, threads=2,
                                 cache=TimingCache(tmp_path / "cache.json", onnxruntime_version="x", cpu="y"))
    decision = busy_rerun.decide(_config(threads=2))
    assert decision.timing == quiet and decision.timing.cached and not decision.rewrite


def test_the_real_timer_records_its_clock():
    t = ort_timer(_config(threads=1), budget_s=0.01, min_runs=3, max_runs=5)
    assert t.clock == "cpu" and t.contention > 0
    t = ort_timer(_config(threads=2), budget_s=0.01, min_runs=3, max_runs=5)
    assert t.clock == "wall"


def test_a_slow_pair_is_timed_on_fewer_rounds(monkeypatch):
    """A model that takes seconds a round is not held to min_runs rounds: what fits in
    MAX_TIMING_S, at least 3 (a 2.4 s segmentation network's check took 12 minutes before)."""
    import time

    from onnx_dwdecomp.timing import clock

    monkeypatch.setattr(latency, "MAX_TIMING_S", 0.1)
    monkeypatch.setattr(latency, "machine_load", lambda threads: (1.0, 0.0, False))
    monkeypatch.setattr(clock.OthersLoad, "share", lambda self: 0.0)  # a quiet machine
    fns = [lambda: time.sleep(0.01), lambda: time.sleep(0.01)]  # 0.02 s a round (wall clock at 2 threads)
    t = latency.timed_pair(fns, 2, budget_s=0.0, min_runs=10, max_runs=100, warmup=0)
    assert 3 <= t.runs <= 5  # ⌈0.1 / 0.02⌉ = 5 rounds fit (fewer if the sleeps overran), not 10
    t = latency.timed_pair(fns, 2, budget_s=0.0, min_runs=2, max_runs=100, warmup=0)
    assert t.runs == 2  # min_runs below what fits: as asked


def test_more_threads_on_a_busy_machine_take_more_rounds_and_are_not_kept(monkeypatch):
    """Beside two CPU hogs, 2-thread wall-clock rounds measured ×0.910 ± 0.040 where a quiet
    bench measured ×0.993: when other processes use the CPUs during the rounds, BUSY_RETIME ×
    as many rounds more are timed and the timing is loaded — used for the run, never cached."""
    import time

    from onnx_dwdecomp.timing import clock

    fns = [lambda: time.sleep(0.002), lambda: time.sleep(0.001)]
    monkeypatch.setattr(latency, "machine_load", lambda threads: (1.0, 0.0, False))
    monkeypatch.setattr(clock.OthersLoad, "share", lambda self: 0.0)
    quiet = latency.timed_pair(fns, 2, budget_s=0.0, min_runs=5, max_runs=5, warmup=0)
    assert quiet.clock == "wall" and not quiet.loaded and quiet.runs == 5
    monkeypatch.setattr(clock.OthersLoad, "share", lambda self: 0.55)  # two hogs on two CPUs
    busy = latency.timed_pair(fns, 2, budget_s=0.0, min_runs=5, max_runs=5, warmup=0)
    assert busy.loaded and busy.others == 0.55 and busy.runs == 5 * (1 + latency.BUSY_RETIME)
    assert "other processes used 55 % of the CPUs" in busy.load_text() and "not cached" in busy.load_text()
    one = latency.timed_pair(fns, 1, budget_s=0.0, min_runs=5, max_runs=5, warmup=0)
    assert one.clock == "cpu" and not one.loaded  # the thread's CPU time: load does not matter


def test_others_load_leaves_this_process_out(monkeypatch):
    """``(Δ machine busy − Δ own CPU) / (Δ wall · CPUs)``: 2 s of wall on 2 CPUs, the machine
    busy 3 s of which this process 1 s → other processes used half of the CPUs."""
    from onnx_dwdecomp.timing import clock

    readings = {"busy": iter([10.0, 13.0]), "own": iter([5.0, 6.0]), "wall": iter([100.0, 102.0])}
    monkeypatch.setattr(clock, "_machine_busy_s", lambda cpus: next(readings["busy"]))
    monkeypatch.setattr(clock.time, "process_time", lambda: next(readings["own"]))
    monkeypatch.setattr(clock.time, "perf_counter", lambda: next(readings["wall"]))
    monkeypatch.setattr(clock, "_affinity", lambda: {0, 5})  # this process may use 2 of the machine's CPUs
    assert clock.OthersLoad().start().share() == pytest.approx(0.5)


def test_busy_time_counts_only_this_process_cpus(tmp_path, monkeypatch):
    """Two hogs on the 2 CPUs a container gives this process, on a 64-CPU host: their load must
    not be diluted over the host's 64 CPUs (3 %) — only the allowed CPUs' lines count."""
    from onnx_dwdecomp.timing import clock

    lines = ["cpu  9999 0 9999 9999 0 0 0 0 0 0"] + [f"cpu{k} {1000 if k in (3, 4) else 10} 0 0 500 0 0 0 0 0 0"
                                                       for k in range(64)]
    stat = tmp_path / "stat"
    stat.write_text("\n".join(lines) + "\nintr 0\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k))
    monkeypatch.setattr(clock.os, "sysconf", lambda name: 100)
    assert clock._machine_busy_s({3, 4}) == pytest.approx(20.0)  # 2 × 1000 ticks at 100 Hz
    assert clock._machine_busy_s({99}) is None
