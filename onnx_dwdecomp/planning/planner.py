r"""Plans: what each candidate conv becomes (kept regular, or decomposed at a depth multiplier r).

A plan is a value passed between the stages of :func:`onnx_dwdecomp.decompose`:
choose plan → solve → rewrite → verify → revise plan. Two planners:

- uniform (``--multiplier R``, or without calibration data): every selected conv at R, one round;
- budgeted (``--max-error E``, ``--target-macs F``, ``--target-latency F``, and with
  calibration data and gsvd the *default*: ``--max-error`` at ``options.DEFAULT_MAX_ERROR``): each
  conv gets its own option, chosen by budget.py's knapsack from per-layer error curves and
  option prices.

The budgeted planner
--------------------
1. **Prices** (pricing.py): every offered option's exact MACs and, with ``price="latency"``
   (``--select latency``, the default), its onnxruntime latency at its real shape.
2. **Error curves.** One calibration pass over the *original* network (symmetric statistics);
   for each offered r, the relative response error ``e_l(r)`` of the GSVD solution measured on
   the **held-out** samples' patches — not on the fit samples, which a rank-deficient fit (few
   images, large ``C·k²``) reproduces perfectly. The first offered r is solved like the final
   solve (the same L-BFGS rounds, ``solver_rounds``), the others by the sweep scaled by what the refinement
   gained at the first (:func:`curve_solver`).
3. **Sensitivities** (sensitivity.py). Each layer rewritten alone at its first offered option
   (the curve pass's factors), on the held-out calibration samples: ``s_l = ε_l² / e_l``. A
   plan's output error is predicted as ``ε² ≈ α·Σ s_l e_l(r_l)``, the interaction scale ``α``
   starting at 1.
4. **Allocation** (budget.py, each layer's error weighted by ``s_l``): ``--max-error E``: least
   price with ``α·Σ s e ≤ (AIM·E)²`` (``E²`` when the aim leaves nothing to rewrite);
   ``--eval``: the candidates of tuning.py, scored by the user's function; ``--target-macs``:
   least predicted error with MACs ≤ F × the input's; ``--target-latency``: least predicted
   error with the candidate convs' summed latency ≤ F × their regular latency.
5. **Rounds** (``--max-error``; search.py drives them): the chosen plan is solved the normal
   way (asymmetric, in graph order), rewritten and verified on the held-out samples; ``α`` is re-measured from the round,
   ``α = measured² / Σ s e`` (the sensitivities stay: the rounds correct the interaction, never
   reset to a model-wide guess); a miss re-allocates strictly below the missed error sum, a hit
   more than ``NEAR`` below the bound re-allocates looser when that is cheaper than the best
   hit so far. The rounds stop at a hit within ``[NEAR, 1] × E``, at a plan already measured,
   when nothing cheaper (after a miss: nothing that rewrites a conv) is predicted, after two
   misses (the predictions do not hold; one more round when the second came closer and within
   ``NEAR_MISS × E``), when ``α`` turns and changes more than 2× (it oscillates: the cheapest
   hit is kept), or after ``MAX_ERROR_ROUNDS`` solved rounds. The result is the cheapest round that met the bound, else the all-regular plan (the output then equals
   the input: the tool never hands back a plan it measured outside the bound).
6. **Frontier.** From the same curves, sensitivities, ``α`` and prices, what the bounds of
   ``FRONTIER_BOUNDS`` would give (:meth:`BudgetPlanner.frontier`), for the report and ``--plot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..candidates import ConvLayer
from ..progress import say
from .budget import SKIP, Allocation, LayerCurve, allocate_cost, allocate_error, reachable_macs, uniform
from .error_model import ErrorModel

#: --max-error: solve + verify rounds at most (not counting a round that rewrites nothing).
MAX_ERROR_ROUNDS = 4
#: Each allocation aims at AIM × the bound (room for a prediction that is a little low).
AIM = 0.9
#: A round that meets the bound with a measured error ≥ NEAR × the bound ends the search.
NEAR = 0.8
#: Two rounds that miss the bound end the search, unless the second came closer and within
#: NEAR_MISS × the bound: then one more round.
NEAR_MISS = 1.1
#: Output error bounds the report's trade-off table (and --plot) shows.
FRONTIER_BOUNDS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class RoundRecord:
    """One round of the planner: the plan allocated (``multipliers``, ``"skip"`` = regular), what
    was predicted for it with the interaction scale it was allocated with, what was measured; in
    task-aware mode the user's ``score`` and whether it is ``within`` the tolerance; the
    all-regular ``fallback`` and its ``reason``. The report's JSON is :meth:`to_dict`."""

    multipliers: dict[str, int | str]
    predicted_macs: int
    predicted_latency_ms: float | None
    predicted_error_sum: float
    interaction_scale: float
    predicted_output_rel_l2: float
    measured_output_rel_l2: float | None
    score: float | None = None
    within: bool | None = None
    fallback: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("multipliers", "predicted_macs", "predicted_latency_ms",
                                              "predicted_error_sum", "interaction_scale",
                                              "predicted_output_rel_l2", "measured_output_rel_l2")}
        if self.within is not None:
            out.update(score=self.score, within=self.within)
        if self.fallback:
            out.update(fallback=True, reason=self.reason)
        return out


