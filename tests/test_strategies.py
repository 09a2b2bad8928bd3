"""planning/strategies.py: each mode's strategy on small hand-made curves — the first plan it
proposes, the rounds it takes back, the round it hands back and what it records."""

from __future__ import annotations

import numpy as np
import pytest
from test_budget import synthetic_curves

from onnx_dwdecomp.planning.budget import SKIP, LayerCurve, Option, evaluate, reachable_macs
from onnx_dwdecomp.planning.planner import Plan
from onnx_dwdecomp.planning.strategies import (MAX_ERROR_ROUNDS, NEAR, MaxError, TargetLatency, TargetMacs,
                                               TaskSearch)
from onnx_dwdecomp.planning.tuning import Tolerance, candidate_allocations


def max_error(curves, fixed=0, before=None, scale=1.0, target=0.1, **extra):
    before = fixed + reachable_macs(curves)[1] if before is None else before
    return MaxError(target=target, price="macs", curves=curves, fixed_macs=fixed, before_macs=before, scale=scale,
                    **extra)


def step(plan, measured):
    """Take back the round proposed last with output error ``measured``; the next plan, or None."""
    plan.take_back(measured, None)
    return plan.propose()


def stop_reason(plan) -> str:
    return plan.to_dict(0, {}, {})["stop_reason"]


def two_layers(**latency):
    """a: r=1 saves 800 MACs at error 0.01; b (twice as sensitive): r=1 saves 700 at 0.02."""
    lat = latency or {"a": (None, None), "b": (None, None)}
    return [LayerCurve("a", (Option(SKIP, 900, 0.0, lat["a"][0]), Option(1, 100, 0.01, lat["a"][1]))),
            LayerCurve("b", (Option(SKIP, 900, 0.0, lat["b"][0]), Option(1, 200, 0.02, lat["b"][1])), weight=2.0)]


# ------------------------------------------------------------------------------ --max-error

def test_max_error_round_tightens_after_a_miss():
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, 1000, scale=1e-3)
    assert plan.propose() is not None
    # a round whose output error is twice the bound
    assert step(plan, 0.2) is not None
    first = plan.rounds[0]
    assert first.interaction_scale == 1e-3 and first.predicted_error_sum <= (0.9 * 0.1) ** 2 / 1e-3
    # a second miss: the predictions do not hold, the search says so and stops (before: it ran
    # to the round cap, α swinging, on a model whose held-out samples were 2 images)
    assert step(plan, 0.2) is None
    second = plan.rounds[1]
    assert second.interaction_scale == pytest.approx(0.2 ** 2 / first.predicted_error_sum)
    assert second.predicted_error_sum < first.predicted_error_sum and second.predicted_macs > first.predicted_macs
    assert second.predicted_error_sum <= (0.9 * 0.1) ** 2 / second.interaction_scale
    assert len(plan.rounds) == 2 < MAX_ERROR_ROUNDS
    assert stop_reason(plan) == ("no plan met the bound in 2 rounds (measured 0.2, 0.2): the predictions do not "
                                 "hold on these held-out samples")
    assert plan.chosen is None and plan.check_order() == []  # nothing met: the caller falls back
    assert plan.fall_back(0.0) == "no plan tried met the output error bound 0.1 (best measured 0.2)"
    assert plan.chosen == 2 and plan.rounds[-1].fallback is True
    assert set(plan.rounds[-1].multipliers.values()) == {"skip"}
    record = plan.to_dict(0, {}, {})
    assert record["met"] is True and record["chosen_round"] == 2 and record["layers"][0]["multiplier"] == "skip"


def test_max_error_round_loosens_after_a_hit_and_keeps_the_cheapest_hit():
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, scale=0.1)
    first = plan.propose()
    assert any(r != SKIP for r in first.multipliers.values())
    # far below the bound: the prediction was pessimistic, the next round uses fewer MACs
    assert step(plan, 0.01) is not None
    # the looser round misses: it tightens again, but never to something dearer than the hit
    if step(plan, 0.5) is not None:
        assert plan.rounds[-1].predicted_macs < plan.rounds[0].predicted_macs
        step(plan, 0.5)
    assert plan.rounds[1].predicted_macs < plan.rounds[0].predicted_macs
    assert plan.chosen == 0 and plan.to_dict(0, {}, {})["met"] is True
    assert plan.to_dict(0, {}, {})["layers"] == max_error(curves, scale=0.1).to_dict(0, {}, {})["layers"]


