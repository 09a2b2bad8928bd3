"""After the allocation: which plan is handed back.

A planned job (planner.py) turns plans into solved, rewritten and verified models through one
callback, ``solve_round(plan) -> SolvedRound`` (the pipeline's calibrate → solve → rewrite →
verify). The mode's strategy (strategies.py) decides which plans to solve and which one to
keep; this module drives it:

- :func:`solve_rounds` — every mode: solve what the strategy proposes, hand each round back
  (its measured output error and model: ``--max-error`` re-measures the interaction scale,
  ``--eval`` scores it with the user's function), until it proposes nothing;
- :func:`checked_choice` — the chosen plan timed as a whole model against the all-regular one
  (timing/model.py): a plan that is not faster is not handed back;
- :func:`plan_record` — what the report shows of all that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import onnx

from ..candidates import ConvLayer
from ..fold import FoldResult
from ..progress import say
from ..solve import ChannelFactors, SeparableFactors
from ..timing.latency import Decision
from ..timing.model import MODEL_MIN_GAIN
from ..verify import Verification
from .budget import SKIP
from .planner import Plan, Planner
from .sensitivity import Sensitivities

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
    timing of the chosen plan."""

    sensitivities: Sensitivities | None
    model_check: Decision | None
    model_threads: int = 0  # the whole-model timing's onnxruntime threads and batch
    model_batch: int = 0


SolveRound = Callable[[Plan], SolvedRound]


def solve_rounds(planner: Planner, solve_round: SolveRound) -> list[SolvedRound]:
    """Solve the strategy's plans, handing each round back, until it proposes nothing more."""
    rounds: list[SolvedRound] = []
    while (plan := planner.propose()) is not None:
        rounds.append(solve_round(plan))
        planner.take_back(rounds[-1].worst_error(), rounds[-1].model)
    return rounds


def checked_choice(planner: Planner, rounds: list[SolvedRound], solve_round: SolveRound,
                   time_model: Callable[[onnx.ModelProto], Decision], notes: list[str]
                   ) -> tuple[SolvedRound, Decision | None]:
    """The strategy's chosen round (none met the bound or tolerance → the all-regular plan),
    checked as a whole model where the strategy asks for it (``check_order``: options priced by
    latency, --max-error and --eval): a plan whose model ``time_model`` does not find faster than
    the all-regular one is not handed back — the next cheapest round that met the bound is tried
    (``MODEL_CHECKS`` in all), then the all-regular plan. Notes say why."""
    def fall_back(reason: str | None = None) -> SolvedRound:
        regular = solve_round(Plan({c.name: SKIP for c in planner.curves}))
        notes.append(planner.fall_back(regular.worst_error(), reason) + "; every conv kept regular")
        return regular

    index = planner.chosen
    if index is None:  # no round met the bound / the tolerance: the all-regular plan (output = input)
        return fall_back(), None
    chosen = rounds[index]
    order = planner.check_order() if chosen.layers else []
    if not order:
        return chosen, None
    decision = None
    for k in order[:MODEL_CHECKS]:
        say(f"plan: timing the plan of round {k + 1} against the all-regular model")
        decision = time_model(rounds[k].model)
        planner.take_check(k, None if decision.timing is None else decision.timing.regular_ms, decision.rewrite)
        if decision.rewrite:
            if k != index:
                notes.append(f"the cheapest plan (round {index + 1}) was not faster as a whole model; "
                             f"round {k + 1}'s plan is")
            return rounds[k], decision
    t = decision.timing if decision is not None else None
    ratio = f" (×{t.ratio:.3f} of the all-regular model's latency)" if t is not None else ""
    return fall_back(f"no plan that met the bound ran ≥ {100 * MODEL_MIN_GAIN:g} % faster than the all-regular "
                     f"model as a whole{ratio}"), decision


def plan_record(planner: Planner, evidence: PlanEvidence, macs: int, measured_errors: dict[str, float],
                patches: dict[str, int]) -> dict:
    """The plan's part of the report: the strategy's to_dict with the probes and the whole-model
    timing."""
    extra: dict = {}
    probes = evidence.sensitivities
    if probes is not None:
        extra["probes"] = {"count": len(probes.probes), "samples": probes.samples}  # time: timing_s
    check = evidence.model_check
    if check is not None and check.timing is not None:
        t = check.timing
        extra["model_latency"] = {"regular_ms": t.regular_ms, "plan_ms": t.separable_ms, "ratio": t.ratio,
                                  "ratio_halfwidth": t.ratio_halfwidth, "runs": t.runs, "retimes": t.retimes,
                                  "cached": t.cached, "faster": check.rewrite, "reason": check.reason,
                                  "threads": evidence.model_threads, "batch": evidence.model_batch,
                                  "clock": t.clock, "loaded": t.loaded, "contention": round(t.contention, 3),
                                  "load_average": round(t.load_average, 2), "how": t.load_text()}
    budget = planner.to_dict(macs, measured_errors, patches, extra)
    if probes is not None:
        for layer in budget["layers"]:
            p = probes.probes.get(layer["name"])
            if p is not None:
                layer["probe"] = {"multiplier": p.multiplier, "layer_error": p.layer_error,
                                  "output_error": p.output_error, "gain": p.gain}
    return budget