@dataclass(frozen=True)
class Plan:
    """What each candidate conv becomes: ``multipliers[name]`` is its depth multiplier, or ``SKIP``."""

    multipliers: dict[str, int]

    def rewritten(self, layers: list[ConvLayer]) -> list[ConvLayer]:
        return [layer for layer in layers if self.multipliers.get(layer.name, SKIP) != SKIP]


# ---------------------------------------------------------------------------------- planner

class BudgetPlanner:
    """Curves, allocation and the --max-error rounds of one decompose call (module docstring).

    ``curves[l].weight`` is layer ``l``'s sensitivity ``s_l`` (sensitivity.py); a plan's output
    error is predicted by ``errors`` (error_model.ErrorModel: ``√(α · Σ s_l e_l)``, α starting
    at 1 and re-measured by every verified round).
    """

    def __init__(self, *, mode: str, target: float, price: str, curves: list[LayerCurve], fixed_macs: int,
                 before_macs: int, default: bool = False, scale: float = 1.0, model_ms: float | None = None):
        self.mode, self.target, self.price, self.default = mode, target, price, default
        self.curves = curves
        self.errors = ErrorModel(curves, scale)
        self.fixed = fixed_macs
        self.before = before_macs
        self.rounds: list[RoundRecord] = []
        self._allocations: list[Allocation] = []
        self._best: int | None = None  # index of the cheapest round that met --max-error
        self.chosen_round = 0
        self.chosen_index: int | None = None  # set by final(): the chosen round, None = none met the bound
        self.stop_reason = ""
        if mode == "target_macs":
            self.limit = int(np.floor(target * before_macs))
            self.allocation = allocate_cost(curves, self.limit - fixed_macs)
            self.bound = None
        elif mode == "target_latency":  # the candidate convs' summed latency, in nanoseconds
            self.limit = int(np.floor(target * sum(c.option(SKIP).cost("latency") for c in curves)))
            self.allocation = allocate_cost(curves, self.limit, price="latency")
            self.bound = None
        elif mode == "task":  # tuning.py drives the candidates; nothing allocated yet
            self.limit = self.bound = None
            self.allocation = uniform(curves, SKIP)
        else:
            self.limit = None
            self.bound = self.errors.error_budget(AIM * target)
            self.allocation = allocate_error(curves, self.bound, price=price)
            if self.allocation.error <= 0:  # the aim's margin left nothing: try what is predicted within E
                self.bound = self.errors.error_budget(target)
                self.allocation = allocate_error(curves, self.bound, price=price)
        self.tolerance: dict | None = None  # task mode: the input's score and the allowed drop
        # whole-model latency of the all-regular model: the profile's (pricing.in_model_latencies),
        # then the whole-model check's (timing/model.py)
        self.model_ms: float | None = model_ms

    @property
    def scale(self) -> float:
        """The interaction scale α of the error model."""
        return self.errors.scale

    def plan(self) -> Plan:
        return Plan(dict(self.allocation.multipliers))

    def predicted(self, alloc: Allocation | None = None) -> float:
        """Predicted output error of an allocation (default: the current one)."""
        return self.errors.predict(alloc or self.allocation)

    def _cost(self, alloc: Allocation) -> float:
        return alloc.macs if self.price == "macs" else alloc.latency_ms

    def record(self, alloc: Allocation, measured: float | None, **extra) -> None:
        """Append the round of ``alloc`` (``extra``: RoundRecord's score, within, fallback, reason)."""
        self.rounds.append(RoundRecord({k: _r(v) for k, v in alloc.multipliers.items()}, self.fixed + alloc.macs,
                                       alloc.latency_ms, alloc.error, self.scale, self.predicted(alloc), measured,
                                       **extra))
        self._allocations.append(alloc)

    def revise(self, measured: float | None) -> Plan | None:
        """Record the round just verified (worst output error ``measured``; NaN counts as a miss
        that says nothing about the scale); the next plan, or None (``stop_reason`` says why)."""
        alloc = self.allocation
        self.record(alloc, measured)
        if self.mode != "max_error" or measured is None:
            return None
        finite = bool(np.isfinite(measured))
        hit = finite and measured <= self.target
        if hit and (self._best is None or self._cost(alloc) < self._cost(self._allocations[self._best])):
            self._best = len(self._allocations) - 1
        if alloc.error <= 0:
            # every single rewrite was measured (its probe) above the bound: nothing can fit
            self.stop_reason = ("no rewrite fits the bound (each layer's probe alone exceeds it)" if self.curves else
                                "no conv has an option cheaper than the regular conv")
            return None
        self.errors.rescale(alloc, measured)
        if hit and measured >= NEAR * self.target:
            self.stop_reason = f"measured {measured:.3g} is within [{NEAR:g}, 1] × the bound"
            return None
        solved = sum(1 for a in self._allocations if a.error > 0)
        if solved >= MAX_ERROR_ROUNDS:
            self.stop_reason = f"round cap ({MAX_ERROR_ROUNDS} solved rounds)"
            return None
        misses = [r.measured_output_rel_l2 for r in self.rounds if r.measured_output_rel_l2 is not None]
        near_miss = finite and measured <= NEAR_MISS * self.target and len(misses) >= 2 and misses[-1] < misses[-2]
        if solved >= 2 and self._best is None and not (near_miss and solved < 3):
            self.stop_reason = (f"no plan met the bound in {solved} rounds (measured "
                                + ", ".join(f"{m:.3g}" for m in misses)
                                + "): the predictions do not hold on these held-out samples")
            return None
        scales = [r.interaction_scale for r in self.rounds[-2:]] + [self.scale]
        turned = len(scales) == 3 and (scales[1] - scales[0]) * (scales[2] - scales[1]) < 0
        if self._best is not None and solved >= 2 and turned and max(scales[1:]) > 2 * min(scales[1:]):
            self.stop_reason = (f"the interaction scale swings ({scales[0]:.3g} → {scales[1]:.3g} → "
                                f"{scales[2]:.3g}): the cheapest plan measured within the bound is kept")
            return None
        missed_bound = 0.999 * alloc.error  # strictly below the missed round's error sum
        self.bound = self.errors.error_budget(AIM * self.target) if finite else missed_bound
        if not hit:
            self.bound = min(self.bound, missed_bound)
        nxt = allocate_error(self.curves, self.bound, price=self.price)
        if not hit and nxt.error <= 0 < allocate_error(self.curves, missed_bound, price=self.price).error:
            # the margin left nothing: try the largest plan below the missed one instead
            self.bound = missed_bound
            nxt = allocate_error(self.curves, self.bound, price=self.price)
        if not hit and nxt.error <= 0:  # only the all-regular plan is predicted below the missed one
            self.stop_reason = "every plan predicted below the missed one's error rewrites nothing"
            return None
        tried = {tuple(sorted(a.multipliers.items())) for a in self._allocations}
        if tuple(sorted(nxt.multipliers.items())) in tried:
            self.stop_reason = "the re-scaled allocation is a plan already measured"
            return None
        if self._best is not None and self._cost(nxt) >= self._cost(self._allocations[self._best]):
            self.stop_reason = "no cheaper plan is predicted within the bound"
            return None
        self.allocation = nxt
        say(f"plan: output error {measured:.3g} {'≤' if hit else '>'} {self.target:g}; interaction scale "
            f"{self.scale:.3g}, re-allocating (round {len(self.rounds) + 1})")
        return self.plan()

    def calibrate_latency(self, regular_ms: float) -> None:
        """The all-regular model measured ``regular_ms`` as a whole model (timing/model.py): the
        time the frontier's model latency ratios are taken against when the options were not
        priced inside the model. Priced inside it, the profile's own model time stays the
        reference: the savings were measured on its scale (ddddocr-det: profile 51 ms, a later
        whole-model timing 69 ms — mixing them put the prediction 0.030 off instead of 0.005)."""
        if self.model_ms is None:
            self.model_ms = regular_ms

    def set_tolerance(self, baseline: float, allowed: float, text: str) -> None:
        self.tolerance = {"input_score": baseline, "allowed_drop": allowed, "max_drop": text}

    def record_scored(self, alloc: Allocation, measured: float | None, score: float, within: bool) -> None:
        """Task mode: record a scored candidate (``within`` the tolerance or not) and re-measure α."""
        self.record(alloc, measured, score=score, within=within)
        self.errors.rescale(alloc, measured)
        if within and (self._best is None or self._cost(alloc) < self._cost(self._allocations[self._best])):
            self._best = len(self._allocations) - 1

    def final(self) -> int | None:
        """Index of the chosen round: the cheapest that met --max-error, else the last one (target
        MACs); None when no round met --max-error (the caller falls back to the all-regular plan)."""
        self.chosen_index = None
        if self.mode == "task" and self._best is None:
            return None
        if self.mode == "max_error" and self._best is None and any(
                r.measured_output_rel_l2 is not None for r in self.rounds):
            return None
        index = len(self._allocations) - 1 if self._best is None else self._best
        self.choose(index)
        return index

    def choose(self, index: int) -> None:
        self.chosen_round = self.chosen_index = index
        self.allocation = self._allocations[index]

    def hits(self) -> list[int]:
        """Rounds that met the bound, cheapest first."""
        if self.mode == "task":
            met = [k for k, r in enumerate(self.rounds) if r.within]
        else:
            met = [k for k, r in enumerate(self.rounds) if r.measured_output_rel_l2 is not None
                   and np.isfinite(r.measured_output_rel_l2) and r.measured_output_rel_l2 <= self.target
                   and not r.fallback and self._allocations[k].error > 0]
        return sorted(met, key=lambda k: self._cost(self._allocations[k]))

    def fall_back(self, measured: float | None, reason: str = "") -> Plan:
        """Make the all-regular plan the chosen round (no round met --max-error, or the chosen
        plan was not faster); ``measured`` is its verified output error (round-off)."""
        self.allocation = uniform(self.curves, SKIP)
        self.record(self.allocation, measured, fallback=True, reason=reason)
        self.chosen_round = len(self.rounds) - 1
        return self.plan()

    def measured(self) -> float | None:
        return self.rounds[self.chosen_round].measured_output_rel_l2 if self.rounds else None

    def met(self, macs: int) -> bool | None:
        if self.mode == "target_macs":
            return macs <= self.limit
        if self.mode == "target_latency":
            return sum(c.option(self.allocation.multipliers[c.name]).cost("latency") for c in self.curves) <= self.limit
        if self.mode == "task":
            chosen = self.rounds[self.chosen_round] if self.rounds else None
            return chosen is not None and bool(chosen.within or chosen.fallback)
        measured = self.measured()
        return None if measured is None else measured <= self.target

    def notes(self, macs: int) -> list[str]:
        if self.met(macs) is not False:
            return []
        if self.mode == "target_macs":
            return [f"budget NOT met: {macs} MACs > {self.limit} (--target-macs {self.target:g})"]
        if self.mode == "target_latency":
            return [f"budget NOT met: convs' latency above --target-latency {self.target:g} of the regular convs'"]
        if self.mode == "task":
            return []
        return [f"budget NOT met after {len(self.rounds)} round(s): output rel. L2 "
                f"{self.measured():.3g} > --max-error {self.target:g}"]

    def tried_a_rewrite(self) -> bool:
        """Whether some round solved a plan that rewrites a conv (else nothing fitted the bound)."""
        return any(a.error > 0 for a in self._allocations)

    def why_nothing(self) -> str:
        """Why a plan that rewrites nothing was chosen (for the report)."""
        if not self.curves:
            return "no candidate conv has an option that is cheaper than the regular conv"
        name, error = self.errors.smallest_single_rewrite()
        return (f"no conv can be rewritten within the output error bound {self.target:g}: the smallest "
                f"predicted output rel. L2 of a single rewrite is {error:.3g} ({name}); "
                f"the output is not slower than the input")

    def frontier(self, bounds: tuple[float, ...] = FRONTIER_BOUNDS) -> list[dict]:
        """What other output error bounds would give with the current sensitivities and scale:
        per bound the allocation's predicted output error, MACs, convs' latency and, priced
        inside the model, the predicted model latency ratio ``1 − (Σ regular − Σ chosen) / t_model``
        (:meth:`calibrate_latency`)."""
        regular_ms = sum(c.option(SKIP).latency_ms or 0.0 for c in self.curves) if self.price == "latency" else None
        chosen = self.allocation.multipliers
        plans = [(bound, allocate_error(self.curves, self.errors.error_budget(bound), price=self.price) if self.curves
                  else uniform(self.curves, SKIP))
                 for bound in sorted(set(bounds) | ({self.target} if self.mode == "max_error" else set()))]
        if self.curves and not any(alloc.multipliers == chosen for _, alloc in plans):
            # the plan handed back (allocated below the bound, or by another round's scale) is
            # a row of its own, between the bounds its predicted error falls in
            plans.append((None, self.allocation))
            plans.sort(key=lambda p: (self.predicted(p[1]), p[0] is not None))
        points = []
        for bound, alloc in plans:
            point = {"bound": bound, "predicted_output_rel_l2": self.predicted(alloc),
                     "macs": self.fixed + alloc.macs, "macs_ratio": (self.fixed + alloc.macs) / max(self.before, 1),
                     "convs_rewritten": sum(1 for r in alloc.multipliers.values() if r != SKIP),
                     "latency_ms": alloc.latency_ms, "model_latency_ratio": None,
                     "multipliers": {k: _r(v) for k, v in alloc.multipliers.items()},
                     "chosen": alloc.multipliers == chosen and not any(p["chosen"] for p in points)}
            if self.model_ms and alloc.latency_ms is not None:
                point["model_latency_ratio"] = max(self.model_ms - (regular_ms - alloc.latency_ms), 0.0) / self.model_ms
            points.append(point)
        return points

    def to_dict(self, macs: int, measured_errors: dict[str, float], patches: dict[str, int]) -> dict:
        chosen = self.allocation.multipliers
        scale = self.rounds[self.chosen_round].interaction_scale if self.rounds else self.scale
        lo, hi = reachable_macs(self.curves)
        regular_ms = [c.option(SKIP).latency_ms for c in self.curves]
        return {
            "mode": self.mode,
            "default": self.default,
            "target": self.target,
            "price": self.price,
            "macs_limit": self.limit if self.mode == "target_macs" else None,
            "latency_limit_ms": self.limit / 1e6 if self.mode == "target_latency" else None,
            "original_macs": self.before,
            "reachable_macs": [self.fixed + lo, self.fixed + hi],
            "predicted_macs": self.fixed + self.allocation.macs,
            "macs": macs,
            "latency_ms_before": None if self.price == "macs" else float(sum(regular_ms)),
            "latency_ms_after": self.allocation.latency_ms,
            "predicted_error_sum": self.allocation.error,
            "interaction_scale": scale,  # the α the chosen round was allocated with
            "predicted_output_rel_l2": float(np.sqrt(scale * self.allocation.error)),
            "measured_output_rel_l2": self.measured(),
            "met": self.met(macs),
            "exact": self.allocation.exact,
            "stop_reason": self.stop_reason,
            "tolerance": self.tolerance,
            "model_ms": self.model_ms,
            "curve": "symmetric statistics of the original network, GSVD (first offered r refined like the "
                     "final solve, the others scaled from their sweep), relative response error on the held-out "
                     "samples",
            "rounds": [r.to_dict() for r in self.rounds],
            "chosen_round": self.chosen_round,
            "layers": [{
                "name": c.name,
                "multiplier": _r(chosen[c.name]),
                "sensitivity": c.weight,
                "predicted_error": c.option(chosen[c.name]).error,
                "measured_error": measured_errors.get(c.name, 0.0 if chosen[c.name] == SKIP else None),
                "predicted_output_share": float(np.sqrt(scale * c.weight * c.option(chosen[c.name]).error)),
                "macs": c.option(chosen[c.name]).macs,
                "latency_ms": c.option(chosen[c.name]).latency_ms,
                "regular_ms": c.option(SKIP).latency_ms,
                "patches": patches.get(c.name),
                "curve": [{"multiplier": _r(o.multiplier), "macs": o.macs, "latency_ms": o.latency_ms,
                           "predicted_error": o.error} for o in c.options],
            } for c in self.curves],
        }


