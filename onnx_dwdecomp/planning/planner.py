r"""Plans: what each candidate conv becomes (kept regular, or decomposed at a depth multiplier r).

A plan is a value passed between the stages of :func:`onnx_dwdecomp.decompose`:
choose plan → solve → rewrite → verify → revise plan. Two kinds of plan:

- uniform (``--multiplier R``, or without calibration data): every selected conv at R, one round;
- budgeted (``--max-error E``, ``--target-macs F``, ``--target-latency F``, ``--eval``, and with
  calibration data and gsvd the *default*: ``--max-error`` at ``options.DEFAULT_MAX_ERROR``): each
  conv gets its own option, chosen by budget.py's knapsack from per-layer error curves and
  option prices. One strategy per mode (strategies.py: :class:`~.strategies.MaxError`,
  :class:`~.strategies.TargetMacs`, :class:`~.strategies.TargetLatency`,
  :class:`~.strategies.TaskSearch`) proposes the plans and takes back the solved rounds; what
  they share — the curves, the error model, the rounds, the frontier, the report's record — is
  :class:`Planner` here.

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
5. **Rounds** (``--max-error``: :class:`~.strategies.MaxError`; search.py drives them): the chosen plan is solved the normal
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
   ``FRONTIER_BOUNDS`` would give (:meth:`Planner.frontier`), for the report and ``--plot``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..candidates import ConvLayer
from .budget import SKIP, Allocation, LayerCurve, allocate_error, reachable_macs, uniform
from .error_model import ErrorModel

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
class FrontierRow:
    """One row of the trade-off table: what the output error ``bound`` (None: the plan handed
    back, allocated otherwise) gives with the current sensitivities and scale — its predicted
    output error, MACs (and their ratio to the input model's), convs rewritten, the convs'
    summed latency, the predicted model latency ratio (None unless priced inside the model), the
    ``multipliers`` and whether it is the ``chosen`` plan. The report's JSON is :meth:`to_dict`."""

    bound: float | None
    predicted_output_rel_l2: float
    macs: int
    macs_ratio: float
    convs_rewritten: int
    latency_ms: float | None
    model_latency_ratio: float | None
    multipliers: dict[str, int | str]
    chosen: bool

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Plan:
    """What each candidate conv becomes: ``multipliers[name]`` is its depth multiplier, or ``SKIP``."""

    multipliers: dict[str, int]

    def rewritten(self, layers: list[ConvLayer]) -> list[ConvLayer]:
        return [layer for layer in layers if self.multipliers.get(layer.name, SKIP) != SKIP]


# ---------------------------------------------------------------------------------- planner

class Planner:
    """What every strategy of strategies.py shares: the curves, the error model, the rounds and
    which one is chosen, the frontier, the report's record (module docstring).

    A strategy proposes plans (:meth:`propose`) and takes back each solved one
    (:meth:`take_back`: its measured output error and model) until it proposes nothing more;
    then :attr:`chosen` is the round it hands back, or None when none met its bound (the caller
    solves the all-regular plan and :meth:`fall_back`\\s to it). ``curves[l].weight`` is layer
    ``l``'s sensitivity ``s_l`` (sensitivity.py); a plan's output error is predicted by the
    error model (error_model.ErrorModel: ``√(α · Σ s_l e_l)``, α starting at 1 and re-measured
    by the rounds of the strategies that verify). ``target`` is the mode's number (the bound E,
    or the fraction F of the MACs or latency); ``price`` is ``"macs"`` or ``"latency"``.

    This base plans nothing of its own: its first plan is all-regular, one round, the last
    round chosen; the strategies override what differs.
    """

    _label = ""  # the mode, as the report's JSON names it

    def __init__(self, *, target: float, price: str, curves: list[LayerCurve], fixed_macs: int, before_macs: int,
                 scale: float = 1.0, model_ms: float | None = None):
        self.curves = curves
        self.rounds: list[RoundRecord] = []
        self._target, self._price = target, price
        self._errors = ErrorModel(curves, scale)
        self._fixed, self._before = fixed_macs, before_macs
        # whole-model latency of the all-regular model: the profile's (pricing.in_model_latencies),
        # then the whole-model check's (timing/model.py)
        self._model_ms = model_ms
        self._alloc = uniform(curves, SKIP)  # the plan proposed last, then the chosen one
        self._pending = True  # _alloc is proposed next
        self._allocs: list[Allocation] = []
        self._best: int | None = None  # index of the cheapest round that met the bound
        self._chosen: int | None = None
        self._stop = ""  # why the strategy proposed nothing more

    # --- the strategy's protocol (search.py drives it)

    def propose(self) -> Plan | None:
        """The next plan to solve; None when done (:attr:`chosen` is then set)."""
        if self._pending:
            self._pending = False
            return Plan(dict(self._alloc.multipliers))
        self._chosen = self._final()
        if self._chosen is not None:
            self._alloc = self._allocs[self._chosen]
        return None

    def take_back(self, measured: float | None, model) -> None:
        """The round of the plan just proposed, solved: ``measured`` is its verified output error
        (None: not verified), ``model`` the rewritten model."""
        self._record(self._alloc, measured)

    @property
    def chosen(self) -> int | None:
        """Index of the round handed back; None before the end, or when no round met the bound."""
        return self._chosen

    def check_order(self) -> list[int]:
        """The rounds to time as whole models (timing/model.py), in order: the chosen one, then
        the others that met the bound, cheapest first; none when the options were priced by MACs."""
        if self._price != "latency" or self._chosen is None:
            return []
        return [self._chosen] + [k for k in self._hits() if k != self._chosen]

    def take_check(self, index: int, regular_ms: float | None, faster: bool) -> None:
        """Round ``index`` was timed as a whole model: the all-regular model measured
        ``regular_ms``, the plan was ``faster`` (then it is the chosen round).

        ``regular_ms`` is the time the frontier's model latency ratios are taken against when
        the options were not priced inside the model. Priced inside it, the profile's own model
        time stays the reference: the savings were measured on its scale (ddddocr-det: profile
        51 ms, a later whole-model timing 69 ms — mixing them put the prediction 0.030 off
        instead of 0.005)."""
        if regular_ms is not None and self._model_ms is None:
            self._model_ms = regular_ms
        if faster:
            self._choose(index)

    def fall_back(self, measured: float | None, reason: str | None = None) -> str:
        """Make the all-regular plan, solved with verified output error ``measured`` (round-off),
        the chosen round: no round met the bound (``reason`` None: the strategy says why), or
        the chosen plan was not faster. Returns the reason recorded."""
        reason = self._none_met() if reason is None else reason
        self._alloc = uniform(self.curves, SKIP)
        self._record(self._alloc, measured, fallback=True, reason=reason)
        self._chosen = len(self.rounds) - 1
        return reason

    # --- what the report shows

    def frontier(self, bounds: tuple[float, ...] = FRONTIER_BOUNDS) -> list[FrontierRow]:
        """What other output error bounds would give with the current sensitivities and scale:
        per bound the allocation's predicted output error, MACs, convs' latency and, priced
        inside the model, the predicted model latency ratio ``1 − (Σ regular − Σ chosen) / t_model``
        (:meth:`take_check`)."""
        chosen = self._alloc.multipliers
        plans = [(bound, allocate_error(self.curves, self._errors.error_budget(bound), price=self._price)
                  if self.curves else uniform(self.curves, SKIP))
                 for bound in sorted(set(bounds) | self._own_bounds())]
        if self.curves and not any(alloc.multipliers == chosen for _, alloc in plans):
            # the plan handed back (allocated below the bound, or by another round's scale) is
            # a row of its own, between the bounds its predicted error falls in
            plans.append((None, self._alloc))
            plans.sort(key=lambda p: (self._errors.predict(p[1]), p[0] is not None))
        rows: list[FrontierRow] = []
        for bound, alloc in plans:
            ratio = None
            if self._model_ms and alloc.latency_ms is not None:
                ratio = max(self._model_ms - self._saving_ms(alloc), 0.0) / self._model_ms
            rows.append(FrontierRow(bound, self._errors.predict(alloc), self._fixed + alloc.macs,
                                    (self._fixed + alloc.macs) / max(self._before, 1),
                                    sum(1 for r in alloc.multipliers.values() if r != SKIP), alloc.latency_ms, ratio,
                                    {k: _r(v) for k, v in alloc.multipliers.items()},
                                    alloc.multipliers == chosen and not any(row.chosen for row in rows)))
        return rows

    def _saving_ms(self, alloc: Allocation) -> float:
        """What ``alloc`` saves inside the model (priced by latency): ``Σ regular − Σ chosen``."""
        return sum(c.option(SKIP).latency_ms or 0.0 for c in self.curves) - alloc.latency_ms

    def notes(self, macs: int, rewritten: bool) -> list[str]:
        """The report's notes on the plan: the budget missed (``macs``: the output's MACs);
        ``rewritten``: whether the chosen plan rewrites a conv."""
        return [] if self._met(macs) is not False else [self._missed(macs)]

    def kept_reason(self, name: str, not_faster: bool) -> str:
        """Why the plan left conv ``name`` regular, in its own numbers: its cheapest rewrite's
        predicted output error (``√(α·s·e)``, its share alone) against the bound and what that
        rewrite would save; ``not_faster``: the plans that rewrote it were not faster as a model."""
        if not_faster:
            return "kept regular: no plan that met the bound was ≥ 2 % faster as a whole model"
        curve = next((c for c in self.curves if c.name == name), None)
        offered = [] if curve is None else [o for o in curve.options if o.multiplier != SKIP]
        if not offered:
            return "kept regular: no option cheaper than the regular conv"
        cheapest = min(offered, key=lambda o: curve.weight * o.error)
        share = self._errors.alone(curve, cheapest)
        regular = curve.option(SKIP)
        if regular.latency_ms is not None and cheapest.latency_ms is not None:
            saving = f"saves {regular.latency_ms - cheapest.latency_ms:.3f} ms of {regular.latency_ms:.3f} ms (per conv)"
        else:
            saving = f"saves {100 * (1 - cheapest.macs / max(regular.macs, 1)):.0f} % of its MACs"
        return (f"kept regular by the plan: r={cheapest.multiplier} alone adds ~{share:.2g} predicted output error "
                f"({self._bound_text()}) and {saving}")

    def to_dict(self, macs: int, measured_errors: dict[str, float], patches: dict[str, int],
                evidence: dict | None = None) -> dict:
        """The report's ``budget``: ``macs`` of the output, each layer's ``measured_errors`` and
        ``patches`` in the chosen round; ``evidence`` (search.plan_record: the probes, the
        whole-model timing) goes between the layers and the frontier."""
        chosen = self._alloc.multipliers
        scale = self.rounds[self._chosen_round()].interaction_scale if self.rounds else self._errors.scale
        lo, hi = reachable_macs(self.curves)
        regular_ms = [c.option(SKIP).latency_ms for c in self.curves]
        return {
            "mode": self._label,
            "default": False,
            "target": self._target,
            "price": self._price,
            "macs_limit": None,
            "latency_limit_ms": None,
            "original_macs": self._before,
            "reachable_macs": [self._fixed + lo, self._fixed + hi],
            "predicted_macs": self._fixed + self._alloc.macs,
            "macs": macs,
            "latency_ms_before": None if self._price == "macs" else float(sum(regular_ms)),
            "latency_ms_after": self._alloc.latency_ms,
            "predicted_error_sum": self._alloc.error,
            "interaction_scale": scale,  # the α the chosen round was allocated with
            "predicted_output_rel_l2": float(np.sqrt(scale * self._alloc.error)),
            "measured_output_rel_l2": self._measured(),
            "met": self._met(macs),
            "exact": self._alloc.exact,
            "stop_reason": self._stop,
            "tolerance": None,
            "model_ms": self._model_ms,
            "curve": "symmetric statistics of the original network, GSVD (first offered r refined like the "
                     "final solve, the others scaled from their sweep), relative response error on the held-out "
                     "samples",
            "rounds": [r.to_dict() for r in self.rounds],
            "chosen_round": self._chosen_round(),
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
            **(evidence or {}),
            "frontier": [row.to_dict() for row in self.frontier()],
            "evaluations": None,
        }

    # --- shared by the strategies; each overrides what its mode changes

    def _record(self, alloc: Allocation, measured: float | None, **extra) -> None:
        """Append the round of ``alloc`` (``extra``: RoundRecord's score, within, fallback, reason)."""
        self.rounds.append(RoundRecord({k: _r(v) for k, v in alloc.multipliers.items()}, self._fixed + alloc.macs,
                                       alloc.latency_ms, alloc.error, self._errors.scale, self._errors.predict(alloc),
                                       measured, **extra))
        self._allocs.append(alloc)

    def _cost(self, alloc: Allocation) -> float:
        return alloc.macs if self._price == "macs" else alloc.latency_ms

    def _keep_if_cheapest(self, met: bool) -> None:
        """The round just recorded becomes the best when it ``met`` the bound more cheaply."""
        if met and (self._best is None or self._cost(self._allocs[-1]) < self._cost(self._allocs[self._best])):
            self._best = len(self._allocs) - 1

    def _final(self) -> int | None:
        """The chosen round when the strategy is done: the cheapest that met the bound, else the last."""
        return len(self._allocs) - 1 if self._best is None else self._best

    def _choose(self, index: int) -> None:
        self._chosen = index
        self._alloc = self._allocs[index]

    def _chosen_round(self) -> int:
        return 0 if self._chosen is None else self._chosen

    def _measured(self) -> float | None:
        return self.rounds[self._chosen_round()].measured_output_rel_l2 if self.rounds else None

    def _hits(self) -> list[int]:
        """Rounds that met the bound, cheapest first."""
        return sorted((k for k in range(len(self.rounds)) if self._hit(k)), key=lambda k: self._cost(self._allocs[k]))

    def _hit(self, index: int) -> bool:
        return False

    def _own_bounds(self) -> set[float]:
        """Bounds the frontier shows besides FRONTIER_BOUNDS."""
        return set()

    def _met(self, macs: int) -> bool | None:
        return None

    def _missed(self, macs: int) -> str:
        return "budget NOT met"

    def _none_met(self) -> str:
        return "no round met the bound"

    def _bound_text(self) -> str:
        return "the budget"


def _r(multiplier: int) -> int | str:
    return "skip" if multiplier == SKIP else multiplier
