r"""A plan's output error, predicted — the planner's error model, in one place.

Each candidate layer ``l`` has an **error curve** ``e_l(r)``: the relative response error of its
GSVD solution at each offered multiplier ``r``, measured on the held-out calibration samples'
patches (:func:`curve_solver`: the first offered r solved like the final solve, the others by
the sweep scaled by what that refinement gained). Each layer has a **sensitivity** ``s_l`` (its
gain squared, from a single-layer probe: ``s_l = ε_l² / e_l``, sensitivity.py). A plan that
rewrites layer ``l`` at ``r_l`` is predicted to move the output by

    ε ≈ √(α · Σ_l s_l · e_l(r_l))

where ``α``, the **interaction scale**, is 1 before the first verified round and re-measured by
each one (``α = measured² / Σ s e``, :meth:`ErrorModel.rescale`): the sensitivities stay, the
rounds correct how the layers' errors interact. An output error bound ``E`` is therefore the
error-sum budget ``Σ s e ≤ E² / α`` (:meth:`ErrorModel.error_budget`) that budget.py's knapsack
allocates against.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..candidates import ConvLayer
from ..solve import RIDGE, SOLVER_ROUNDS, GsvdProblem, LayerStats, SeparableFactors
from .budget import SKIP, Allocation, LayerCurve, Option
from .pricing import Priced


class ErrorModel:
    """Curves (``LayerCurve``: options with ``e_l(r)``, weight ``s_l``) and the interaction scale
    ``α`` (module docstring)."""

    def __init__(self, curves: list[LayerCurve], scale: float = 1.0):
        self.curves = curves
        self.scale = scale

    def predict(self, alloc: Allocation) -> float:
        """``√(α · Σ s e)`` of an allocation (its ``error`` is the weighted sum ``Σ s e``)."""
        return float(np.sqrt(max(self.scale * alloc.error, 0.0)))

    def error_budget(self, bound: float) -> float:
        """The weighted error sum ``Σ s e`` an output error ``bound`` allows: ``bound² / α``."""
        return bound ** 2 / self.scale

    def rescale(self, alloc: Allocation, measured: float | None) -> None:
        """``α = measured² / Σ s e`` from a verified round (kept when it says nothing)."""
        if measured is not None and np.isfinite(measured) and measured > 0 and alloc.error > 0:
            self.scale = measured ** 2 / alloc.error

    def alone(self, curve: LayerCurve, option: Option) -> float:
        """The output error one layer's option is predicted to add alone: ``√(α · s · e)``."""
        return float(np.sqrt(max(self.scale * curve.weight * option.error, 0.0)))

    def smallest_single_rewrite(self) -> tuple[str, float]:
        """The layer whose cheapest-in-error rewrite alone is predicted to move the output least,
        and that predicted output error."""
        return min(((c.name, min(self.alone(c, o) for o in c.options if o.multiplier != SKIP))
                    for c in self.curves), key=lambda item: item[1])


def curve_solver(curves: dict[str, dict[int, float]], wanted: dict[str, list[int]], *,
                 rounds: int = SOLVER_ROUNDS, ridge: float = RIDGE):
    """A ``solve`` callback for calibrate_and_solve that records each layer's held-out error per
    multiplier and returns the factors of its first offered r ``r₀``, solved like the final solve
    (``rounds`` L-BFGS rounds, ``ridge``): the curve errors — and the probes that turn them into
    output errors — are those of the factors the rounds will solve.

    The other r get the GSVD sweep only, scaled by what the refinement gained at ``r₀``:
    ``e(r) = e_sweep(r) · e(r₀) / e_sweep(r₀)`` — one L-BFGS solve per layer instead of one per
    option. How close both estimates came: docs/DESIGN.md, "The planner's error model".
    """
    def solve(layer: ConvLayer, stats: LayerStats, heldout_error: Callable) -> SeparableFactors:
        rs = wanted[layer.name]
        problem = GsvdProblem(layer.weight, layer.bias, stats, ridge)  # shared by every r (moments, SVD, whitening)
        first = problem.factors(rs[0], max_iter=rounds)
        refined = heldout_error(first)
        swept = {r: heldout_error(problem.factors(r, max_iter=0)) for r in rs}
        gain = refined / swept[rs[0]] if swept[rs[0]] > 0 and np.isfinite(swept[rs[0]]) else 1.0
        curves[layer.name] = {r: refined if r == rs[0] else swept[r] * gain for r in rs}
        return first
    return solve


def layer_curves(layers: list[ConvLayer], priced: Priced, errors: dict[str, dict[int, float]],
                 weights: dict[str, float]) -> list[LayerCurve]:
    """Each layer's options with their curve errors, weighted by the layer's sensitivity."""
    out = []
    for layer in layers:
        lat = priced.latency_ms[layer.name] if priced.latency_ms is not None else {}
        out.append(LayerCurve(layer.name, tuple(
            Option(r, m, 0.0 if r == SKIP else curve_error(errors[layer.name][r]), lat.get(r))
            for r, m in sorted(priced.macs[layer.name].items())), curve_weight(weights.get(layer.name, 0.0))))
    return out


def curve_weight(sensitivity: float) -> float:
    """A sensitivity for the allocation: inf/NaN (a probe that broke the output) counts as very large."""
    return float(sensitivity) if np.isfinite(sensitivity) else 1e6


def curve_error(error: float) -> float:
    """A held-out error for the allocation: NaN/inf (no held-out variance) counts as very large."""
    return float(error) if np.isfinite(error) else 1e6


