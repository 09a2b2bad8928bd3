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
1. **Prices.** Every option's exact MACs (a new pointwise conv merged into a following 1×1
   conv included, :func:`option_macs`). Offered are the r whose MACs are at most
   ``MAX_OPTION_MACS`` (½) of the regular conv's: a larger r saves little (timing noise decides
   it) and each offered r costs a GSVD solve per layer in the curve pass — on a ResNet-18-shaped
   model r = 6–7 options timed "faster" under load measured ×1.03 on a quiet machine, while
   their solves made the default job 8× the uniform one. With ``price="latency"``
   (``--select latency``, the default) every option is also timed in onnxruntime at its real
   shape (latency.py): r = 1, 2, … while the separable form runs at least ``MIN_GAIN`` faster
   than the regular conv (latency grows with r: a larger r is not tried once one is not
   faster), priced at ``ratio_r × t_regular`` (each ratio from its own interleaved timing, one
   regular reference per conv); a conv no multiplier makes faster stays regular, with that
   reason. A *tiny* conv (regular form below ``TINY_CONV_MS``) is timed once for its regular
   latency and offered its first multiplier only, priced by MACs: its per-conv timings are noise. Either way the
   chosen plan is then timed as a whole model (pipeline, model_latency.py). ``price="macs"`` (``--select all``) offers every such r and times nothing.
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
   price with ``α·Σ s e ≤ (AIM·E)²``; ``--target-macs``: least predicted error with MACs ≤ F ×
   the input's; ``--target-latency``: least predicted error with the candidate convs' summed
   latency ≤ F × their regular latency.
5. **Rounds** (``--max-error``): the chosen plan is solved the normal way (asymmetric, in graph
   order), rewritten and verified on the held-out samples; ``α`` is re-measured from the round,
   ``α = measured² / Σ s e`` (the sensitivities stay: the rounds correct the interaction, never
   reset to a model-wide guess); a miss re-allocates strictly below the missed error sum, a hit
   more than ``NEAR`` below the bound re-allocates looser when that is cheaper than the best
   hit so far. The rounds stop at a hit within ``[NEAR, 1] × E``, at a plan already measured,
   when nothing cheaper is predicted, or after ``MAX_ERROR_ROUNDS`` solved rounds. The result
   is the cheapest round that met the bound, else the all-regular plan (the output then equals
   the input: the tool never hands back a plan it measured outside the bound).
6. **Frontier.** From the same curves, sensitivities, ``α`` and prices, what the bounds of
   ``FRONTIER_BOUNDS`` would give (:meth:`BudgetPlanner.frontier`), for the report and ``--plot``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .budget import SKIP, Allocation, LayerCurve, Option, allocate_cost, allocate_error, reachable_macs, uniform
from .candidates import ConvLayer
from .errors import BudgetError, Refused
from .fold import rewrite_and_merge
from .graph import label
from .latency import MIN_GAIN, LatencySelector
from .methods import GSVD
from .report import Selection
from .rewrite import Replacement
from .shapes import node_macs
from .solve import RIDGE, SOLVER_ROUNDS, GsvdProblem, LayerStats, SeparableFactors, check_multiplier, svd_factors

#: --max-error: solve + verify rounds at most (not counting a round that rewrites nothing).
MAX_ERROR_ROUNDS = 4
#: Each allocation aims at AIM × the bound (room for a prediction that is a little low).
AIM = 0.9
#: A round that meets the bound with a measured error ≥ NEAR × the bound ends the search.
NEAR = 0.7
#: Offered options: MACs at most this share of the regular conv's (module docstring, step 1).
MAX_OPTION_MACS = 0.5
#: A conv whose regular form times below this (ms) is *tiny*: its per-conv timings are noise
#: (one MNIST configuration timed 25.6 and 16.5 µs in two runs; three such convs "faster" at
#: r = 2 gave ×1.000 on the whole model). It is offered its first multiplier only, priced by
#: MACs (``t_regular × MACs_r / MACs_regular``), and the plan is checked as a whole model.
#: Only the first: at r > 1 the r depthwise convs and the Concat cost more than they save at
#: this size (MNIST, 1 thread: 7 tiny convs at r = 3–4 gave ×1.01, all 19 at r = 1 ×0.76).
TINY_CONV_MS = 0.1
TINY_OPTIONS = 2
#: Output error bounds the report's trade-off table (and --plot) shows.
FRONTIER_BOUNDS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)


