"""Tests of onnx_dwdecomp.plan (prices, curves, the budgeted planner) and of the accuracy-bounded
default plan end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_model, correlated_images, separable_weight, square_net, three_layer_net
from onnx import helper, numpy_helper

from onnx_dwdecomp.timing import latency
from onnx_dwdecomp.planning.budget import SKIP, LayerCurve, Option, allocate_error
from onnx_dwdecomp.calibration.patches import PATCHES_PER_DIM, positions_per_sample
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import BudgetError, OptionError
from onnx_dwdecomp.timing.latency import LatencySelector, Timing
from onnx_dwdecomp.pipeline import DecomposeOptions, decompose
from onnx_dwdecomp.options import DEFAULT_MAX_ERROR
from onnx_dwdecomp.planning.pricing import option_latencies
from onnx_dwdecomp.shapes import infer_tensor_info

# ------------------------------------------------------------------------------ options


def test_plan_mode_defaults():
    x = np.zeros((4, 1, 3, 3), np.float32)
    assert DecomposeOptions(calib=x).plan_mode() == "max_error" and DecomposeOptions(calib=x).default_plan
    assert DecomposeOptions(calib=x, multiplier=1).plan_mode() == "uniform"  # the paper's setting
    assert DecomposeOptions().plan_mode() == "uniform"  # data-free: unchanged
    assert DecomposeOptions(calib=x, method="channel").plan_mode() == "uniform"
    explicit = DecomposeOptions(calib=x, max_error=0.2)
    assert explicit.plan_mode() == "max_error" and not explicit.default_plan
    assert DecomposeOptions(calib=x, target_macs=0.5).plan_mode() == "target_macs"


def test_positions_per_sample_rule():
    # PP-OCR det's neck conv: D = 96·9 = 864 with 7 fit images → ⌈4·864/7⌉ = 494 positions each
    assert positions_per_sample(64, 1600, 864, 7) == -(-PATCHES_PER_DIM * 864 // 7) == 494
    assert positions_per_sample(64, 1600, 864, 1000) == 64  # enough images: the floor holds
    assert positions_per_sample(64, 100, 864, 7) == 100  # fewer positions than wanted: all of them
    assert positions_per_sample(None, 100, 9, 1000) == 100  # --positions all


# ------------------------------------------------------------------------------ prices


def _fake_timer(ratios: dict[int, float], calls: list):
    """Regular 1 ms; separable at multiplier r = mid_channels / C takes ratios[r] ms."""
    def timer(config, scale=1):
        r = config.mid_channels // config.input_shape[1]
        calls.append(r)
        return Timing(1.0, ratios[r], runs=9)
    return timer


def test_option_latencies_stop_at_the_first_option_not_faster():
    model = three_layer_net()
    layer = find_candidates(model, (), ()).layers[0]
    infos = infer_tensor_info(model, {"x": (1, 6, 12, 12)})
    calls: list[int] = []
    selector = LatencySelector(_fake_timer({1: 0.4, 2: 0.8, 3: 0.97, 4: 0.5}, calls), threads=1)
    macs = {layer.name: {SKIP: 100, 1: 10, 2: 20, 3: 30, 4: 40}}
    latencies, selection = option_latencies([layer], infos, macs, selector)
    assert calls == [1, 2, 3]  # r = 3 is not 5 % faster: r = 4 is never timed
    assert latencies[layer.name] == {SKIP: 1.0, 1: 0.4, 2: 0.8}
    assert selection[0].rewritten and "r = 1, 2" in selection[0].reason


def test_latency_price_and_macs_price_choose_differently():
    # A saves little MACs but much time; B the other way round. Room for one layer's error.
    curves = [LayerCurve("A", (Option(SKIP, 100, 0.0, 1.0), Option(1, 90, 0.01, 0.5))),
              LayerCurve("B", (Option(SKIP, 100, 0.0, 1.0), Option(1, 20, 0.01, 0.9)))]
    assert allocate_error(curves, 0.015, price="latency").multipliers == {"A": 1, "B": SKIP}
    assert allocate_error(curves, 0.015, price="macs").multipliers == {"A": SKIP, "B": 1}
    both = allocate_error(curves, 0.03, price="latency")
    assert both.multipliers == {"A": 1, "B": 1} and both.latency_ms == pytest.approx(1.4)


# ------------------------------------------------------------------------------ end to end


def mixed_net(c: int = 6, hw: int = 12) -> onnx.ModelProto:
    """conv0 exactly separable (rank-1 channel slices: r = 1 reproduces it), conv1 and conv2
    random (r = 1 loses much of their response)."""
    rng = np.random.default_rng(3)
    weights = {"w0": separable_weight(c, c, 3, 3, rank=1, seed=1) / 3.0,
               "w1": (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32),
               "w2": (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    nodes, cur = [], "x"
    for k in range(3):
        out = f"r{k}" if k < 2 else "y"
        nodes += [helper.make_node("Conv", [cur, f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [out])]
        cur = out
    return square_net(nodes, inits, c, hw, "mixed")


@pytest.fixture()
def fast_r1(monkeypatch):
    """Every conv's r = 1 form twice as fast as the regular conv, r ≥ 2 not faster: timed alone
    and inside the model."""
    from conftest import fake_node_times
    from onnx_dwdecomp.timing import node_profile

    calls: list[int] = []
    ratios = {1: 0.5} | {r: 1.0 for r in range(2, 10)}
    monkeypatch.setattr(latency, "ort_timer", _fake_timer(ratios, calls))
    monkeypatch.setattr(node_profile, "profile_node_times", fake_node_times(ratios))
    return calls


def test_default_plan_rewrites_only_what_keeps_the_function(fast_r1):
    net = mixed_net()
    calib = correlated_images(40, 6, 12, 12, seed=4)
    model, rep = decompose(net, calib=calib)
    b = rep.to_dict()["budget"]
    assert b["default"] and b["mode"] == "max_error" and b["target"] == DEFAULT_MAX_ERROR
    assert b["price"] == "latency"
    assert [layer.name for layer in rep.layers] == ["conv0"]  # the separable one, and only it
    assert rep.verification.inputs == "held-out calibration samples"
    assert rep.verification.worst_rel_l2() <= DEFAULT_MAX_ERROR and b["met"] is True
    assert b["latency_ms_before"] == pytest.approx(3.0) and b["latency_ms_after"] == pytest.approx(2.5)
    by_name = {layer["name"]: layer for layer in b["layers"]}
    assert by_name["conv0"]["latency_ms"] == pytest.approx(0.5) and by_name["conv0"]["patches"] > 0
    # the random convs' held-out curve errors are large: they cannot fit the bound
    assert all(by_name[n]["curve"][1]["predicted_error"] > 0.05 for n in ("conv1", "conv2"))
    assert rep.layers[0].patches == rep.calibration["patches_per_layer"]["conv0"]
    text = rep.render()
    assert "default bound" in text and "held-out" in text and "patches" in text and "trade-off" in text
    # the frontier: one point per bound (the default bound among them), the chosen plan marked
    frontier = json.loads(json.dumps(b["frontier"]))
    bounds = [p["bound"] for p in frontier]
    assert bounds == sorted(bounds) and DEFAULT_MAX_ERROR in bounds
    assert [p["bound"] for p in frontier if p["chosen"]][0] <= DEFAULT_MAX_ERROR
    assert all(p["predicted_output_rel_l2"] <= p["bound"] + 1e-12 for p in frontier)
    macs = [p["macs_ratio"] for p in frontier]
    assert macs == sorted(macs, reverse=True)  # looser bounds never cost more MACs here
    onnx.checker.check_model(model, full_check=True)


def test_explicit_multiplier_keeps_the_uniform_paper_setting(fast_r1):
    net = mixed_net()
    calib = correlated_images(40, 6, 12, 12, seed=4)
    _, rep = decompose(net, calib=calib, multiplier=1, select="all")
    assert [layer.name for layer in rep.layers] == ["conv0", "conv1", "conv2"] and rep.budget is None
    assert fast_r1 == []  # --select all times nothing


def test_nothing_within_the_bound_is_explained_and_not_slower(fast_r1):
    net = three_layer_net()
    calib = correlated_images(30, 6, 12, 12, seed=2)
    model, rep = decompose(net, calib=calib, max_error=1e-4)
    assert rep.layers == () and rep.model.macs_after == rep.model.macs_before
    assert rep.verification.inputs == "held-out calibration samples"  # not random inputs
    assert rep.verification.worst_rel_l2() < 1e-5
    assert any("no conv can be rewritten within the output error bound" in n for n in rep.notes)
    assert all(s.reason.startswith("kept regular") for s in rep.skipped)


def test_few_images_curves_are_measured_on_held_out_patches(fast_r1, monkeypatch):
    """8 images, the last one held out. The 7 fit images excite one channel with a flat field, so
    every fit patch lies on one line and r = 1 reproduces them all: an error measured on the fit
    samples reads ~0 (the bug that let the curve promise anything). The held-out image excites
    every channel: the curve and κ must come from it."""
    import onnx_dwdecomp.pipeline as pipeline

    held = np.arange(8) == 7
    monkeypatch.setattr(pipeline, "split_holdout", lambda *args: held)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    net = conv_model(w, hw=(6, 6))  # no padding: every fit patch is a constant vector
    calib = np.zeros((8, 8, 6, 6), np.float32)
    calib[:, 0] = rng.uniform(1, 2, size=(8, 1, 1))
    calib[held] = correlated_images(1, 8, 6, 6, seed=1)
    _, rep = decompose(net, calib=calib, max_error=0.5)
    b = rep.to_dict()["budget"]
    assert rep.verification.samples == 1 and rep.verification.inputs == "held-out calibration samples"
    r1 = b["layers"][0]["curve"][1]
    # measured here: held-out 1.2 (fit samples: 4e-7 — and then a gain of ~1e3, the symptom)
    assert r1["multiplier"] == 1 and r1["predicted_error"] > 0.1, r1
    assert 0 < b["layers"][0]["probe"]["gain"] < 10


def test_cli_timing_cache_gives_the_same_bytes(tmp_path, fast_r1):
    net, data, cache = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "timings.json"
    onnx.save(mixed_net(), net)
    np.save(data, correlated_images(40, 6, 12, 12, seed=4))
    outputs = []
    for k in range(2):
        out, rep = tmp_path / f"o{k}.onnx", tmp_path / f"r{k}.json"
        assert main([str(net), "--calib", str(data), "--timing-cache", str(cache), "-o", str(out),
                     "--report", str(rep), "--quiet"]) == 0
        outputs.append((out.read_bytes(), json.loads(rep.read_text())))
    assert outputs[0][0] == outputs[1][0]
    timed = len(fast_r1)
    assert timed > 0 and json.loads(cache.read_text())["entries"]
    first, second = (r["notes"] for _, r in outputs)
    assert any("0 of" in n and "read from it" in n and "measured now and stored" in n for n in first)
    assert any(f"{timed} of {timed} conv timing(s) read from it (" in n for n in second)
    # --no-timing-cache measures afresh
    assert main([str(net), "--calib", str(data), "--no-timing-cache", "-o", str(tmp_path / "o2.onnx"),
                 "--quiet"]) == 0
    assert len(fast_r1) == 2 * timed


def test_options_are_timed_as_merged_when_the_pointwise_will_be_merged(monkeypatch):
    """Depthwise-only counterpart: conv0's new pointwise conv is merged into the 1×1 conv after
    it, so its options are timed with that 1×1 stage (12 outputs); conv2 feeds no 1×1 conv."""
    from test_budget import merge_net

    seen: dict[str, int] = {}

    def timer(config, scale=1):
        seen[config.describe()] = config.merged_channels
        return Timing(1.0, 0.5 if config.mid_channels == config.input_shape[1] else 1.0, runs=9)

    monkeypatch.setattr(latency, "ort_timer", timer)
    decompose(merge_net(), calib=correlated_images(30, 8, 10, 10, seed=2), timing_cache=False)
    by_channels = {k.split(" ")[0]: v for k, v in seen.items()}
    assert by_channels == {"8→8": 12, "12→8": 0}
    seen.clear()
    decompose(merge_net(), timing_cache=False)  # uniform data-free selection times the same way
    assert {k.split(" ")[0]: v for k, v in seen.items()} == {"8→8": 12, "12→8": 0}


def test_a_model_with_an_integer_output_plans(fast_r1):
    """Logits and their ArgMax: the class indices are compared for equality (mismatch share),
    and a κ probe that measures 0 on them leaves κ unmeasured instead of dividing by zero."""
    net = three_layer_net()
    net.graph.node.append(helper.make_node("ArgMax", ["y"], ["cls"], axis=1, keepdims=0))
    net.graph.output.append(helper.make_tensor_value_info("cls", onnx.TensorProto.INT64, ["N", 12, 12]))
    _, rep = decompose(net, calib=correlated_images(30, 6, 12, 12, seed=2))
    assert {"y", "cls"} == set(rep.verification.outputs)
    assert 0.0 <= rep.verification.outputs["cls"].feature_rel_l2 <= 1.0
    assert rep.budget["met"] is True


def test_target_latency_least_error_within_the_timed_budget(fast_r1):
    """Every conv's r = 1 form runs in 0.5 of its regular time (fake timer): a budget of 0.85 of
    the three convs' latency (3 ms → 2.55 ms) leaves room for one rewrite, the one with the
    least predicted error — the exactly separable conv0."""
    net = mixed_net()
    calib = correlated_images(40, 6, 12, 12, seed=4)
    _, rep = decompose(net, calib=calib, target_latency=0.85)
    b = rep.to_dict()["budget"]
    assert b["mode"] == "target_latency" and b["met"] is True
    assert b["latency_limit_ms"] == pytest.approx(2.55) and b["latency_ms_after"] == pytest.approx(2.5)
    assert [layer.name for layer in rep.layers] == ["conv0"]
    assert "plan --target-latency 0.85" in rep.render()
    with pytest.raises(BudgetError, match="out of reach.*0.500 of their regular latency"):
        decompose(net, calib=calib, target_latency=0.4)
    with pytest.raises(OptionError, match="drop --select all"):
        decompose(net, calib=calib, target_latency=0.5, select="all")
    with pytest.raises(OptionError, match="not --target-latency and --max-error"):
        decompose(net, calib=calib, target_latency=0.5, max_error=0.1)


def test_curve_solver_equals_separate_solves_per_multiplier():
    """The curves solve every offered r of a layer from one prepared problem (solve.GsvdProblem):
    the first offered r's error and factors are those of a separate gsvd_factors call (the
    solver's rounds); every other r's error is its sweep's, scaled by what the refinement gained at the
    first."""
    from conftest import stats_from_samples

    from onnx_dwdecomp.candidates import ConvLayer
    from onnx_dwdecomp.planning.error_model import curve_solver
    from onnx_dwdecomp.solve import SOLVER_ROUNDS as CURVE_ITER
    from onnx_dwdecomp.solve import gsvd_factors, relative_weight_error

    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    layer = ConvLayer("L", 0, "x", "y", w, b, (1, 1), (1, 1, 1, 1), (1, 1), "NOTSET")
    x = rng.standard_normal((400, 36)) @ rng.standard_normal((36, 36)) + 1.0
    stats = stats_from_samples(w, x)
    curves: dict = {}
    def measure(f):  # any deterministic measure
        return relative_weight_error(w, f.dense_weight())
    first = curve_solver(curves, {"L": [2, 1, 4]})(layer, stats, measure)
    refined = measure(gsvd_factors(w, b, stats, 2, max_iter=CURVE_ITER))
    gain = refined / measure(gsvd_factors(w, b, stats, 2, max_iter=0))
    assert curves["L"][2] == refined
    for r in (1, 4):
        assert curves["L"][r] == pytest.approx(measure(gsvd_factors(w, b, stats, r, max_iter=0)) * gain, rel=1e-12)
    np.testing.assert_array_equal(first.pointwise, gsvd_factors(w, b, stats, 2, max_iter=CURVE_ITER).pointwise)