def test_a_swinging_interaction_scale_keeps_the_cheapest_hit():
    """Round 1 hits far below the bound (α drops 10×), round 2 misses (α up 90×): the error
    model does not settle, the search stops with the hit instead of oscillating to the cap."""
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, scale=0.1)
    plan.propose()
    second = step(plan, 0.1 * np.sqrt(0.1))  # measured α = 0.01
    assert second is not None
    ratio = evaluate(curves, second.multipliers)[1] / plan.rounds[0].predicted_error_sum
    assert step(plan, 0.1 * np.sqrt(ratio) * 3) is None  # a miss, α 90× higher
    assert "swings" in stop_reason(plan) and plan.chosen == 0


def test_a_second_miss_that_came_close_gets_one_more_round():
    """Bound 0.1: 0.13 then 0.101 — the second miss came closer and is within 1.1 × the bound,
    so one more round is tried instead of handing back the input."""
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, 1000, scale=1e-3)
    plan.propose()
    assert step(plan, 0.13) is not None
    assert step(plan, 0.101) is not None and stop_reason(plan) == ""
    assert step(plan, 0.12) is None and "no plan met the bound in 3 rounds" in stop_reason(plan)


def test_a_monotone_interaction_scale_is_not_a_swing():
    """Two hits whose α falls both times (0.1 → α₁ → α₂ < α₁): the predictions were pessimistic
    in one direction, not oscillating; the search may go on to a looser plan."""
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, scale=0.1)
    plan.propose()
    assert step(plan, 0.03) is not None
    step(plan, 0.05)  # α: 0.1 → 0.012 → 0.0039
    assert "swings" not in stop_reason(plan)


def test_a_hit_near_the_bound_ends_the_rounds():
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, scale=0.1)
    assert any(r != SKIP for r in plan.propose().multipliers.values())
    assert step(plan, NEAR * 0.1 + 1e-6) is None
    assert "within" in stop_reason(plan) and plan.chosen == 0


def test_the_prediction_is_the_sensitivity_weighted_sum():
    """Two layers with the same curve, one 100× as sensitive: the allocation rewrites the
    insensitive one first, and the predicted output error is √(α·Σ s·e)."""
    options = (Option(SKIP, 900, 0.0), Option(1, 100, 0.01))
    curves = [LayerCurve("loud", options, weight=100.0), LayerCurve("quiet", options, weight=1.0)]
    plan = max_error(curves, target=0.5)
    assert plan.propose().multipliers == {"loud": SKIP, "quiet": 1}
    # measured 2× the prediction: α = 4, and the frontier's predictions scale with it
    step(plan, 0.2)
    assert plan.rounds[0].predicted_output_rel_l2 == pytest.approx(np.sqrt(1.0 * 0.01))
    point = next(p for p in plan.frontier() if p.bound == 0.5)
    assert point.convs_rewritten == 1 and point.predicted_output_rel_l2 == pytest.approx(0.2)


def test_an_empty_first_plan_ends_the_rounds():
    """Every layer's probe alone exceeds the bound: nothing can fit, the planner stops at once."""
    curves = [LayerCurve(f"l{k}", (Option(SKIP, 900, 0.0), Option(1, 200, e1), Option(2, 400, e2)), weight=10.0)
              for k, (e1, e2) in enumerate(((0.2, 0.05), (0.1, 0.02), (0.3, 0.1)))]
    plan = max_error(curves)
    assert all(r == SKIP for r in plan.propose().multipliers.values())
    assert step(plan, 0.0) is None
    assert "no rewrite fits" in stop_reason(plan)
    notes = plan.notes(0, rewritten=False)
    assert len(notes) == 1 and "smallest predicted output rel. L2 of a single rewrite is 0.447" in notes[0]


def test_a_nan_round_is_a_miss_that_keeps_the_scale():
    curves = synthetic_curves(5, 1)
    plan = max_error(curves, scale=1e-3)
    plan.propose()
    assert step(plan, float("nan")) is not None
    plan.take_back(0.05, None)
    first, second = plan.rounds
    assert second.interaction_scale == 1e-3  # NaN says nothing about α
    assert second.predicted_error_sum < first.predicted_error_sum  # strictly below the missed round