@dataclass(frozen=True)
class Plan:
    """What each candidate conv becomes: ``multipliers[name]`` is its depth multiplier, or ``SKIP``."""

    multipliers: dict[str, int]

    def rewritten(self, layers: list[ConvLayer]) -> list[ConvLayer]:
        return [layer for layer in layers if self.multipliers.get(layer.name, SKIP) != SKIP]


@dataclass(frozen=True)
class Priced:
    """Per layer: the offered options' MACs and, priced by latency, their latencies (ms)."""

    macs: dict[str, dict[int, int]]
    latency_ms: dict[str, dict[int, float]] | None


# ------------------------------------------------------------------------------------- prices

def merge_targets(work: onnx.ModelProto, layers: list[ConvLayer]) -> dict[str, onnx.NodeProto]:
    """Layer name → the 1×1 conv its new pointwise conv will be merged into (fold_pointwise),
    found by one dry-run rewrite with data-free factors; layers without one are left out."""
    if not layers:
        return {}
    merged, by_pointwise = rewrite_and_merge(work, [Replacement(layer, svd_factors(layer.weight, layer.bias, 1))
                                                    for layer in layers])
    by_name = {label(node): node for node in work.graph.node}
    return {by_pointwise[m.first]: by_name[m.into] for m in merged.folds}


def merged_channels(targets: dict[str, onnx.NodeProto], infos) -> dict[str, int]:
    """Layer name → output channels of its merge target (ConvConfig.merged_channels)."""
    out = {}
    for name, node in targets.items():
        info = infos.get(node.output[0])
        if info is not None and info.shape is not None and len(info.shape) > 1:
            out[name] = int(info.shape[1])
    return out


def option_macs(work: onnx.ModelProto, layers: list[ConvLayer], infos,
                second: dict[str, onnx.NodeProto]) -> dict[str, dict[int, int]]:
    """MACs of each layer per option (``SKIP`` and every r whose MACs are at most
    ``MAX_OPTION_MACS`` of the regular conv's), exact for the rewritten model.

    A layer's cost includes the 1×1 conv ``second[name]`` its new pointwise conv will be merged
    into (if any, :func:`merge_targets`): kept regular, both convs run (``P·n·c·K + P·m·n``);
    decomposed, the depthwise conv and the merged pointwise (``P·c·r·K + P·m·c·r``).
    """
    costs: dict[str, dict[int, int]] = {}
    for layer in layers:
        shape = layer.weight_shape
        n = shape[0]
        out_shape = infos[layer.output].shape
        positions = int(np.prod(out_shape[:1] + out_shape[2:]))
        merged = node_macs(second[layer.name], infos) if layer.name in second else 0
        options = {SKIP: node_macs(work.graph.node[layer.node_index], infos) + merged}
        for r in range(1, int(np.prod(shape[2:])) + 1):
            mid = GSVD.mid(shape, r)[0]
            pointwise = merged // n * mid if layer.name in second else positions * GSVD.pointwise_macs(shape, r)
            macs = positions * GSVD.depthwise_macs(shape, r) + pointwise
            if check_multiplier(shape, r) is None and macs <= MAX_OPTION_MACS * options[SKIP]:
                options[r] = macs
        costs[layer.name] = options
    return costs