def _r(multiplier: int) -> int | str:
    return "skip" if multiplier == SKIP else multiplier


def kept_reason(planner: BudgetPlanner, name: str, not_faster: bool) -> str:
    """Why the plan left conv ``name`` regular, in its own numbers: its cheapest rewrite's
    predicted output error (``√(α·s·e)``, its share alone) against the bound and what that
    rewrite would save; ``not_faster``: the plans that rewrote it were not faster as a model."""
    if not_faster:
        return "kept regular: no plan that met the bound was ≥ 2 % faster as a whole model"
    curve = next((c for c in planner.curves if c.name == name), None)
    offered = [] if curve is None else [o for o in curve.options if o.multiplier != SKIP]
    if not offered:
        return "kept regular: no option cheaper than the regular conv"
    cheapest = min(offered, key=lambda o: curve.weight * o.error)
    share = planner.errors.alone(curve, cheapest)
    regular = curve.option(SKIP)
    if regular.latency_ms is not None and cheapest.latency_ms is not None:
        saving = f"saves {regular.latency_ms - cheapest.latency_ms:.3f} ms of {regular.latency_ms:.3f} ms (per conv)"
    else:
        saving = f"saves {100 * (1 - cheapest.macs / max(regular.macs, 1)):.0f} % of its MACs"
    bound = ("the score tolerance" if planner.mode == "task" else
             f"bound {planner.target:g}" if planner.mode == "max_error" else "the budget")
    return (f"kept regular by the plan: r={cheapest.multiplier} alone adds ~{share:.2g} predicted output error "
            f"({bound}) and {saving}")
