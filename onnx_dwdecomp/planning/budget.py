r"""Choosing each layer's depth multiplier under a MACs or an error budget — numpy only.

The problem
-----------
Layers ``l = 1..L`` each have options ``o``: *skip* (keep the regular conv: error 0, full
cost) or a depth multiplier ``r`` (cost ``c_lo``, predicted error ``e_lo``). Choose one
option per layer. The cost is the option's *price*: its MACs, or its measured onnxruntime
latency (``price="latency"``, counted in whole nanoseconds; the sum of per-conv latencies
stands for the model's, the other nodes being the same before and after).

- cost budget:  minimise ``Σ_l w_l e_lo``  subject to  ``Σ_l c_lo ≤ C``;
- error budget: minimise ``Σ_l c_lo``      subject to  ``Σ_l w_l e_lo ≤ E``.

The errors are *relative response errors* ``E‖Wx − Ŵx̂‖² / E‖Wx − E[Wx]‖²`` (squared,
scale-free). The weighted sum models each decomposed layer as injecting noise of relative power
``e_l`` into the signal it carries, reaching the output with a layer's own gain: with
independent noise sources the network output's squared relative error is about
``α·Σ w_l e_l``, where the planner sets ``w_l`` to the layer's measured sensitivity (one probe
per layer, sensitivity.py) and ``α`` corrects the interaction (planner.py, error_model.py). Weighting by a
layer's share of the response variance would be wrong here: a layer with small activations is
not less important for the output's *relative* error.

The solver
----------
Both are a multiple-choice knapsack, solved exactly by dynamic programming over costs. Each
layer's cheapest option is taken as its base; the extra costs ``c_lo − min_o c_lo`` are
counted in units of ``u``: their greatest common divisor when that gives at most
``resolution`` units in all (then the DP is exact), otherwise ``⌈range / resolution⌉`` with
every extra cost rounded *up* (then the budget still holds in true MACs, and the result is
optimal for the rounded costs: it may leave less than ``L·u`` MACs unused).
``best[j]`` = least weighted error with at most ``j`` units, over the layers so far:

    best_l[j] = min_o  best_{l−1}[j − q_lo] + w_l e_lo,        best_0[j] = 0 for j ≥ 0.

``O(L · options · units)`` work (20 layers × 9 options × 32 768 units: milliseconds); the
argmin per layer and unit is kept for the backtrack. The error budget reads the same table:
the fewest units ``j`` with ``best_L[j] ≤ E``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: ``Option.multiplier`` of "keep the regular conv".
SKIP = 0
#: Default number of cost units of the DP (see the module docstring).
RESOLUTION = 1 << 15
#: What an option costs: its MACs, or its measured latency.
PRICES = ("macs", "latency")


@dataclass(frozen=True)
class Option:
    """One choice for a layer: ``multiplier`` (``SKIP`` = keep it regular), its MACs, predicted
    error and measured latency in milliseconds (None when not timed)."""

    multiplier: int
    macs: int
    error: float
    latency_ms: float | None = None

    def cost(self, price: str) -> int:
        """The option's cost as an integer: MACs, or latency in nanoseconds."""
        if price == "macs":
            return self.macs
        if self.latency_ms is None:
            raise ValueError(f"option r={self.multiplier} has no latency to price")
        return int(round(self.latency_ms * 1e6))


@dataclass(frozen=True)
class LayerCurve:
    """A layer's options (its error-versus-MACs curve) and the weight of its error in the sum."""

    name: str
    options: tuple[Option, ...]
    weight: float = 1.0

    def option(self, multiplier: int) -> Option:
        for o in self.options:
            if o.multiplier == multiplier:
                return o
        raise KeyError(f"{self.name}: no option with multiplier {multiplier}")


@dataclass(frozen=True)
class Allocation:
    """One option per layer: ``multipliers[name]`` (``SKIP`` = regular), total MACs, weighted
    error and total latency (None unless every chosen option was timed)."""

    multipliers: dict[str, int]
    macs: int
    error: float
    exact: bool  # True when the DP ran on exact costs (gcd units), False when costs were rounded up
    latency_ms: float | None = None


def check_curves(curves: list[LayerCurve], price: str = "macs") -> None:
    """Raise ValueError on an empty option list, duplicate names, negative or non-finite values,
    or an option without a latency when pricing by latency."""
    if price not in PRICES:
        raise ValueError(f"price {price!r}: expected one of {', '.join(PRICES)}")
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    for c in curves:
        if not c.options:
            raise ValueError(f"{c.name}: no options")
        if not (math.isfinite(c.weight) and c.weight >= 0):
            raise ValueError(f"{c.name}: weight must be finite and ≥ 0, got {c.weight}")
        for o in c.options:
            if o.macs < 0 or not (math.isfinite(o.error) and o.error >= 0):
                raise ValueError(f"{c.name}: option {o} needs MACs ≥ 0 and a finite error ≥ 0")
            if price == "latency" and not (o.latency_ms is not None and math.isfinite(o.latency_ms)
                                           and o.latency_ms >= 0):
                raise ValueError(f"{c.name}: option {o} needs a finite latency ≥ 0")