def option_latencies(layers: list[ConvLayer], infos, macs: dict[str, dict[int, int]],
                     selector: LatencySelector, say, merged: dict[str, int] | None = None
                     ) -> tuple[dict[str, dict[int, float]], list[Selection]]:
    """Latency (ms) of each layer's regular conv (``SKIP``) and of every r that runs faster,
    timed in the form the output model runs (``merged[name]``: the 1×1 conv the new pointwise
    conv is merged into, see ConvConfig.merged_channels).

    r = 1, 2, … in order until one is not ``MIN_GAIN`` faster (see the module docstring); each
    option is priced ``ratio_r × t_regular`` with ``t_regular`` from r = 1's timing. Returns
    the latencies and one :class:`Selection` per layer (the r = 1 timing and the verdict).
    """
    latencies: dict[str, dict[int, float]] = {}
    selection: list[Selection] = []
    for k, layer in enumerate(layers):
        info = infos.get(layer.input)
        if info is None or info.shape is None:
            selection.append(Selection(layer.name, False, "input shape unknown, latency not measured; "
                                                          "--select all prices by MACs instead"))
            continue
        offered: dict[int, float] = {}
        first = None
        reason = ""
        for r in sorted(m for m in macs[layer.name] if m != SKIP):
            mid, group = GSVD.mid(layer.weight_shape, r)
            config = selector.config(layer, info.shape, mid_channels=mid, mid_group=group,
                                     merged_channels=(merged or {}).get(layer.name, 0))
            say(f"select: timing {k + 1}/{len(layers)} {layer.name} r={r} ({config.describe()})")
            decision = selector.decide(config)
            t = decision.timing
            if t is None:  # onnxruntime cannot run this option (nor, then, a larger r)
                reason = decision.reason
                break
            if first is None:
                first = t
                offered[SKIP] = t.regular_ms
                if t.regular_ms < TINY_CONV_MS:  # its timings are noise: the first r's, priced by MACs
                    offered.update({m: t.regular_ms * macs[layer.name][m] / macs[layer.name][SKIP]
                                    for m in sorted(macs[layer.name])[1:1 + TINY_OPTIONS]})
                    break
            if not decision.rewrite:
                reason = decision.reason
                break
            offered[r] = t.ratio * first.regular_ms
        rs = sorted(r for r in offered if r != SKIP)
        if rs and first.regular_ms < TINY_CONV_MS:
            verdict = (f"tiny: regular {first.regular_ms:.3f} ms < {TINY_CONV_MS:g} ms, so r = {', '.join(map(str, rs))} are offered, "
                       f"priced by MACs (the whole plan is timed as one model)")
            latencies[layer.name] = offered
        elif rs:
            verdict = (f"faster at r = {', '.join(map(str, rs))} (×{first.regular_ms / offered[rs[0]]:.2f} at "
                       f"r = {rs[0]}); the plan chooses among them")
            latencies[layer.name] = offered
        else:
            verdict = reason or "no multiplier saves MACs"
        selection.append(Selection(layer.name, bool(rs), verdict, first.regular_ms if first else None,
                                   offered.get(rs[0]) if rs else (first.separable_ms if first else None)))
    return latencies, selection


def price_options(work: onnx.ModelProto, layers: list[ConvLayer], infos, price: str,
                  selector: LatencySelector | None, say) -> tuple[Priced, list[Selection], list[Refused]]:
    """The options offered per layer (layers with none left out), the selection records and
    the layers kept regular for want of an option, with the reason."""
    second = merge_targets(work, layers)
    macs = option_macs(work, layers, infos, second)
    macs = {name: options for name, options in macs.items() if len(options) > 1}
    skipped = [Refused(layer.name, f"kept regular: no multiplier saves ≥ {100 * (1 - MAX_OPTION_MACS):g} % of its MACs "
                                   f"(merged pointwise included)")
               for layer in layers if layer.name not in macs]
    if price == "macs":
        return Priced(macs, None), [], skipped
    assert selector is not None
    latencies, selection = option_latencies([layer for layer in layers if layer.name in macs], infos, macs,
                                            selector, say, merged_channels(second, infos))
    unknown = {s.name for s in selection if s.regular_ms is None}  # input shape unknown or not timed
    skipped += [Refused(name, "kept regular: latency not measured" if name in unknown else
                        f"kept regular: no multiplier runs ≥ {100 * MIN_GAIN:g} % faster in onnxruntime")
                for name in macs if name not in latencies]
    macs = {name: {r: macs[name][r] for r in offered} for name, offered in latencies.items()}
    return Priced(macs, latencies), selection, skipped


