r"""One strategy per planning mode: what it proposes, what it takes back, what it hands back.

Every strategy is a :class:`~.planner.Planner` (the curves, the error model, the rounds, the
frontier, the report's record) that search.py drives the same way: solve what :meth:`propose`
gives, hand the round back (:meth:`take_back`: measured output error and model), until it
proposes nothing; then its ``chosen`` round, timed as a whole model where its ``check_order``
asks for it.

- :class:`MaxError` (``--max-error E``, the default with calibration data and gsvd): the least
  price with ``α·Σ s e ≤ (AIM·E)²``, then verified rounds that re-measure ``α`` (planner.py's
  module docstring, step 5); the cheapest round measured ≤ E is handed back.
- :class:`TargetMacs` (``--target-macs F``): the least predicted error with MACs ≤ ``⌊F ×``
  the input's ``⌋``; one round.
- :class:`TargetLatency` (``--target-latency F``): the least predicted error with the candidate
  convs' summed latency ≤ F × their regular latency (in whole nanoseconds); one round.
- :class:`TaskSearch` (``--eval``): the input model scored, then a bisection over the
  frontier's candidate allocations scored by the user's function (tuning.py); the fastest
  candidate within the tolerance is handed back.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..progress import say
from ..timing.model import MODEL_MIN_GAIN
from .budget import SKIP, Allocation, allocate_cost, allocate_error, uniform
from .planner import Plan, Planner
from .tuning import LADDER, MAX_EVALUATIONS, Bisection, Evaluation, Scorer, Tolerance, candidate_allocations

#: --max-error: solve + verify rounds at most (not counting a round that rewrites nothing).
MAX_ERROR_ROUNDS = 4
#: Each allocation aims at AIM × the bound (room for a prediction that is a little low).
AIM = 0.9
#: A round that meets the bound with a measured error ≥ NEAR × the bound ends the search.
NEAR = 0.8
#: Two rounds that miss the bound end the search, unless the second came closer and within
#: NEAR_MISS × the bound: then one more round.
NEAR_MISS = 1.1


class MaxError(Planner):
    """``--max-error E`` (``target``; ``default``: E is the default bound, not asked for): the
    fastest plan whose held-out output error stays ≤ E, by verified rounds. ``unplanned``: why
    no conv was offered to the plan at all (pricing.cannot_pay_reason), for the report."""

    _label = "max_error"

    def __init__(self, *, default: bool = False, unplanned: str = "", **common):
        super().__init__(**common)
        self._default = default
        self._stop = self._unplanned = unplanned
        self._alloc = allocate_error(self.curves, self._errors.error_budget(AIM * self._target), price=self._price)
        if self._alloc.error <= 0:  # the aim's margin left nothing: try what is predicted within E
            self._alloc = allocate_error(self.curves, self._errors.error_budget(self._target), price=self._price)
        if self._alloc.error > 0 and not self._pays(self._alloc):
            self._stop = self._too_slow(self._alloc, "the fastest plan predicted within the bound")
            self._alloc = uniform(self.curves, SKIP)

    def _pays(self, alloc: Allocation) -> bool:
        """Whether ``alloc`` is predicted ≥ ``MODEL_MIN_GAIN`` faster as a whole model (priced
        inside it: its savings against the profile's model time); a plan predicted slower than
        that is not solved — the whole-model check would all but surely refuse it, and solving,
        verifying and timing it costs several forward passes. True when priced by MACs."""
        if self._price != "latency" or not self._model_ms or alloc.latency_ms is None:
            return True
        return self._saving_ms(alloc) >= MODEL_MIN_GAIN * self._model_ms

    def _too_slow(self, alloc: Allocation, what: str) -> str:
        saving = self._saving_ms(alloc)
        return (f"{what} saves {saving:.3f} ms of the model's {self._model_ms:.3f} ms "
                f"({100 * saving / self._model_ms:.3g} %), less than the {100 * MODEL_MIN_GAIN:g} % "
                f"a plan must gain as a whole model: not solved")

    def take_back(self, measured: float | None, model: onnx.ModelProto | None = None) -> None:
        """Record the round just verified (worst output error ``measured``; NaN counts as a miss
        that says nothing about the scale) and allocate the next one, if any (else the reason
        is the report's ``stop_reason``)."""
        alloc = self._alloc
        self._record(alloc, measured)
        if measured is None:
            return
        hit = bool(np.isfinite(measured)) and measured <= self._target
        self._keep_if_cheapest(hit)
        nxt = self._revise(alloc, measured, hit)
        if nxt is not None:
            self._alloc, self._pending = nxt, True
            say(f"plan: output error {measured:.3g} {'≤' if hit else '>'} {self._target:g}; interaction scale "
                f"{self._errors.scale:.3g}, re-allocating (round {len(self.rounds) + 1})")

    def _revise(self, alloc: Allocation, measured: float, hit: bool) -> Allocation | None:
        """The next allocation after the round of ``alloc`` measured ``measured``; None when the
        rounds stop (``_stop`` says why)."""
        finite = bool(np.isfinite(measured))
        if alloc.error <= 0:
            # every single rewrite was measured (its probe) above the bound: nothing can fit
            self._stop = self._stop or ("no rewrite fits the bound (each layer's probe alone exceeds it)"
                                        if self.curves else "no conv has an option cheaper than the regular conv")
            return None
        self._errors.rescale(alloc, measured)
        if hit and measured >= NEAR * self._target:
            self._stop = f"measured {measured:.3g} is within [{NEAR:g}, 1] × the bound"
            return None
        solved = sum(1 for a in self._allocs if a.error > 0)
        if solved >= MAX_ERROR_ROUNDS:
            self._stop = f"round cap ({MAX_ERROR_ROUNDS} solved rounds)"
            return None
        misses = [r.measured_output_rel_l2 for r in self.rounds if r.measured_output_rel_l2 is not None]
        near_miss = finite and measured <= NEAR_MISS * self._target and len(misses) >= 2 and misses[-1] < misses[-2]
        if solved >= 2 and self._best is None and not (near_miss and solved < 3):
            self._stop = (f"no plan met the bound in {solved} rounds (measured "
                          + ", ".join(f"{m:.3g}" for m in misses)
                          + "): the predictions do not hold on these held-out samples")
            return None
        scales = [r.interaction_scale for r in self.rounds[-2:]] + [self._errors.scale]
        turned = len(scales) == 3 and (scales[1] - scales[0]) * (scales[2] - scales[1]) < 0
        if self._best is not None and solved >= 2 and turned and max(scales[1:]) > 2 * min(scales[1:]):
            self._stop = (f"the interaction scale swings ({scales[0]:.3g} → {scales[1]:.3g} → "
                          f"{scales[2]:.3g}): the cheapest plan measured within the bound is kept")
            return None
        missed_bound = 0.999 * alloc.error  # strictly below the missed round's error sum
        bound = self._errors.error_budget(AIM * self._target) if finite else missed_bound
        if not hit:
            bound = min(bound, missed_bound)
        nxt = allocate_error(self.curves, bound, price=self._price)
        if not hit and nxt.error <= 0 < allocate_error(self.curves, missed_bound, price=self._price).error:
            # the margin left nothing: try the largest plan below the missed one instead
            nxt = allocate_error(self.curves, missed_bound, price=self._price)
        if not hit and nxt.error <= 0:  # only the all-regular plan is predicted below the missed one
            self._stop = "every plan predicted below the missed one's error rewrites nothing"
            return None
        tried = {tuple(sorted(a.multipliers.items())) for a in self._allocs}
        if tuple(sorted(nxt.multipliers.items())) in tried:
            self._stop = "the re-scaled allocation is a plan already measured"
            return None
        if self._best is not None and self._cost(nxt) >= self._cost(self._allocs[self._best]):
            self._stop = "no cheaper plan is predicted within the bound"
            return None
        if not self._pays(nxt):
            self._stop = self._too_slow(nxt, "the re-allocated plan")
            return None
        return nxt

    def kept_reason(self, name: str, not_faster: bool) -> str:
        if not any(a.error > 0 for a in self._allocs) and self._stop.endswith("not solved"):
            return f"kept regular: {self._stop}"
        return super().kept_reason(name, not_faster)

    def _final(self) -> int | None:
        """The cheapest round measured within the bound; None when rounds were measured and none
        was (the caller falls back to the all-regular plan); the last one when none was measured."""
        if self._best is None and any(r.measured_output_rel_l2 is not None for r in self.rounds):
            return None
        return super()._final()

    def _hit(self, index: int) -> bool:
        r = self.rounds[index]
        return (r.measured_output_rel_l2 is not None and bool(np.isfinite(r.measured_output_rel_l2))
                and r.measured_output_rel_l2 <= self._target and not r.fallback and self._allocs[index].error > 0)

    def _own_bounds(self) -> set[float]:
        return {self._target}

    def _met(self, macs: int) -> bool | None:
        measured = self._measured()
        return None if measured is None else measured <= self._target

    def _missed(self, macs: int) -> str:
        return (f"budget NOT met after {len(self.rounds)} round(s): output rel. L2 "
                f"{self._measured():.3g} > --max-error {self._target:g}")

    def notes(self, macs: int, rewritten: bool) -> list[str]:
        """The budget missed; with nothing rewritten and no rewrite ever solved, why nothing fitted
        (the smallest predicted single rewrite against the bound); the default bound named."""
        notes = super().notes(macs, rewritten)
        if not rewritten and not any(a.error > 0 for a in self._allocs):
            if self._unplanned or self._stop.endswith("not solved"):
                notes.append(f"every conv kept regular: {self._stop}")
            elif not self.curves:
                notes.append("no candidate conv has an option that is cheaper than the regular conv")
            else:
                name, error = self._errors.smallest_single_rewrite()
                notes.append(f"no conv can be rewritten within the output error bound {self._target:g}: the "
                             f"smallest predicted output rel. L2 of a single rewrite is {error:.3g} ({name}); "
                             f"the output is not slower than the input")
        if self._default:
            notes.append(f"plan: the fastest found whose held-out output error stays ≤ {self._target:g} "
                         f"(default bound; --max-error E to change it, --multiplier R for one multiplier everywhere)")
        return notes

    def _none_met(self) -> str:
        best = min((r.measured_output_rel_l2 for r in self.rounds), default=float("nan"))
        return f"no plan tried met the output error bound {self._target:g} (best measured {best:.3g})"

    def _bound_text(self) -> str:
        return f"bound {self._target:g}"

    def to_dict(self, *args, **kwargs) -> dict:
        out = super().to_dict(*args, **kwargs)
        out["default"] = self._default
        return out


class _Budget(Planner):
    """A cost budget: one round, the least predicted error within it; not timed as a whole model."""

    def check_order(self) -> list[int]:
        return []


class TargetMacs(_Budget):
    """``--target-macs F`` (``target``): the least predicted error with the output's MACs
    ≤ ``⌊F × before_macs⌋``."""

    _label = "target_macs"

    def __init__(self, **common):
        super().__init__(**common)
        self._limit = int(np.floor(self._target * self._before))
        self._alloc = allocate_cost(self.curves, self._limit - self._fixed)

    def _met(self, macs: int) -> bool:
        return macs <= self._limit

    def _missed(self, macs: int) -> str:
        return f"budget NOT met: {macs} MACs > {self._limit} (--target-macs {self._target:g})"

    def to_dict(self, *args, **kwargs) -> dict:
        out = super().to_dict(*args, **kwargs)
        out["macs_limit"] = self._limit
        return out


class TargetLatency(_Budget):
    """``--target-latency F`` (``target``): the least predicted error with the candidate convs'
    summed latency ≤ ``⌊F × Σ regular⌋`` nanoseconds."""

    _label = "target_latency"

    def __init__(self, **common):
        super().__init__(**common)
        self._limit = int(np.floor(self._target * sum(c.option(SKIP).cost("latency") for c in self.curves)))
        self._alloc = allocate_cost(self.curves, self._limit, price="latency")

    def _met(self, macs: int) -> bool:
        return sum(c.option(self._alloc.multipliers[c.name]).cost("latency") for c in self.curves) <= self._limit

    def _missed(self, macs: int) -> str:
        return f"budget NOT met: convs' latency above --target-latency {self._target:g} of the regular convs'"

    def to_dict(self, *args, **kwargs) -> dict:
        out = super().to_dict(*args, **kwargs)
        out["latency_limit_ms"] = self._limit / 1e6
        return out


class TaskSearch(Planner):
    """``--eval``: ``score`` (tuning.Scorer) the input model ``source``, then bisect the
    frontier's candidate plans (tuning.py) with it; a plan is within ``tolerance`` when its
    score is at least the input's less the allowed drop. ``target`` is only the report's."""

    _label = "task"

    def __init__(self, *, score: Scorer, tolerance: Tolerance, source: onnx.ModelProto, **common):
        super().__init__(**common)
        self._score, self._tolerance, self._source = score, tolerance, source
        self._pending = False  # nothing is allocated before the input model is scored
        self._baseline = self._allowed = 0.0
        self._candidates: list[tuple[float, Allocation]] = []
        self._search: Bisection | None = None
        self._k = -1  # the candidate proposed last
        self._evaluations: list[Evaluation] = []

    def propose(self) -> Plan | None:
        """The input model scored first; then the next candidate of the bisection, or None."""
        if self._search is None:
            self._baseline = self._score(self._source, "the input model")
            self._allowed = self._tolerance.allowed(self._baseline)
            self._evaluations.append(Evaluation("input", self._baseline))
            self._candidates = candidate_allocations(self.curves, self._price)
            self._search = Bisection(len(self._candidates), MAX_EVALUATIONS - 1)
        k = self._search.next()
        if k is None:
            scored, n = len(self._evaluations) - 1, len(self._candidates)
            self._stop = (f"binary search over {n} candidate plans: " + (
                "none to evaluate (no rewrite is predicted within the largest bound of the ladder)" if not n else
                f"converged, {scored} evaluated" if self._search.hi - self._search.lo <= 1 else
                f"evaluation budget spent, {scored} evaluated"))
            return super().propose()
        self._k, self._alloc = k, self._candidates[k][1]
        return Plan(dict(self._alloc.multipliers))

    def take_back(self, measured: float | None, model: onnx.ModelProto) -> None:
        """Score the candidate's model; record it (``within`` the tolerance or not) and re-measure α."""
        k, n = self._k, len(self._candidates)
        value = self._score(model, f"candidate plan {k + 1} of {n}")
        within = value >= self._baseline - self._allowed
        self._search.record(k, within)
        self._record(self._alloc, measured, score=value, within=within)
        self._errors.rescale(self._alloc, measured)
        self._keep_if_cheapest(within)
        self._evaluations.append(Evaluation(
            f"candidate {k + 1}/{n}", value, round=len(self.rounds) - 1,
            convs_rewritten=sum(1 for r in self._alloc.multipliers.values() if r != SKIP), within=within,
            measured_output_rel_l2=measured))

    def _final(self) -> int | None:
        """The fastest candidate within the tolerance; None when none was."""
        return None if self._best is None else self._best

    def _hit(self, index: int) -> bool:
        return bool(self.rounds[index].within)

    def _met(self, macs: int) -> bool:
        chosen = self.rounds[self._chosen_round()] if self.rounds else None
        return chosen is not None and bool(chosen.within or chosen.fallback)

    def notes(self, macs: int, rewritten: bool) -> list[str]:
        return []

    def _none_met(self) -> str:
        return ("no candidate plan kept the score within the tolerance" if self.rounds else
                f"no candidate plan to score (no conv has a rewrite predicted within output error {LADDER[-1]:g})")

    def _bound_text(self) -> str:
        return "the score tolerance"

    def to_dict(self, *args, **kwargs) -> dict:
        out = super().to_dict(*args, **kwargs)
        out["tolerance"] = (None if self._search is None else
                            {"input_score": self._baseline, "allowed_drop": self._allowed,
                             "max_drop": self._tolerance.describe()})
        out["evaluations"] = [e.to_dict() for e in self._evaluations]
        return out
