"""node_profile.py and pricing.in_model_latencies: each conv's time inside the whole model."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import correlated_images, fake_node_times, three_layer_net
from onnx_dwdecomp.timing import node_profile
from onnx_dwdecomp.planning.budget import SKIP
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.timing.node_profile import OTHER, cached_profile, fingerprint, profile_node_times
from onnx_dwdecomp.planning.pricing import in_model_latencies, merge_targets
from onnx_dwdecomp.timing.cache import TimingCache

CPU = ("CPUExecutionProvider",)


def test_every_conv_is_found_inside_the_optimized_model(tmp_path, monkeypatch):
    """onnxruntime fuses Conv + Relu and moves convs to its blocked layout, renaming them; each
    is still found (by its weight's fingerprint), the times add up to the unprofiled model's,
    and nothing is left on disk."""
    monkeypatch.chdir(tmp_path)
    model = three_layer_net(c=16, hw=24)
    times = profile_node_times(model, {"x": correlated_images(1, 16, 24, 24)}, threads=1, providers=CPU,
                               budget_s=0.05, min_runs=3, max_runs=5)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert all(times.node_ms.get(name, 0) > 0 for name in convs)
    assert set(times.node_ms) <= set(convs) | {OTHER} | {n.name for n in model.graph.node}
    # the overhead is taken off every kernel alike: the corrected times come to about the model's
    # (tolerance: medians of per-run sums do not add exactly, and a small node's time clamped at 0
    # gives back part of its share — up to ~10 % on this 3-conv model; 25 % keeps noise out)
    assert times.overhead_ms == 0 or sum(times.node_ms.values()) <= 1.25 * times.model_ms
    assert times.model_ms > 0 and 3 <= times.runs <= 5
    assert os.listdir(tmp_path) == []  # trace and optimized model went to a removed temp folder


def test_fingerprint_ignores_reordering_and_zero_padding():
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    blocked = np.zeros((8, 8, 3, 3), np.float32)
    blocked[:, :3] = w.transpose(0, 1, 3, 2)
    assert fingerprint(blocked) == pytest.approx(fingerprint(w))
    assert fingerprint(2 * w) != pytest.approx(fingerprint(w))


def test_option_prices_are_the_replacement_nodes_times():
    """The fake profile: every conv 1 ms, a replacement at r as fast as ratios[r]; the prices of
    each layer are its own nodes' times, a merged pointwise conv counted on both sides."""
    from test_budget import merge_net

    model = merge_net()
    layers = find_candidates(model, (), ()).layers
    second = merge_targets(model, layers)
    assert len(layers) == 2 and len(second) == 1  # the first conv's pointwise merges into the 1×1 conv
    profile = fake_node_times({1: 0.25, 2: 0.5})

    def run(m):
        return profile(m, {}, threads=1, providers=CPU)

    prices, model_ms = in_model_latencies(model, layers, {layer.name: [1, 2] for layer in layers}, second, run)
    for layer in layers:
        merged = layer.name in second
        regular = 2.0 if merged else 1.0  # the conv, and the 1×1 conv its pointwise merges into
        assert prices[layer.name][SKIP] == regular
        # merged: the pointwise is the 1×1 conv's node (1 ms in the fake), the depthwise ones free
        assert prices[layer.name][1] == (1.0 if merged else 0.25)
    assert model_ms == run(model).model_ms


def test_a_quiet_profile_is_cached_one_under_load_is_not(tmp_path, monkeypatch):
    model = three_layer_net()
    feeds = {"x": correlated_images(1, 6, 12, 12)}
    calls = []

    def fake(m, f, *, threads, providers, **_):
        calls.append(1)
        return node_profile.NodeTimes({"conv0": 1.0}, 2.0, 0.1, 5)

    monkeypatch.setattr(node_profile, "profile_node_times", fake)
    monkeypatch.setattr(node_profile.OthersLoad, "share", lambda self: 0.0)  # busy or not: machine_load below
    cache = TimingCache(tmp_path / "c.json", onnxruntime_version="x", cpu="y")
    monkeypatch.setattr(node_profile, "machine_load", lambda threads: (1.5, 4.0, True))
    assert cached_profile(model, feeds, threads=2, providers=CPU, cache=cache).loaded
    assert cached_profile(model, feeds, threads=2, providers=CPU, cache=cache).loaded and len(calls) == 2
    monkeypatch.setattr(node_profile, "machine_load", lambda threads: (1.0, 0.5, False))
    first = cached_profile(model, feeds, threads=2, providers=CPU, cache=cache)
    again = cached_profile(model, feeds, threads=2, providers=CPU,
                           cache=TimingCache(tmp_path / "c.json", onnxruntime_version="x", cpu="y"))
    assert len(calls) == 3 and again.cached and again == first  # read back from the file
    other = cached_profile(model, feeds, threads=1, providers=CPU, cache=cache)  # another key
    assert len(calls) == 4 and not other.cached


def test_a_conv_missing_from_the_profile_is_priced_by_its_time_alone():
    """A replacement conv the profile could not map back must not read as free (0 ms): that
    option falls back to its ratio timed alone × the conv's regular time inside the model."""
    from test_budget import merge_net

    model = merge_net()
    layers = find_candidates(model, (), ()).layers
    second = merge_targets(model, layers)
    fake = fake_node_times({1: 0.25})

    def lossy(m):  # the profile loses every depthwise conv
        times = fake(m, {}, threads=1, providers=CPU)
        return node_profile.NodeTimes({n: t for n, t in times.node_ms.items() if "depthwise" not in n},
                                      times.model_ms, 0.0, 5)

    prices, _ = in_model_latencies(model, layers, {layer.name: [1] for layer in layers}, second, lossy)
    assert all(prices[layer.name][1] is None and prices[layer.name][SKIP] > 0 for layer in layers)


def test_price_options_fall_back_to_the_ratio_timed_alone():
    from test_budget import merge_net

    from onnx_dwdecomp.planning.pricing import price_options
    from onnx_dwdecomp.shapes import infer_tensor_info
    from onnx_dwdecomp.timing.latency import LatencySelector, Timing

    model = merge_net()
    layers = find_candidates(model, (), ()).layers
    infos = infer_tensor_info(model, {"x": (1, 8, 10, 10)})
    selector = LatencySelector(lambda config, scale=1: Timing(1.0, 0.4 if config.mid_channels == config.input_shape[1]
                                                               else 1.0, runs=9), threads=1)
    fake = fake_node_times({1: 0.25})

    def lossy(m):
        times = fake(m, {}, threads=1, providers=CPU)
        return node_profile.NodeTimes({n: t for n, t in times.node_ms.items() if "depthwise" not in n},
                                      times.model_ms, 0.0, 5)

    priced, _, _ = price_options(model, layers, infos, "latency", selector, lossy)
    for name, options in priced.latency_ms.items():
        assert options[1] == pytest.approx(0.4 * options[SKIP])  # alone ×0.4, not 0 ms


def test_a_conv_whose_weight_is_a_constant_node_is_found(tmp_path):
    """Paddle2ONNX writes weights as Constant nodes; onnxruntime folds them into initializers
    under other names. The conv is still found by its weight's fingerprint (before: PP-OCR det
    lost 4 of 6 candidates, priced 0 ms inside the model)."""
    from onnx import helper, numpy_helper

    model = three_layer_net(c=16, hw=24)
    inits = {t.name: t for t in model.graph.initializer}
    consts = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = inits.pop(node.input[1])
            consts.append(helper.make_node("Constant", [], [w.name], value=w, name=f"const_{w.name}"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits.values())
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    times = profile_node_times(model, {"x": correlated_images(1, 16, 24, 24)}, threads=1, providers=CPU,
                               budget_s=0.05, min_runs=3, max_runs=5)
    assert all(n.name in times.node_ms for n in model.graph.node if n.op_type == "Conv")


def test_convs_without_a_name_are_priced_inside_the_model():
    """An unnamed conv is ``Conv@<output>`` to the tool; its time inside the model must be found
    (before: 0 ms regular, every option dropped as 'not faster inside the model')."""
    model = three_layer_net(c=16, hw=24)
    for node in model.graph.node:
        node.name = ""
    layers = find_candidates(model, (), ()).layers
    feeds = {"x": correlated_images(1, 16, 24, 24)}

    def profile(m):
        return profile_node_times(m, feeds, threads=1, providers=CPU, budget_s=0.05, min_runs=3, max_runs=5)

    prices, _ = in_model_latencies(model, layers, {layer.name: [1] for layer in layers},
                                   merge_targets(model, layers), profile)
    assert all(layer.name.startswith("Conv@") for layer in layers)
    assert all(prices[layer.name][SKIP] > 0 and prices[layer.name][1] > 0 for layer in layers)
