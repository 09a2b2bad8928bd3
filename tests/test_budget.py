"""Tests of planning/budget.py (allocation) and of --target-macs / --max-error end to end (the
strategies on hand-made curves: test_strategies.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from conftest import correlated_images, square_net, three_layer_net
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.planning import budget
from onnx_dwdecomp.planning.budget import (
    SKIP,
    LayerCurve,
    Option,
    allocate_error,
    allocate_cost,
    reachable_macs,
)
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import BudgetError, OptionError
from onnx_dwdecomp.pipeline import decompose
from onnx_dwdecomp.planning.strategies import MAX_ERROR_ROUNDS
from onnx_dwdecomp.planning.pricing import MAX_OPTION_MACS

# ------------------------------------------------------------------------------ allocation

def synthetic_curves(layers: int, seed: int, max_r: int = 4) -> list[LayerCurve]:
    """Layers with skip (cost 9u, error 0) and r = 1..max_r (cost ~2r·u, error decaying in r)."""
    rng = np.random.default_rng(seed)
    curves = []
    for k in range(layers):
        unit = int(rng.integers(5, 40))
        scale = float(rng.uniform(0.01, 0.5))
        decay = float(rng.uniform(0.2, 0.7))
        options = [Option(SKIP, 9 * unit * 10, 0.0)]
        options += [Option(r, (2 * r + int(rng.integers(0, 2))) * unit * 10, scale * decay ** (r - 1))
                    for r in range(1, max_r + 1)]
        curves.append(LayerCurve(f"l{k}", tuple(options)))
    return curves


def brute_force(curves: list[LayerCurve]):
    """Every allocation as (macs, error, multipliers)."""
    for combo in itertools.product(*(c.options for c in curves)):
        yield (sum(o.macs for o in combo), sum(o.error for o in combo),
               {c.name: o.multiplier for c, o in zip(curves, combo)})


@pytest.mark.parametrize("seed", range(4))
def test_macs_knapsack_is_optimal_and_within_budget(seed):
    curves = synthetic_curves(5, seed)
    lo, hi = reachable_macs(curves)
    everything = list(brute_force(curves))
    for budget_macs in np.linspace(lo, hi, 9).astype(int):
        alloc = allocate_cost(curves, int(budget_macs))
        assert alloc.exact  # integer costs: gcd units, the DP is exact
        assert alloc.macs <= budget_macs
        assert (alloc.macs, alloc.error) == budget.evaluate(curves, alloc.multipliers)
        best = min(e for m, e, _ in everything if m <= budget_macs)
        assert alloc.error == pytest.approx(best, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_error_knapsack_is_optimal(seed):
    curves = synthetic_curves(5, seed)
    everything = list(brute_force(curves))
    errors = sorted({e for _, e, _ in everything})
    for bound in (errors[1], errors[len(errors) // 3], errors[len(errors) // 2], errors[-2], 0.0):
        alloc = allocate_error(curves, bound)
        assert alloc.error <= bound
        assert alloc.macs == min(m for m, e, _ in everything if e <= bound)


def test_rounded_costs_keep_the_budget():
    # resolution far below the cost span: costs are rounded up, so the budget still holds in
    # true MACs and the result is no better than the true optimum (never infeasible).
    curves = synthetic_curves(6, 7)
    lo, hi = reachable_macs(curves)
    everything = list(brute_force(curves))
    for budget_macs in np.linspace(lo, hi, 7).astype(int):
        alloc = allocate_cost(curves, int(budget_macs), resolution=16)
        assert not alloc.exact
        assert alloc.macs <= budget_macs
        assert alloc.error >= min(e for m, e, _ in everything if m <= budget_macs) - 1e-15


def test_budget_of_uniform_r2_is_no_worse_than_uniform_r2():
    for seed in range(5):
        curves = synthetic_curves(8, seed)
        uni = budget.uniform(curves, 2)
        alloc = allocate_cost(curves, uni.macs)
        assert alloc.macs <= uni.macs
        assert alloc.error <= uni.error + 1e-15
    # and strictly better when layers differ: a nearly separable layer gives its MACs away
    curves = [LayerCurve("easy", (Option(SKIP, 90, 0.0), Option(1, 20, 1e-4), Option(2, 40, 1e-5))),
              LayerCurve("hard", (Option(SKIP, 90, 0.0), Option(1, 20, 0.5), Option(2, 40, 0.3),
                                  Option(3, 60, 0.1)))]
    uni = budget.uniform(curves, 2)
    alloc = allocate_cost(curves, uni.macs)
    assert alloc.multipliers == {"easy": 1, "hard": 3} and alloc.error < uni.error


def test_allocation_errors():
    curves = synthetic_curves(3, 0)
    lo, hi = reachable_macs(curves)
    with pytest.raises(ValueError, match="below the least reachable"):
        allocate_cost(curves, lo - 1)
    assert allocate_cost(curves, hi).error == 0.0  # everything fits: all skipped
    with pytest.raises(ValueError, match="unique"):
        budget.check_curves(curves + curves[:1])
    with pytest.raises(ValueError, match="finite"):
        budget.check_curves([LayerCurve("x", (Option(SKIP, 1, float("nan")),))])


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def net():
    return three_layer_net(c=6, width=16)


@pytest.fixture(scope="module")
def calib():
    return correlated_images(40, 6, 12, 12, seed=1)


def merge_net(c: int = 8, hw: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x → Conv 3×3 (c→c) → Conv 1×1 (c→12) → Relu → Conv 3×3 (12→c) → Relu → y: the first
    conv's new pointwise conv is merged into the 1×1 (depthwise-only counterpart form)."""
    rng = np.random.default_rng(seed)
    shapes = {"w0": (c, c, 3, 3), "w1": (12, c, 1, 1), "w2": (c, 12, 3, 3)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), k)
             for k, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w1"], ["b"], name="pw"),
             helper.make_node("Relu", ["b"], ["r"], name="relu0"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu1")]
    return square_net(nodes, inits, c, hw, "merge")


def test_target_macs_end_to_end(net, calib):
    _, uni = decompose(net, calib=calib, select="all", multiplier=2, verify=False)
    fraction = uni.model.macs_after / uni.model.macs_before
    model, rep = decompose(net, calib=calib, select="all", target_macs=fraction)
    onnx.checker.check_model(model, full_check=True)
    b = rep.to_dict()["budget"]
    assert rep.model.macs_after <= fraction * rep.model.macs_before
    assert b["met"] is True and b["macs"] == rep.model.macs_after
    assert b["predicted_macs"] == b["macs"]  # option costs are exact
    chosen = {layer["name"]: layer["multiplier"] for layer in b["layers"]}
    assert set(chosen) == {"conv0", "conv1", "conv2"}
    assert {layer.name: layer.multiplier for layer in rep.layers} == {k: v for k, v in chosen.items() if v != "skip"}
    for layer in b["layers"]:
        curve = layer["curve"]
        assert curve[0]["multiplier"] == "skip" and curve[0]["predicted_error"] == 0.0
        rs = [p["multiplier"] for p in curve[1:]]
        assert rs == list(range(1, len(rs) + 1)) and len(rs) >= 1
        macs = [p["macs"] for p in curve[1:]]
        assert macs == sorted(macs) and macs[-1] <= MAX_OPTION_MACS * curve[0]["macs"]
        assert all(np.isfinite(p["predicted_error"]) for p in curve)
    # the allocation's predicted error is no worse than uniform r = 2 on the same curves
    curves = [LayerCurve(layer["name"], tuple(Option(0 if p["multiplier"] == "skip" else p["multiplier"],
                                                     p["macs"], p["predicted_error"]) for p in layer["curve"]),
                          weight=layer["sensitivity"])
              for layer in b["layers"]]
    # ... and the least sensitivity-weighted error of every allocation within the MACs limit
    limit = b["macs_limit"] - (b["original_macs"] - sum(c.option(SKIP).macs for c in curves))
    best = min(sum(c.weight * o.error for c, o in zip(curves, combo))
               for combo in itertools.product(*(c.options for c in curves)) if sum(o.macs for o in combo) <= limit)
    assert b["predicted_error_sum"] == pytest.approx(best, rel=1e-9)
    assert "plan --target-macs" in rep.render()
    json.dumps(rep.to_dict())


def test_merged_pointwise_costs_are_exact():
    net = merge_net()
    calib = correlated_images(30, 8, 10, 10, seed=2)
    _, rep = decompose(net, calib=calib, select="all", target_macs=0.6, verify=False)
    b = rep.budget
    assert len(rep.merged) == (1 if b["layers"][0]["multiplier"] != "skip" else 0)
    assert b["predicted_macs"] == rep.model.macs_after <= 0.6 * rep.model.macs_before
    # r = 1 everywhere: the merge saves the 1×1 conv's own c·12 MACs per position
    first = b["layers"][0]["curve"]
    assert first[0]["macs"] == 100 * (8 * 8 * 9 + 12 * 8)  # regular 3×3 + the 1×1 it feeds
    assert first[1]["macs"] == 100 * (8 * 9 + 12 * 8)  # depthwise + merged pointwise (12 × 8)


def test_max_error_end_to_end(net, calib):
    # single-layer probes here: ~0.35 output error at r = 2 for conv0/conv1, ~0.46–0.5 at r = 1
    _, rep = decompose(net, calib=calib, select="all", max_error=0.45)
    b = rep.budget
    assert b["mode"] == "max_error" and 1 <= len(b["rounds"]) <= MAX_ERROR_ROUNDS
    assert b["measured_output_rel_l2"] == pytest.approx(rep.verification.worst_error())
    assert b["met"] is True and rep.verification.worst_error() <= 0.45
    assert b["probes"]["count"] == 3 and all(layer["probe"]["gain"] > 0 for layer in b["layers"])
    assert rep.model.macs_after < rep.model.macs_before  # something was decomposed


@pytest.mark.parametrize("options, error, match", [
    (dict(target_macs=0.01), BudgetError, r"out of reach.*range from 0\.\d+ .*to 1"),
    (dict(target_macs=1.5), BudgetError, r"\(0, 1\]"),
    (dict(max_error=0.0), BudgetError, "must be > 0"),
    (dict(max_error=-1.0), BudgetError, "must be > 0"),
    (dict(target_macs=0.5, max_error=0.1), OptionError, "not --target-macs and --max-error"),
    (dict(target_macs=0.5, multiplier=2), OptionError, "multiplier"),
    (dict(max_error=0.1, verify=False), OptionError, "no-verify"),
])
def test_impossible_or_conflicting_budgets(net, calib, options, error, match):
    with pytest.raises(error, match=match):
        decompose(net, calib=calib, select="all", **options)


def test_budget_needs_calibration(net):
    with pytest.raises(OptionError, match="--calib"):
        decompose(net, target_macs=0.5)


def test_cli_budget_flags(tmp_path, net, calib, capsys):
    model_path, data_path = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(net, model_path)
    np.save(data_path, calib)
    assert main([str(model_path), "--calib", str(data_path), "--target-macs", "0.001", "--select", "all",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target-macs 0.001 is out of reach") and "\n" == err[-1] and err.count("\n") == 1
    assert not (tmp_path / "m.dw.onnx").exists()
    assert main([str(model_path), "--calib", str(data_path), "--target-macs", "0.5", "--max-error", "0.1"]) == 2
    assert "give one of --target-macs, --target-latency, --max-error" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main([str(model_path), "--calib", str(data_path), "--target-macs", "0.5", "--select", "all",
                 "--quiet", "--report", str(report)]) == 0
    d = json.loads(report.read_text())
    assert d["budget"]["met"] is True and d["options"]["target_macs"] == 0.5
    assert d["model"]["macs_after"] <= 0.5 * d["model"]["macs_before"]


def test_conv_that_no_multiplier_makes_cheaper_stays_regular():
    """16→2 3×3 feeding a 2→64 1×1: merged, even r = 1 costs more than regular; the budget keeps it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("W1", (2, 16, 3, 3)), ("W2", (64, 2, 1, 1)), ("W3", (64, 64, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Conv", ["a", "W2"], ["b"], name="c2"),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "W3"], ["y"], name="c3", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(20, 16, 8, 8)).astype(np.float32)
    for limit in ({"max_error": 0.5}, {"target_macs": 0.9}):
        _, report = decompose(model, calib=x, select="all", **limit)
        assert [layer.name for layer in report.layers] == ["c3"]
        assert "c1" in {s.name for s in report.skipped}
        assert report.to_dict()["budget"]["met"]
