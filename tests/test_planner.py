"""planning/planner.py: what the strategies share — the records and their JSON keys, the
frontier, the fallback, the whole-model check's order (the strategies: test_strategies.py)."""

from __future__ import annotations

import pytest

from onnx_dwdecomp.planning.budget import SKIP, LayerCurve, Option
from onnx_dwdecomp.planning.planner import FrontierRow, RoundRecord
from onnx_dwdecomp.planning.strategies import MaxError, TargetMacs
from onnx_dwdecomp.planning.tuning import Evaluation

ROUND_KEYS = ["multipliers", "predicted_macs", "predicted_latency_ms", "predicted_error_sum", "interaction_scale",
              "predicted_output_rel_l2", "measured_output_rel_l2"]
FRONTIER_KEYS = ["bound", "predicted_output_rel_l2", "macs", "macs_ratio", "convs_rewritten", "latency_ms",
                 "model_latency_ratio", "multipliers", "chosen"]


def test_round_record_keys():
    r = RoundRecord({"a": 1, "b": "skip"}, 1000, None, 0.01, 1.0, 0.1, 0.09)
    assert list(r.to_dict()) == ROUND_KEYS and r.to_dict()["multipliers"] == {"a": 1, "b": "skip"}
    scored = RoundRecord({"a": 1}, 1000, 0.5, 0.01, 1.0, 0.1, 0.09, score=0.98, within=False)
    assert list(scored.to_dict()) == ROUND_KEYS + ["score", "within"] and scored.to_dict()["within"] is False
    regular = RoundRecord({"a": "skip"}, 900, 1.0, 0.0, 1.0, 0.0, 0.0, fallback=True, reason="why")
    assert list(regular.to_dict()) == ROUND_KEYS + ["fallback", "reason"] and regular.to_dict()["reason"] == "why"


def test_evaluation_keys():
    assert Evaluation("input", 0.99).to_dict() == {"model": "input", "score": 0.99}
    candidate = Evaluation("candidate 2/5", 0.98, round=0, convs_rewritten=3, within=True, measured_output_rel_l2=0.02)
    assert list(candidate.to_dict()) == ["model", "round", "convs_rewritten", "score", "within",
                                         "measured_output_rel_l2"]


def three_layers():
    return [LayerCurve(f"l{k}", (Option(SKIP, 900, 0.0), Option(1, 100, e)), weight=1.0)
            for k, e in enumerate((0.004, 0.006, 0.009))]


def test_the_frontier_has_a_row_for_the_plan_handed_back():
    """The plan handed back was allocated otherwise (here: within MACs, l0 alone); when no bound
    of the table gives the same plan, it is a row of its own (bound "-"), marked."""
    curves = three_layers()
    plan = TargetMacs(target=0.71, price="macs", curves=curves, fixed_macs=0, before_macs=2700)  # ≤ 1917 MACs
    assert plan.propose().multipliers == {"l0": 1, "l1": SKIP, "l2": SKIP}
    rows = plan.frontier(bounds=(0.05, 0.1, 0.2))
    assert all(isinstance(row, FrontierRow) and list(row.to_dict()) == FRONTIER_KEYS for row in rows)
    chosen = [p for p in rows if p.chosen]
    assert len(chosen) == 1 and chosen[0].bound is None and chosen[0].convs_rewritten == 1
    assert chosen[0].macs == 1900 and chosen[0].macs_ratio == pytest.approx(1900 / 2700)
    assert chosen[0].multipliers == {"l0": 1, "l1": "skip", "l2": "skip"}
    errors = [p.predicted_output_rel_l2 for p in rows]
    assert errors == sorted(errors)


def test_the_frontier_marks_the_chosen_plan_once():
    """Nothing rewritten: several small bounds give the same all-regular plan; one row is marked."""
    curves = [LayerCurve("a", (Option(SKIP, 900, 0.0), Option(1, 100, 0.01)))]
    plan = TargetMacs(target=1.0, price="macs", curves=curves, fixed_macs=0, before_macs=900)
    assert plan.propose().multipliers == {"a": SKIP}  # the least error within 900 MACs
    rows = plan.frontier(bounds=(0.01, 0.02, 0.05, 0.2))
    assert [p.bound for p in rows if p.chosen] == [0.01]
    assert sum(p.convs_rewritten == 0 for p in rows) == 3  # 0.01, 0.02, 0.05 keep it regular (0.05² < 0.01)
    assert plan.to_dict(100, {}, {})["frontier"] == [row.to_dict() for row in plan.frontier()]


def timed_layers():
    return [LayerCurve(f"l{k}", (Option(SKIP, 900, 0.0, 1.0), Option(1, 100, e, 0.5)))
            for k, e in enumerate((0.004, 0.006, 0.009))]


def test_the_whole_model_check_order_and_its_result():
    """Priced by latency, the chosen round is timed first, then the other hits cheapest first;
    the all-regular model's time becomes the frontier's reference; a faster round is chosen."""
    plan = MaxError(target=0.1, price="latency", curves=timed_layers(), fixed_macs=0, before_macs=2700)
    plan.propose()
    plan.take_back(0.05, None)  # a hit below NEAR × the bound: a looser plan is tried
    plan.propose()
    plan.take_back(0.2, None)  # a miss
    while plan.propose() is not None:
        plan.take_back(0.2, None)
    assert plan.chosen == 0 and plan.check_order() == [0]
    assert all(row.model_latency_ratio is None for row in plan.frontier())
    plan.take_check(0, 4.0, faster=False)
    assert plan.chosen == 0
    row = next(r for r in plan.frontier() if r.chosen)
    assert row.model_latency_ratio == pytest.approx((4.0 - (3.0 - row.latency_ms)) / 4.0)
    assert plan.fall_back(0.0, "not faster") == "not faster" and plan.chosen == len(plan.rounds) - 1
    assert plan.rounds[-1].fallback and plan.rounds[-1].reason == "not faster"


def test_priced_by_macs_nothing_is_timed():
    plan = MaxError(target=0.1, price="macs", curves=timed_layers(), fixed_macs=0, before_macs=2700)
    plan.propose()
    plan.take_back(0.09, None)
    assert plan.propose() is None and plan.chosen == 0 and plan.check_order() == []


def test_kept_reason_in_the_plan_s_numbers():
    plan = MaxError(target=0.1, price="latency", curves=timed_layers(), fixed_macs=0, before_macs=2700)
    assert plan.kept_reason("l2", not_faster=False) == (
        "kept regular by the plan: r=1 alone adds ~0.095 predicted output error (bound 0.1) and saves 0.500 ms of "
        "1.000 ms (per conv)")
    assert plan.kept_reason("l2", not_faster=True).startswith("kept regular: no plan that met the bound")
    assert plan.kept_reason("other", not_faster=False) == "kept regular: no option cheaper than the regular conv"