def test_a_margin_that_leaves_nothing_retries_below_the_missed_round():
    """Two layers; after a miss with both rewritten, 0.9·E alone would keep everything regular,
    but one of them alone may still fit: the next round tries it."""
    curves = [LayerCurve("a", (Option(SKIP, 900, 0.0), Option(1, 100, 0.10))),
              LayerCurve("b", (Option(SKIP, 900, 0.0), Option(1, 200, 0.08)))]
    plan = max_error(curves, before=1800, scale=(0.9 * 0.1) ** 2 / 0.18)  # bound admits both: Σe = 0.18
    assert plan.propose().multipliers == {"a": 1, "b": 1}
    nxt = step(plan, 0.5)  # far off: α = 0.25 / 0.18, 0.9·E → bound 0.0058
    assert nxt is not None and sum(v != SKIP for v in nxt.multipliers.values()) == 1


def test_a_rewrite_predicted_within_the_bound_but_above_the_aim_is_tried():
    """The first allocation aims at 0.9·E; when that leaves nothing but a rewrite is predicted
    within E itself (0.95·E here), that rewrite is tried: verification decides, not the margin."""
    curves = [LayerCurve("a", (Option(SKIP, 900, 0.0), Option(1, 100, (0.95 * 0.1) ** 2)))]
    plan = max_error(curves)
    assert plan.propose().multipliers == {"a": 1}
    assert step(plan, 0.096) is None and plan.chosen == 0  # near the bound: done
    assert plan.rounds[0].predicted_output_rel_l2 == pytest.approx(0.095)
    assert plan.notes(0, rewritten=False) == []  # a rewrite was tried: no "nothing fits" note


def test_a_miss_with_nothing_below_it_falls_back_without_solving_the_regular_plan():
    """The only rewrite missed the bound and nothing is predicted below it: the rounds stop
    (no round spent on the all-regular plan, whose 'hit' made the report say each probe alone
    exceeds the bound and hid the miss) and the choice goes to the fallback."""
    curves = [LayerCurve("a", (Option(SKIP, 900, 0.0), Option(1, 100, 0.005)))]
    plan = max_error(curves)
    assert plan.propose().multipliers == {"a": 1}
    assert step(plan, 0.2) is None
    assert "no rewrite fits" not in stop_reason(plan) and "missed" in stop_reason(plan)
    assert len(plan.rounds) == 1 and plan.chosen is None


def test_no_curves_stop_reason_names_the_cause():
    """No conv has an option: the stop reason must not blame the probes (there were none)."""
    plan = max_error([], fixed=500, before=500)
    assert plan.propose() == Plan({})
    assert step(plan, 0.0) is None
    assert "probe" not in stop_reason(plan) and "no conv has an option" in stop_reason(plan)
    assert plan.chosen == 0 and plan.to_dict(500, {}, {})["layers"] == []
    assert plan.notes(500, rewritten=False) == ["no candidate conv has an option that is cheaper than the regular conv"]


def test_the_default_bound_is_named_in_the_notes_and_the_record():
    plan = max_error(two_layers(), target=0.02, default=True)
    plan.propose()
    step(plan, 0.019)
    assert plan.notes(1100, rewritten=True) == [
        "plan: the fastest found whose held-out output error stays ≤ 0.02 (default bound; --max-error E to change "
        "it, --multiplier R for one multiplier everywhere)"]
    record = plan.to_dict(1100, {}, {})
    assert record["mode"] == "max_error" and record["default"] is True and record["target"] == 0.02
    assert 0.02 in [row.bound for row in plan.frontier(bounds=(0.01, 0.05))]  # the bound is a row of its own


def test_max_error_missed_note():
    plan = max_error(two_layers(), target=0.01)
    plan.propose()
    step(plan, float("nan"))  # verified, but no round met the bound: measured is the chosen round's
    plan.take_back(0.5, None)
    plan.propose()
    plan.fall_back(0.02, "made up")
    assert plan.notes(0, rewritten=False)[0] == "budget NOT met after 3 round(s): output rel. L2 0.02 > --max-error 0.01"


# ------------------------------------------------------------------------------ cost budgets

