"""After the allocation: which plan is handed back.

A planned job (planner.py) turns plans into solved, rewritten and verified models through one
callback, ``solve_round(plan) -> SolvedRound`` (the pipeline's calibrate → solve → rewrite →
verify). This module decides which plans to solve and which one to keep:

- :func:`verified_rounds` — ``--max-error``/budgets: the planner's rounds, each re-measuring the
  interaction scale (planner.BudgetPlanner.revise);
- :func:`task_search` — ``--eval``: candidate plans of the frontier scored by the user's function,
  a bisection over them (tuning.py);
- :func:`checked_choice` — the chosen plan timed as a whole model against the all-regular one
  (timing/model.py): a plan that is not faster is not handed back;
- :func:`plan_record` — what the report shows of all that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import onnx

from ..candidates import ConvLayer
from ..fold import FoldResult
from ..modelio import save_model_atomic
from ..progress import say
from ..solve import ChannelFactors, SeparableFactors
from ..timing.latency import Decision
from ..timing.model import MODEL_MIN_GAIN
from ..usercode import display_name
from ..verify import Verification
from .budget import SKIP
from .planner import BudgetPlanner, Plan
from .sensitivity import Sensitivities
from .tuning import LADDER, MAX_EVALUATIONS, Bisection, Tolerance, call_evaluate, candidate_allocations

#: Rounds that met the bound timed as whole models at most before falling back to all-regular.
MODEL_CHECKS = 2


class SolvedRound(NamedTuple):
    """One solved, rewritten and verified plan."""

    plan: Plan
    layers: list[ConvLayer]
    factors: dict[str, SeparableFactors | ChannelFactors]
    heldout_errors: dict[str, float]
    patches: dict[str, int]
    calib_report: dict | None
    model: onnx.ModelProto
    merged: FoldResult  # the pointwise merge
    verification: Verification | None

    def worst_error(self) -> float | None:
        return None if self.verification is None else self.verification.worst_error()


class PlanEvidence(NamedTuple):
    """What the planner measured besides the rounds: the per-layer probes, the whole-model
    timing of the chosen plan, the user's scores (task-aware mode)."""

    sensitivities: Sensitivities | None
    model_check: Decision | None
    evaluations: list[dict] | None
    model_threads: int = 0  # the whole-model timing's onnxruntime threads and batch
    model_batch: int = 0


SolveRound = Callable[[Plan], SolvedRound]


def verified_rounds(planner: BudgetPlanner, solve_round: SolveRound) -> list[SolvedRound]:
    """Solve the planner's plan, let it revise from the measured error, until it stops."""
    rounds: list[SolvedRound] = []
    plan: Plan | None = planner.plan()
    while plan is not None:
        rounds.append(solve_round(plan))
        plan = planner.revise(rounds[-1].worst_error())
    planner.final()
    return rounds


def task_search(planner: BudgetPlanner, solve_round: SolveRound, source: onnx.ModelProto,
                evaluate: Callable[[str], float], tolerance: Tolerance,
                add_time: Callable[[str, float], None]) -> tuple[list[SolvedRound], list[dict]]:
    """Score the input model, then bisect the frontier's candidate plans (tuning.py) with the
    user's ``evaluate``: each candidate is solved, written to a private temporary folder and
    scored. Returns the solved rounds and every score, in call order."""
    name = display_name(evaluate)
    evaluations: list[dict] = []
    rounds: list[SolvedRound] = []
    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_eval_") as tmp:
        def score(model: onnx.ModelProto, what: str) -> float:
            path = save_model_atomic(model, os.path.join(tmp, f"candidate{len(evaluations)}.onnx"),
                                     external_data=False)
            say(f"plan: scoring {what} with {name}")
            t0 = time.perf_counter()
            value = call_evaluate(evaluate, str(path), name, what)
            add_time("evaluate", time.perf_counter() - t0)
            for leftover in os.listdir(tmp):  # the model, and whatever evaluate wrote beside it
                where = os.path.join(tmp, leftover)
                if os.path.isdir(where) and not os.path.islink(where):
                    shutil.rmtree(where)
                else:
                    os.remove(where)
            return value

        baseline = score(source, "the input model")
        allowed = tolerance.allowed(baseline)
        planner.set_tolerance(baseline, allowed, tolerance.describe())
        evaluations.append({"model": "input", "score": baseline})
        candidates = candidate_allocations(planner.curves, planner.price)
        search = Bisection(len(candidates), MAX_EVALUATIONS - 1)
        while (k := search.next()) is not None:
            planner.allocation = candidates[k][1]
            rnd = solve_round(planner.plan())
            value = score(rnd.model, f"candidate plan {k + 1} of {len(candidates)}")
            within = value >= baseline - allowed
            search.record(k, within)
            planner.record_scored(candidates[k][1], rnd.worst_error(), value, within)
            evaluations.append({"model": f"candidate {k + 1}/{len(candidates)}", "round": len(rounds),
                                "convs_rewritten": len(rnd.layers), "score": value, "within": within,
                                "measured_output_rel_l2": rnd.worst_error()})
            rounds.append(rnd)
    scored = len(evaluations) - 1
    planner.stop_reason = (f"binary search over {len(candidates)} candidate plans: " + (
        "none to evaluate (no rewrite is predicted within the largest bound of the ladder)" if not candidates else
        f"converged, {scored} evaluated" if search.hi - search.lo <= 1 else
        f"evaluation budget spent, {scored} evaluated"))
    planner.final()
    return rounds, evaluations