def reachable_macs(curves: list[LayerCurve]) -> tuple[int, int]:
    """(least, most) total MACs of the layers over all allocations."""
    return (sum(min(o.macs for o in c.options) for c in curves),
            sum(max(o.macs for o in c.options) for c in curves))


def evaluate(curves: list[LayerCurve], multipliers: dict[str, int]) -> tuple[int, float]:
    """(total MACs, weighted predicted error) of an allocation."""
    macs, error = 0, 0.0
    for c in curves:
        o = c.option(multipliers[c.name])
        macs += o.macs
        error += c.weight * o.error
    return macs, error


def total_latency(curves: list[LayerCurve], multipliers: dict[str, int]) -> float | None:
    """Sum of the chosen options' latencies (ms); None when one of them was not timed."""
    chosen = [c.option(multipliers[c.name]).latency_ms for c in curves]
    return None if any(t is None for t in chosen) else float(sum(chosen))


def _allocation(curves: list[LayerCurve], multipliers: dict[str, int], exact: bool) -> Allocation:
    macs, error = evaluate(curves, multipliers)
    return Allocation(multipliers, macs, error, exact, total_latency(curves, multipliers))


class _Table:
    """The DP of the module docstring over all units ``0..Σ max q``."""

    def __init__(self, curves: list[LayerCurve], resolution: int, price: str):
        check_curves(curves, price)
        self.curves = curves
        costs = [[o.cost(price) for o in c.options] for c in curves]
        base = [min(cost) for cost in costs]
        extra = [[v - b for v in cost] for cost, b in zip(costs, base)]
        self.base = sum(base)
        span = sum(max(e) for e in extra)
        g = 0
        for e in extra:
            for v in e:
                g = math.gcd(g, v)
        if g and span // g <= resolution:
            self.unit, self.exact = g, True
        else:
            self.unit, self.exact = max(1, -(-span // max(resolution, 1))), span == 0
        self.q = [np.array([-(-v // self.unit) for v in e], dtype=np.int64) for e in extra]
        size = int(sum(int(q.max()) for q in self.q)) + 1
        best = np.zeros(size)
        self.choice = np.zeros((len(curves), size), dtype=np.int16)
        for idx, (c, q) in enumerate(zip(curves, self.q)):
            new = np.full(size, np.inf)
            pick = np.zeros(size, dtype=np.int16)
            for k, o in enumerate(c.options):
                cand = np.full(size, np.inf)
                cand[q[k]:] = best[:size - q[k]] + c.weight * o.error
                better = cand < new  # strict: ties keep the earlier (cheaper-listed) option
                new[better], pick[better] = cand[better], k
            best = new
            self.choice[idx] = pick
        self.best = best

    def units(self, cost: int) -> int:
        """Units available for the extra costs when the layers may cost ``cost`` in all."""
        return int(min((cost - self.base) // self.unit, len(self.best) - 1))

    def backtrack(self, j: int) -> Allocation:
        chosen: dict[str, int] = {}
        for idx in range(len(self.curves) - 1, -1, -1):
            k = int(self.choice[idx, j])
            c = self.curves[idx]
            chosen[c.name] = c.options[k].multiplier
            j -= int(self.q[idx][k])
        return _allocation(self.curves, {c.name: chosen[c.name] for c in self.curves}, self.exact)


def allocate_cost(curves: list[LayerCurve], max_cost: int, *, price: str = "macs",
                  resolution: int = RESOLUTION) -> Allocation:
    """Least weighted predicted error with the layers' total cost ≤ ``max_cost`` (MACs, or
    nanoseconds with ``price="latency"``).

    Raises ValueError when even the cheapest option of every layer exceeds ``max_cost``.
    """
    check_curves(curves, price)
    lo = sum(min(o.cost(price) for o in c.options) for c in curves)
    if max_cost < lo:
        hi = sum(max(o.cost(price) for o in c.options) for c in curves)
        raise ValueError(f"{price} budget {max_cost} below the least reachable {lo} (range {lo}..{hi})")
    table = _Table(curves, resolution, price)
    return table.backtrack(table.units(max_cost))


def allocate_error(curves: list[LayerCurve], max_error: float, *, price: str = "macs",
                   resolution: int = RESOLUTION) -> Allocation:
    """Least cost (MACs, or latency with ``price="latency"``) with weighted predicted error ≤
    ``max_error`` (≥ 0; all-skip has error 0 when every layer has a zero-error option, e.g. skip)."""
    table = _Table(curves, resolution, price)
    ok = np.flatnonzero(table.best <= max_error)
    if not len(ok):
        raise ValueError(f"no allocation has predicted error ≤ {max_error} "
                         f"(least reachable {float(table.best[-1]):.3g})")
    return table.backtrack(int(ok[0]))


def uniform(curves: list[LayerCurve], multiplier: int) -> Allocation:
    """Every layer at ``multiplier`` where it has that option, else skipped (for comparisons)."""
    chosen = {c.name: multiplier if any(o.multiplier == multiplier for o in c.options) else SKIP
              for c in curves}
    return _allocation(curves, chosen, True)