# ---------------------------------------------------------------------------------- curves

def curve_solver(curves: dict[str, dict[int, float]], wanted: dict[str, list[int]], *,
                 rounds: int = SOLVER_ROUNDS, ridge: float = RIDGE):
    """A ``solve`` callback for calibrate_and_solve that records each layer's held-out error per
    multiplier and returns the factors of its first offered r ``r₀``, solved like the final solve
    (``rounds`` L-BFGS rounds, ``ridge``): the curve errors — and the probes that turn them into
    output errors — are those of the factors the rounds will solve. With the sweep alone the
    curves over-predicted the final layer errors 1.6–10× on models/mnist, and the first round's
    predicted output error was 1.8–2.5× its measurement (1.06–1.24× with 10 rounds).

    The other r get the GSVD sweep only, scaled by what the refinement gained at ``r₀``:
    ``e(r) = e_sweep(r) · e(r₀) / e_sweep(r₀)`` — one L-BFGS solve per layer instead of one per
    option (on the ShuffleNet V2 x1.0 bench the curve pass waited 15 s of 32 for them). On
    models/mnist this estimate was 0.82–1.44× the refined error at r = 2 (median 1.23) and
    0.72–1.63× at r = 3, against 1.6–10× for the sweep alone.
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


# ---------------------------------------------------------------------------------- planner

class BudgetPlanner:
    """Curves, allocation and the --max-error rounds of one decompose call (module docstring).

    ``curves[l].weight`` is layer ``l``'s sensitivity ``s_l`` (sensitivity.py); a plan's output
    error is predicted as ``√(scale · Σ s_l e_l)``, ``scale`` (the interaction scale α) starting
    at 1 and re-measured by every verified round.
    """

    def __init__(self, *, mode: str, target: float, price: str, curves: list[LayerCurve], fixed_macs: int,
                 before_macs: int, default: bool = False, scale: float = 1.0):
        self.mode, self.target, self.price, self.default = mode, target, price, default
        self.curves = curves
        self.fixed = fixed_macs
        self.before = before_macs
        self.scale = scale
        self.rounds: list[dict] = []
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
            self.bound = (AIM * target) ** 2 / self.scale
            self.allocation = allocate_error(curves, self.bound, price=price)
            if self.allocation.error <= 0:  # the aim's margin left nothing: try what is predicted within E
                self.bound = target ** 2 / self.scale
                self.allocation = allocate_error(curves, self.bound, price=price)
        self.tolerance: dict | None = None  # task mode: the input's score and the allowed drop
        self.model_ms: float | None = None  # whole-model latency of the all-regular model (model_latency.py)
        self.latency_scale: float | None = None  # measured whole-model saving / summed per-conv saving

    def plan(self) -> Plan:
        return Plan(dict(self.allocation.multipliers))

    def predicted(self, alloc: Allocation | None = None) -> float:
        """Predicted output error of an allocation (default: the current one)."""
        return float(np.sqrt(max(self.scale * (alloc or self.allocation).error, 0.0)))

    def _cost(self, alloc: Allocation) -> float:
        return alloc.macs if self.price == "macs" else alloc.latency_ms

    def record(self, alloc: Allocation, measured: float | None, **extra) -> None:
        self.rounds.append({"multipliers": {k: _r(v) for k, v in alloc.multipliers.items()},
                            "predicted_macs": self.fixed + alloc.macs, "predicted_latency_ms": alloc.latency_ms,
                            "predicted_error_sum": alloc.error, "interaction_scale": self.scale,
                            "predicted_output_rel_l2": self.predicted(alloc),
                            "measured_output_rel_l2": measured, **extra})
        self._allocations.append(alloc)

    def revise(self, measured: float | None, say) -> Plan | None:
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
            self.stop_reason = "no rewrite fits the bound (each layer's probe alone exceeds it)"
            return None
        self._rescale(alloc, measured)
        if hit and measured >= NEAR * self.target:
            self.stop_reason = f"measured {measured:.3g} is within [{NEAR:g}, 1] × the bound"
            return None
        solved = sum(1 for a in self._allocations if a.error > 0)
        if solved >= MAX_ERROR_ROUNDS:
            self.stop_reason = f"round cap ({MAX_ERROR_ROUNDS} solved rounds)"
            return None
        missed_bound = 0.999 * alloc.error  # strictly below the missed round's error sum
        self.bound = (AIM * self.target) ** 2 / self.scale if finite else missed_bound
        if not hit:
            self.bound = min(self.bound, missed_bound)
        nxt = allocate_error(self.curves, self.bound, price=self.price)
        if not hit and nxt.error <= 0 < allocate_error(self.curves, missed_bound, price=self.price).error:
            # the margin left nothing: try the largest plan below the missed one instead
            self.bound = missed_bound
            nxt = allocate_error(self.curves, self.bound, price=self.price)
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

    def _rescale(self, alloc: Allocation, measured: float | None) -> None:
        """``α = measured² / Σ s e`` from a verified round (kept when it says nothing)."""
        if measured is not None and np.isfinite(measured) and measured > 0 and alloc.error > 0:
            self.scale = measured ** 2 / alloc.error

    def calibrate_latency(self, index: int, regular_ms: float, plan_ms: float) -> None:
        """Round ``index``'s plan measured ``plan_ms`` as a whole model against ``regular_ms``
        for the all-regular one: the frontier scales its per-conv savings by
        ``β = (regular_ms − plan_ms) / Σ per-conv saving`` (per-conv timings of tiny convs miss
        much of what a rewrite saves or costs around them)."""
        alloc = self._allocations[index]
        self.model_ms = regular_ms
        if self.price == "latency" and alloc.latency_ms is not None:
            saving = sum(c.option(SKIP).latency_ms or 0.0 for c in self.curves) - alloc.latency_ms
            self.latency_scale = max((regular_ms - plan_ms) / saving, 0.0) if saving > 0 else None

    def set_tolerance(self, baseline: float, allowed: float, text: str) -> None:
        self.tolerance = {"input_score": baseline, "allowed_drop": allowed, "max_drop": text}

    def record_scored(self, alloc: Allocation, measured: float | None, score: float, within: bool) -> None:
        """Task mode: record a scored candidate (``within`` the tolerance or not) and re-measure α."""
        self.record(alloc, measured, score=score, within=within)
        self._rescale(alloc, measured)
        if within and (self._best is None or self._cost(alloc) < self._cost(self._allocations[self._best])):
            self._best = len(self._allocations) - 1

    def final(self) -> int | None:
        """Index of the chosen round: the cheapest that met --max-error, else the last one (target
        MACs); None when no round met --max-error (the caller falls back to the all-regular plan)."""
        self.chosen_index = None
        if self.mode == "task" and self._best is None:
            return None
        if self.mode == "max_error" and self._best is None and any(
                r["measured_output_rel_l2"] is not None for r in self.rounds):
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
            met = [k for k, r in enumerate(self.rounds) if r.get("within")]
        else:
            met = [k for k, r in enumerate(self.rounds) if r["measured_output_rel_l2"] is not None
                   and np.isfinite(r["measured_output_rel_l2"]) and r["measured_output_rel_l2"] <= self.target
                   and not r.get("fallback") and self._allocations[k].error > 0]
        return sorted(met, key=lambda k: self._cost(self._allocations[k]))

    def fall_back(self, measured: float | None, reason: str = "") -> Plan:
        """Make the all-regular plan the chosen round (no round met --max-error, or the chosen
        plan was not faster); ``measured`` is its verified output error (round-off)."""
        self.allocation = uniform(self.curves, SKIP)
        self.record(self.allocation, measured, fallback=True, reason=reason)
        self.chosen_round = len(self.rounds) - 1
        return self.plan()

    def measured(self) -> float | None:
        return self.rounds[self.chosen_round]["measured_output_rel_l2"] if self.rounds else None

    def met(self, macs: int) -> bool | None:
        if self.mode == "target_macs":
            return macs <= self.limit
        if self.mode == "target_latency":
            return sum(c.option(self.allocation.multipliers[c.name]).cost("latency") for c in self.curves) <= self.limit
        if self.mode == "task":
            chosen = self.rounds[self.chosen_round] if self.rounds else {}
            return bool(chosen.get("within") or chosen.get("fallback"))
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
        name, error = min(((c.name, min(c.weight * o.error for o in c.options if o.multiplier != SKIP))
                           for c in self.curves), key=lambda item: item[1])
        return (f"no conv can be rewritten within the output error bound {self.target:g}: the smallest "
                f"predicted output rel. L2 of a single rewrite is {np.sqrt(self.scale * error):.3g} ({name}); "
                f"the output is not slower than the input")

    def frontier(self, bounds: tuple[float, ...] = FRONTIER_BOUNDS) -> list[dict]:
        """What other output error bounds would give with the current sensitivities and scale:
        per bound the allocation's predicted output error, MACs, convs' latency and (once a
        plan was timed as a whole model, :meth:`calibrate_latency`) the predicted model latency
        ratio ``1 − β·(Σ regular − Σ chosen) / t_model``."""
        regular_ms = sum(c.option(SKIP).latency_ms or 0.0 for c in self.curves) if self.price == "latency" else None
        chosen = self.allocation.multipliers
        points = []
        for bound in sorted(set(bounds) | ({self.target} if self.mode == "max_error" else set())):
            alloc = allocate_error(self.curves, bound ** 2 / self.scale, price=self.price) if self.curves else \
                uniform(self.curves, SKIP)
            point = {"bound": bound, "predicted_output_rel_l2": self.predicted(alloc),
                     "macs": self.fixed + alloc.macs, "macs_ratio": (self.fixed + alloc.macs) / max(self.before, 1),
                     "convs_rewritten": sum(1 for r in alloc.multipliers.values() if r != SKIP),
                     "latency_ms": alloc.latency_ms, "model_latency_ratio": None,
                     "multipliers": {k: _r(v) for k, v in alloc.multipliers.items()},
                     "chosen": alloc.multipliers == chosen}
            if self.model_ms and self.latency_scale is not None and alloc.latency_ms is not None:
                saving = self.latency_scale * (regular_ms - alloc.latency_ms)
                point["model_latency_ratio"] = max(self.model_ms - saving, 0.0) / self.model_ms
            points.append(point)
        return points

    def to_dict(self, macs: int, measured_errors: dict[str, float], patches: dict[str, int]) -> dict:
        chosen = self.allocation.multipliers
        scale = self.rounds[self.chosen_round]["interaction_scale"] if self.rounds else self.scale
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
            "latency_scale": self.latency_scale,
            "curve": "symmetric statistics of the original network, GSVD (first offered r refined like the "
                     "final solve, the others scaled from their sweep), relative response error on the held-out "
                     "samples",
            "rounds": self.rounds,
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


def check_latency_reachable(target: float, latency_ms: dict[str, dict[int, float]]) -> None:
    """BudgetError when ``--target-latency`` is below what the offered options can reach."""
    regular = sum(options[SKIP] for options in latency_ms.values())
    least = sum(min(options.values()) for options in latency_ms.values())
    if not latency_ms or target * regular < least:
        reach = f"{least / regular:.3f}" if regular > 0 else "1"
        raise BudgetError(
            f"--target-latency {target:g} is out of reach: the {len(latency_ms)} conv(s) that run faster "
            f"separable can reach {reach} of their regular latency at best ({least:.3f} of {regular:.3f} ms, "
            f"timed on this machine)")


def check_reachable(target_macs: float, before: int, macs: dict[str, dict[int, int]]) -> None:
    """BudgetError when ``--target-macs`` is below what the offered options can reach."""
    fixed = before - sum(c[SKIP] for c in macs.values())
    least = fixed + sum(min(c.values()) for c in macs.values())
    if target_macs * before < least:
        raise BudgetError(
            f"--target-macs {target_macs:g} is out of reach: with the {len(macs)} selected conv(s) "
            f"the output model's MACs range from {least / before:.4f} (each at its cheapest multiplier) to 1 "
            f"× the input's ({least} .. {before} MACs)")