def test_target_macs_proposes_the_least_error_within_the_macs_and_stops():
    """fixed 200 + layers 1800 MACs; F = 0.6: at most 1200 in all, 1000 for the layers — a at r=1
    (1000 MACs, error 0.01) beats b at r=1 (1100 MACs) and both (error 0.05)."""
    plan = TargetMacs(target=0.6, price="macs", curves=two_layers(), fixed_macs=200, before_macs=2000)
    assert plan.propose().multipliers == {"a": 1, "b": SKIP}
    assert step(plan, 0.05) is None and plan.chosen == 0 and plan.check_order() == []
    assert plan.rounds[0].predicted_macs == 1200 and plan.rounds[0].measured_output_rel_l2 == 0.05
    record = plan.to_dict(1200, {}, {})
    assert (record["mode"], record["macs_limit"], record["latency_limit_ms"], record["met"]) == (
        "target_macs", 1200, None, True)
    assert plan.to_dict(1300, {}, {})["met"] is False
    assert plan.notes(1300, rewritten=True) == ["budget NOT met: 1300 MACs > 1200 (--target-macs 0.6)"]
    assert plan.notes(1200, rewritten=True) == []
    assert "(the budget)" in plan.kept_reason("b", not_faster=False)


def test_target_latency_proposes_the_least_error_within_the_convs_latency():
    """Regular 1 + 1 ms; F = 0.75: at most 1.5 ms — a at r=1 (1.4 ms, error 0.01) beats b at r=1
    (1.3 ms, weighted error 0.04)."""
    curves = two_layers(a=(1.0, 0.4), b=(1.0, 0.3))
    plan = TargetLatency(target=0.75, price="latency", curves=curves, fixed_macs=0, before_macs=1800)
    assert plan.propose().multipliers == {"a": 1, "b": SKIP}
    assert step(plan, 0.05) is None and plan.chosen == 0
    assert plan.check_order() == []  # priced by latency, but a budget is not timed as a whole model
    record = plan.to_dict(1000, {}, {})
    assert (record["mode"], record["macs_limit"], record["latency_limit_ms"], record["met"]) == (
        "target_latency", None, 1.5, True)
    assert record["latency_ms_before"] == 2.0 and record["latency_ms_after"] == pytest.approx(1.4)


# ------------------------------------------------------------------------------ --eval

class Scores:
    """A stand-in for tuning.Scorer: the input model scores 1.0, candidate k ``values[k]``."""

    def __init__(self, values):
        self.values, self.calls = values, []

    def __call__(self, model, what):
        self.calls.append((model, what))
        return 1.0 if model == "input" else self.values[model]


def task(values, drop=0.015):
    options = (Option(SKIP, 900, 0.0), Option(1, 100, 0.01), Option(2, 300, 0.002))
    curves = [LayerCurve("loud", options, weight=50.0), LayerCurve("quiet", options, weight=1.0)]
    score = Scores(values)
    plan = TaskSearch(score=score, tolerance=Tolerance(drop, False), source="input", target=0.02, price="macs",
                      curves=curves, fixed_macs=0, before_macs=1800)
    return plan, score, candidate_allocations(curves, "macs")


def test_task_search_scores_the_input_then_bisects_the_candidates():
    plan, score, candidates = task({})
    n = len(candidates)
    assert n >= 3
    first = plan.propose()
    assert score.calls == [("input", "the input model")]
    k = n // 2  # the bisection's first index over -1 .. n
    assert first.multipliers == candidates[k][1].multipliers
    score.values["m0"] = 0.99  # within 1.0 - 0.015
    plan.take_back(0.03, "m0")
    assert score.calls[-1] == ("m0", f"candidate plan {k + 1} of {n}")
    assert plan.rounds[0].score == 0.99 and plan.rounds[0].within is True
    while plan.propose() is not None:  # every later candidate falls outside the tolerance
        score.values[f"m{len(plan.rounds)}"] = 0.9
        plan.take_back(0.2, f"m{len(plan.rounds)}")
    assert plan.chosen == 0 and "converged" in stop_reason(plan)
    record = plan.to_dict(0, {}, {})
    assert record["mode"] == "task" and record["met"] is True
    assert record["tolerance"] == {"input_score": 1.0, "allowed_drop": 0.015, "max_drop": "0.015"}
    assert record["evaluations"][0] == {"model": "input", "score": 1.0}
    assert record["evaluations"][1] == {"model": f"candidate {k + 1}/{n}", "round": 0,
                                        "convs_rewritten": sum(r != SKIP for r in first.multipliers.values()),
                                        "score": 0.99, "within": True, "measured_output_rel_l2": 0.03}
    assert len(record["evaluations"]) == len(plan.rounds) + 1 == len(score.calls)
    assert "(the score tolerance)" in plan.kept_reason("loud", not_faster=False)
    assert plan.notes(0, rewritten=True) == []