def checked_choice(planner: BudgetPlanner, rounds: list[SolvedRound], solve_round: SolveRound,
                   time_model: Callable[[onnx.ModelProto], Decision], notes: list[str]
                   ) -> tuple[SolvedRound, Decision | None]:
    """The planner's chosen round (``planner.chosen_round`` after ``final()``; none met the
    bound or tolerance → the all-regular plan), checked as a whole model when the options were
    priced by latency: a plan whose model ``time_model`` does not find faster than the
    all-regular one is not handed back — the next cheapest round that met the bound is tried
    (``MODEL_CHECKS`` in all), then the all-regular plan. Notes say why."""
    def fall_back(reason: str) -> SolvedRound:
        regular = solve_round(Plan({c.name: SKIP for c in planner.curves}))
        planner.fall_back(regular.worst_error(), reason)
        notes.append(reason + "; every conv kept regular")
        return regular

    index = planner.chosen_index
    if index is None:  # no round met the bound / the tolerance: the all-regular plan (output = input)
        if planner.mode == "task":
            return fall_back("no candidate plan kept the score within the tolerance" if planner.rounds else
                             "no candidate plan to score (no conv has a rewrite predicted within output error "
                             f"{LADDER[-1]:g})"), None
        if planner.mode == "max_error":
            best = min((r.worst_error() for r in rounds), default=float("nan"))
            return fall_back(f"no plan tried met the output error bound {planner.target:g} "
                             f"(best measured {best:.3g})"), None
        index = len(rounds) - 1
    chosen = rounds[index]
    if planner.price != "latency" or not chosen.layers or planner.mode not in ("max_error", "task"):
        return chosen, None
    decision = None
    for k in ([index] + [k for k in planner.hits() if k != index])[:MODEL_CHECKS]:
        say(f"plan: timing the plan of round {k + 1} against the all-regular model")
        decision = time_model(rounds[k].model)
        if decision.timing is not None:
            t = decision.timing
            planner.calibrate_latency(t.regular_ms)
        if decision.rewrite:
            if k != index:
                notes.append(f"the cheapest plan (round {index + 1}) was not faster as a whole model; "
                             f"round {k + 1}'s plan is")
            planner.choose(k)
            return rounds[k], decision
    t = decision.timing if decision is not None else None
    ratio = f" (×{t.ratio:.3f} of the all-regular model's latency)" if t is not None else ""
    return fall_back(f"no plan that met the bound ran ≥ {100 * MODEL_MIN_GAIN:g} % faster than the all-regular "
                     f"model as a whole{ratio}"), decision


def plan_record(planner: BudgetPlanner, evidence: PlanEvidence, macs: int, measured_errors: dict[str, float],
                patches: dict[str, int]) -> dict:
    """The plan's part of the report: planner.to_dict plus the probes, the whole-model timing,
    the frontier and the user's scores."""
    budget = planner.to_dict(macs, measured_errors, patches)
    probes = evidence.sensitivities
    if probes is not None:
        budget["probes"] = {"count": len(probes.probes), "samples": probes.samples}  # time: timing_s
        for layer in budget["layers"]:
            p = probes.probes.get(layer["name"])
            if p is not None:
                layer["probe"] = {"multiplier": p.multiplier, "layer_error": p.layer_error,
                                  "output_error": p.output_error, "gain": p.gain}
    check = evidence.model_check
    if check is not None and check.timing is not None:
        t = check.timing
        budget["model_latency"] = {"regular_ms": t.regular_ms, "plan_ms": t.separable_ms, "ratio": t.ratio,
                                   "ratio_halfwidth": t.ratio_halfwidth, "runs": t.runs, "retimes": t.retimes,
                                   "cached": t.cached, "faster": check.rewrite, "reason": check.reason,
                                   "threads": evidence.model_threads, "batch": evidence.model_batch,
                                   "clock": t.clock, "loaded": t.loaded, "contention": round(t.contention, 3),
                                   "load_average": round(t.load_average, 2), "how": t.load_text()}
    budget["frontier"] = planner.frontier()
    budget["evaluations"] = evidence.evaluations
    return budget