def test_task_search_with_nothing_within_falls_back():
    plan, score, candidates = task({}, drop=0.0)
    while plan.propose() is not None:
        score.values[f"m{len(plan.rounds)}"] = 0.5
        plan.take_back(0.2, f"m{len(plan.rounds)}")
    assert plan.chosen is None and plan.check_order() == []
    assert plan.fall_back(0.0) == "no candidate plan kept the score within the tolerance"
    assert plan.to_dict(0, {}, {})["met"] is True  # the all-regular model is the input


def test_max_error_does_not_solve_a_plan_predicted_under_the_model_gain():
    """Priced inside the model, a plan whose savings come to < 2 % of the model's time is not
    solved (the whole-model check would refuse it; solving, verifying and timing it costs
    several forward passes): the first round rewrites nothing and says why, so do the kept
    convs. The same plan in a model where its savings are ≥ 2 % is proposed."""
    # both at r=1 save 0.5 ms at a predicted √(0.01 + 2·0.02) = 0.22 ≤ 0.9·0.3; a alone 0.1 ms
    curves = two_layers(a=(1.0, 0.9), b=(1.0, 0.6))

    def planner(model_ms):
        return MaxError(target=0.3, price="latency", curves=curves, fixed_macs=0, before_macs=1800, scale=1.0,
                        model_ms=model_ms)

    paying = planner(20.0).propose()
    assert paying.multipliers == {"a": 1, "b": 1}  # 0.5 ms of 20 ms: 2.5 %
    plan = planner(30.0)  # 0.5 ms of 30 ms: 1.67 %
    first = plan.propose()
    assert first.multipliers == {"a": SKIP, "b": SKIP}
    assert step(plan, 0.0) is None
    reason = ("the fastest plan predicted within the bound saves 0.500 ms of the model's 30.000 ms (1.67 %), "
              "less than the 2 % a plan must gain as a whole model: not solved")
    assert stop_reason(plan) == reason
    assert plan.kept_reason("a", False) == "kept regular: " + reason
    assert plan.notes(1800, rewritten=False)[0] == "every conv kept regular: " + reason


def test_max_error_stops_when_the_re_allocated_plan_does_not_pay():
    """After a miss (0.6: α = 0.36 / 0.05) only a fits (0.01 ≤ 0.27² / 7.2), saving 0.1 ms of 20 ms: not solved,
    the rounds stop with that reason (nothing met the bound: the caller falls back)."""
    curves = two_layers(a=(1.0, 0.9), b=(1.0, 0.6))
    plan = MaxError(target=0.3, price="latency", curves=curves, fixed_macs=0, before_macs=1800, scale=1.0,
                    model_ms=20.0)
    assert plan.propose().multipliers == {"a": 1, "b": 1}
    assert step(plan, 0.6) is None
    assert stop_reason(plan).startswith("the re-allocated plan saves 0.100 ms of the model's 20.000 ms (0.5 %)")


def test_max_error_with_nothing_offered_says_why():
    """No conv offered because none could pay (pricing.cannot_pay_reason): the one round rewrites
    nothing and the stop reason and note give that reason — not "no option cheaper than the
    regular conv", which would be false."""
    why = "rewriting every candidate at its fastest option would save 0.077 ms of the model's 18.604 ms (0.415 %)"
    plan = MaxError(target=0.02, price="latency", curves=[], fixed_macs=100, before_macs=100, model_ms=18.6,
                    unplanned=why)
    assert plan.propose().multipliers == {}
    assert step(plan, 0.0) is None
    assert stop_reason(plan) == why
    assert plan.notes(100, rewritten=False)[0] == "every conv kept regular: " + why
