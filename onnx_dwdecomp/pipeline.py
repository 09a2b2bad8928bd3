"""The whole job: load → fold BN → candidates → select → (calibrate) → solve → rewrite →
fold pointwise pairs → verify → report.

``decompose(model_or_path, **options)`` returns ``(model, report)``; it never touches the
input (a path is read, a ``ModelProto`` is copied) and writes nothing to disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import onnx

from . import calibdata
from .budget import SKIP, Allocation, LayerCurve, Option, allocate_error, allocate_macs, reachable_macs
from .calibrate import CalibrationOptions, calibrate_and_solve
from .candidates import ConvLayer, Skipped, find_candidates
from .errors import BudgetError, CalibrationError, OptionError, first_line
from .fold import fold_batchnorm, fold_pointwise
from .latency import MIN_GAIN, Decision, LatencySelector
from .modelio import LoadedModel, load_model, model_byte_size
from .report import LayerResult, ModelTotals, Report, Selection
from .rewrite import Replacement, apply_replacements
from .runtime import make_session
from .shapes import (ModelCost, graph_inputs, infer_tensor_info, model_cost, node_macs,
                     resolve_input_shapes)
from .solve import (ChannelFactors, LayerStats, SeparableFactors, channel_factors, channel_rank,
                    check_multiplier, gsvd_factors, relative_response_error, relative_weight_error,
                    svd_factors)
from .verify import check_model, compare_models, random_batches

METHODS = ("svd", "gsvd", "channel")
SELECT = ("latency", "all")


@dataclass(frozen=True)
class DecomposeOptions:
    """Every knob of :func:`decompose` (the CLI flags map one to one)."""

    method: str | None = None  # default: "gsvd" with calibration data, else "svd"
    multiplier: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    calib: Any = None  # path (.npy/.npz/image folder) or a CalibrationDataReader-like object
    calib_size: int | None = None
    batch_size: int = 32
    positions: int | None = 64  # sampled output positions per image; None = all
    symmetric: bool = False
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    verify: bool = True
    seed: int = 0
    select: str = "latency"  # "latency": rewrite only where onnxruntime measures a gain; "all"
    threads: int | None = None  # onnxruntime threads for latency selection; None = all CPUs
    target_macs: float | None = None  # budget: output MACs ≤ target_macs × input MACs (per-layer r)
    max_error: float | None = None  # budget: verification rel. L2 ≤ max_error with the fewest MACs

    @property
    def budgeted(self) -> bool:
        return self.target_macs is not None or self.max_error is not None

    def resolved_method(self) -> str:
        return self.method or ("gsvd" if self.calib is not None else "svd")

    def validate(self) -> None:
        method = self.resolved_method()
        if method not in METHODS:
            raise OptionError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
        if self.multiplier < 1:
            raise OptionError(f"--multiplier {self.multiplier}: must be ≥ 1 (depthwise filters per channel)")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size {self.batch_size}: must be ≥ 1")
        if self.positions is not None and self.positions < 1:
            raise OptionError(f"--positions {self.positions}: must be ≥ 1 or 'all'")
        if self.calib_size is not None and self.calib_size < 1:
            raise OptionError(f"--calib-size {self.calib_size}: must be ≥ 1")
        if method == "gsvd" and self.calib is None:
            raise OptionError("--method gsvd needs calibration data: pass --calib (or use --method svd)")
        if self.symmetric and self.calib is None:
            raise OptionError("--symmetric needs calibration data (--calib)")
        if self.select not in SELECT:
            raise OptionError(f"--select {self.select!r}: expected one of {', '.join(SELECT)}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise OptionError(f"--threads {self.threads!r}: must be an integer ≥ 1")
        if self.budgeted:
            _validate_budget(self, method)


class DecomposeResult(NamedTuple):
    model: onnx.ModelProto
    report: Report


def decompose(model: str | os.PathLike | onnx.ModelProto | LoadedModel, *, progress: Callable[[str], None] | None = None,
              **options: Any) -> DecomposeResult:
    """Rewrite the regular convs of ``model`` into depthwise + pointwise pairs.

    Parameters
    ----------
    model : path or onnx.ModelProto
    progress : called with short status lines during long phases (the CLI prints them to stderr).
    **options : fields of :class:`DecomposeOptions`.

    Returns
    -------
    (onnx.ModelProto, Report)
    """
    opts = DecomposeOptions(**options)
    opts.validate()
    say = progress or (lambda _msg: None)
    method = opts.resolved_method()
    timing: dict[str, float] = {"load": 0.0, "calibration": 0.0}
    start = time.perf_counter()

    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    source = loaded.model
    specs = graph_inputs(source)
    timing["load"] = time.perf_counter() - t0

    # Fold BatchNormalization / per-channel Mul/Add into the convs first: the candidates then
    # carry the weights the network really applies. `work` is the model every later stage
    # reads; verification still compares the final model with the untouched `source`.
    t0 = time.perf_counter()
    bn_fold = fold_batchnorm(source)
    work = bn_fold.model
    timing["fold"] = time.perf_counter() - t0

    data = None
    if opts.calib is not None:
        t0 = time.perf_counter()
        say("calibrate: reading data")
        data = calibdata.load_calibration(opts.calib, specs, calib_size=opts.calib_size,
                                          mean=opts.mean, std=opts.std)
        timing["calibration"] = time.perf_counter() - t0
    shapes, notes = resolve_input_shapes(specs, dict(opts.input_shapes),
                                         data.sample_shapes if data is not None else None)
    infos = infer_tensor_info(work, shapes)
    candidates = find_candidates(work, opts.include, opts.exclude)
    skipped = list(candidates.skipped)
    layers: list[ConvLayer] = []
    selection: list[Selection] = []
    for layer in candidates.layers:
        reason = _unprofitable(layer, method, opts.multiplier)
        if reason:
            skipped.append(Skipped(layer.name, reason))
            selection.append(Selection(layer.name, False, reason))
        else:
            layers.append(layer)
    t0 = time.perf_counter()
    if opts.select == "latency":
        layers = _select_by_latency(layers, infos, method, opts, selection, skipped, say)
    else:
        selection += [Selection(layer.name, True, "--select all") for layer in layers]
    timing["select"] = time.perf_counter() - t0

    multipliers = {layer.name: opts.multiplier for layer in layers}
    budget: _Budget | None = None
    if opts.budgeted:
        t0 = time.perf_counter()
        budget = _plan_budget(work, layers, data, infos, specs, opts, say)
        multipliers = {layer.name: SKIP for layer in layers} | budget.allocation.multipliers
        timing["budget_curves"] = time.perf_counter() - t0
    all_layers = layers
    for key in ("calibration", "solve", "rewrite", "verify"):
        timing.setdefault(key, 0.0)
    while True:
        layers = [layer for layer in all_layers if multipliers[layer.name] != SKIP]
        t0 = time.perf_counter()
        solved = _solve_all(work, layers, data, infos, specs, method, multipliers, opts, say)
        factors, heldout_errors, calib_report = solved.factors, solved.heldout_errors, solved.calib_report
        for key, value in solved.timing.items():
            timing[key] = timing.get(key, 0.0) + value
        if data is None:
            timing["solve"] += time.perf_counter() - t0
        if data is not None and "reference_forward" not in timing:
            t_ref = time.perf_counter()
            _reference_forward(source, data, opts.batch_size, _fixed_batch(specs))
            timing["reference_forward"] = time.perf_counter() - t_ref

        t0 = time.perf_counter()
        say("rewrite")
        new_model = apply_replacements(work, [Replacement(layer, factors[layer.name]) for layer in layers])
        # The second conv of each replacement writes the layer's output tensor; merge it into a
        # 1×1 conv it feeds (depthwise-only counterparts), recovering the native structure.
        producer = {out: node.name for node in new_model.graph.node for out in node.output}
        pw_fold = fold_pointwise(new_model, [producer[layer.output] for layer in layers])
        new_model = pw_fold.model
        timing["rewrite"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        check_model(new_model)
        verification = None
        if opts.verify:
            say("verify")
            verify_batches = solved.verify_batches
            if verify_batches is None:
                verify_batches = random_batches(specs, shapes, opts.seed)
                what = f"random inputs (seed {opts.seed})"
            else:
                what = "held-out calibration samples"
            verification = compare_models(source, new_model, verify_batches, what)
        timing["verify"] += time.perf_counter() - t0
        state = (layers, factors, heldout_errors, calib_report, new_model, pw_fold, verification)
        if budget is None or not budget.revise(verification, state, say):
            break
        multipliers = {layer.name: SKIP for layer in all_layers} | budget.allocation.multipliers
    if budget is not None:  # --max-error: the round with the fewest MACs that met the bound
        layers, factors, heldout_errors, calib_report, new_model, pw_fold, verification = budget.final()
        multipliers = {layer.name: SKIP for layer in all_layers} | budget.allocation.multipliers
    skipped += [Skipped(layer.name, "kept regular by the budget allocation")
                for layer in all_layers if multipliers[layer.name] == SKIP]

    new_infos = infer_tensor_info(new_model, shapes)
    # MACs from the folded model (BN has none, and `infos` names its tensors), parameters
    # from the original (BN parameters included).
    before = ModelCost(model_cost(work, infos).macs, model_cost(source, {}).params)
    after = model_cost(new_model, new_infos)
    results = []
    for layer in layers:
        f = factors[layer.name]
        node = work.graph.node[layer.node_index]
        macs_before = node_macs(node, infos)
        out_shape = infos[layer.output].shape if layer.output in infos else None
        positions = int(np.prod(out_shape[:1] + out_shape[2:])) if out_shape else 0
        if layer.name in heldout_errors:
            err, kind = heldout_errors[layer.name], "response"
        else:
            err, kind = relative_weight_error(layer.weight, f.dense_weight()), "weight"
        results.append(LayerResult(
            name=layer.name, weight_shape=layer.weight_shape, method=method, multiplier=multipliers[layer.name],
            macs_before=macs_before, macs_after=positions * f.macs_per_position(), rel_error=float(err),
            error_kind=kind, iterations=getattr(f, "iterations", 0),
            fallback_channels=getattr(f, "fallback_channels", ()),
            rank=f.first.shape[0] if isinstance(f, ChannelFactors) else None))
    # The job's wall time; the reference_forward pass only measures, so it is not counted.
    timing["total"] = time.perf_counter() - start - timing.get("reference_forward", 0.0)
    totals = ModelTotals(before.macs, after.macs, before.params, after.params,
                         model_byte_size(source), model_byte_size(new_model))
    if not layers:
        notes.append("no conv was rewritten; " + ("only BatchNormalization/Mul/Add were folded into convs"
                                                    if bn_fold.modified else "the output equals the input"))
    notes += [f"{r.node} not folded into its conv: {r.reason}" for r in bn_fold.refused]
    if budget is not None:
        notes += budget.notes(after.macs)
    if opts.select == "latency":
        notes.append("latency selection timed each conv configuration in onnxruntime on this machine; "
                     "results depend on the machine and its load (--select all for a reproducible output)")
    report = Report(method=method, layers=tuple(results), skipped=tuple(skipped), model=totals,
                    verification=verification, timing_s=timing, notes=tuple(notes),
                    calibration=calib_report, options=_options_dict(opts, shapes),
                    select=opts.select, selection=tuple(selection), folded=bn_fold.folds,
                    merged=pw_fold.folds,
                    budget=None if budget is None else budget.to_dict(after.macs, heldout_errors))
    return DecomposeResult(new_model, report)


def _unprofitable(layer: ConvLayer, method: str, multiplier: int) -> str | None:
    """Why decomposing ``layer`` at ``multiplier`` is impossible or saves no MACs (or None)."""
    reason = check_multiplier(layer.weight_shape, multiplier)
    if reason:
        return reason
    n, c, kh, kw = layer.weight_shape
    k = kh * kw
    regular = n * c * k
    if method == "channel":
        d = channel_rank(layer.weight_shape, multiplier)
        cost = d * (c * k + n)
    else:
        cost = c * multiplier * k + n * c * multiplier
    if cost >= regular:
        return (f"no MAC saving at multiplier {multiplier}: {cost} vs {regular} MACs per output position")
    return None


def _select_by_latency(layers: list[ConvLayer], infos, method: str, opts: DecomposeOptions,
                       selection: list[Selection], skipped: list[Skipped], say) -> list[ConvLayer]:
    """The layers whose replacement onnxruntime runs faster (see latency.py); appends the
    decision for every layer to ``selection`` and the rejected ones to ``skipped``."""
    selector = LatencySelector(threads=opts.threads)
    chosen = []
    for k, layer in enumerate(layers):
        info = infos.get(layer.input)
        if info is None or info.shape is None:
            decision = Decision(False, "input shape unknown, latency not measured; --select all forces it")
        else:
            c = layer.weight_shape[1]
            if method == "channel":
                mid, group = channel_rank(layer.weight_shape, opts.multiplier), 1
            else:
                mid, group = c * opts.multiplier, c
            config = selector.config(layer, info.shape, mid_channels=mid, mid_group=group)
            say(f"select: timing {k + 1}/{len(layers)} {layer.name} ({config.describe()})")
            decision = selector.decide(config)
        t = decision.timing
        selection.append(Selection(layer.name, decision.rewrite, decision.reason,
                                   t.regular_ms if t else None, t.separable_ms if t else None))
        if decision.rewrite:
            chosen.append(layer)
        else:
            skipped.append(Skipped(layer.name, "kept regular: latency not measured" if t is None else
                                   f"kept regular: not ≥ {100 * MIN_GAIN:g} % faster in onnxruntime"))
    return chosen


def _solve_layer(layer: ConvLayer, method: str, multiplier: int, stats: LayerStats | None):
    if method == "svd":
        return svd_factors(layer.weight, layer.bias, multiplier)
    if method == "channel":
        return channel_factors(layer.weight, layer.bias, channel_rank(layer.weight_shape, multiplier), stats)
    return gsvd_factors(layer.weight, layer.bias, stats, multiplier)


def _batches(arrays: dict[str, np.ndarray], batch: int, fixed: int | None) -> list[dict[str, np.ndarray]]:
    """Split per-input arrays into feed dicts; pad the last one when the batch dim is fixed."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, batch):
        feeds = {k: v[start:start + batch] for k, v in arrays.items()}
        out.append(calibdata.pad_feeds(feeds, fixed) if fixed else feeds)
    return out


def _reference_forward(model: onnx.ModelProto, data, batch: int, fixed: int | None) -> None:
    """One plain onnxruntime pass of the original model over the calibration samples (timing only)."""
    session = make_session(model)
    for b in data.iter_batches(fixed or batch, pad_to=fixed):
        try:
            session.run(None, b.feeds)
        except Exception as exc:  # onnxruntime's own exception types
            raise CalibrationError(f"onnxruntime cannot run the input model on calibration batches of "
                                   f"{fixed or batch}: {first_line(exc)}") from exc


def _options_dict(opts: DecomposeOptions, shapes: dict[str, tuple[int, ...]]) -> dict:
    calib = opts.calib
    return {
        "method": opts.resolved_method(), "multiplier": opts.multiplier, "include": list(opts.include),
        "exclude": list(opts.exclude), "input_shapes": {k: list(v) for k, v in shapes.items()},
        "calib": None if calib is None else (str(calib) if isinstance(calib, (str, bytes)) or hasattr(calib, "__fspath__")
                                             else type(calib).__name__),
        "calib_size": opts.calib_size, "batch_size": opts.batch_size,
        "positions": "all" if opts.positions is None else opts.positions, "symmetric": opts.symmetric,
        "verify": opts.verify, "seed": opts.seed, "select": opts.select, "threads": opts.threads,
        "target_macs": opts.target_macs, "max_error": opts.max_error,
    }



def _fixed_batch(specs) -> int | None:
    """The first input's batch dim when the model fixes it (calibration batches are padded to it)."""
    return specs[0].shape[0] if specs and specs[0].shape and specs[0].shape[0] else None


class _Solved(NamedTuple):
    factors: dict[str, SeparableFactors | ChannelFactors]
    heldout_errors: dict[str, float]
    verify_batches: list[dict[str, np.ndarray]] | None
    calib_report: dict | None
    timing: dict[str, float]


def _solve_all(work: onnx.ModelProto, layers: list[ConvLayer], data, infos, specs, method: str,
               multipliers: dict[str, int], opts: DecomposeOptions, say) -> _Solved:
    """Factors for ``layers`` (each at ``multipliers[name]``): calibrated in graph order with data,
    else one by one."""
    if data is None or not layers:
        factors = {}
        for k, layer in enumerate(layers):
            say(f"solve: layer {k + 1}/{len(layers)} {layer.name}")
            factors[layer.name] = _solve_layer(layer, method, multipliers[layer.name], None)
        return _Solved(factors, {}, None, None, {})
    fixed = _fixed_batch(specs)
    calib_opts = CalibrationOptions(batch_size=opts.batch_size, positions=opts.positions,
                                    symmetric=opts.symmetric, seed=opts.seed)
    outcome = calibrate_and_solve(
        work, layers, data, infos,
        lambda layer, stats: _solve_layer(layer, method, multipliers[layer.name], stats),
        calib_opts, fixed_batch=fixed, progress=say)
    factors = {name: result.factors for name, result in outcome.layers.items()}
    errors = {name: result.heldout_error for name, result in outcome.layers.items()}
    batches = _batches(outcome.heldout_inputs, fixed or opts.batch_size, fixed)
    timing = {"calibration": sum(v for k, v in outcome.timing_s.items() if k != "solve"),
              "solve": outcome.timing_s["solve"]}
    calib_report = {"samples": outcome.samples, "heldout_samples": outcome.heldout_samples,
                    "positions": "all" if outcome.positions is None else outcome.positions,
                    "symmetric": opts.symmetric, "spilled_bytes": outcome.spilled_bytes,
                    "timing_s": {k: round(v, 4) for k, v in outcome.timing_s.items()}}
    return _Solved(factors, errors, batches, calib_report, timing)


# ------------------------------------------------------------------- budgets (--target-macs, --max-error)
#
# 1. Error curves: one calibration pass over the *original* network with symmetric statistics;
#    for every layer and every multiplier r that saves MACs, the relative response error of the
#    GSVD solution at r (CURVE_ITER L-BFGS rounds after the sweep) on the fit samples.
# 2. Costs: exact MACs per option, including the merge of the new pointwise conv into a 1×1 conv
#    it feeds (fold_pointwise), found by one dry-run rewrite with data-free factors.
# 3. Allocation: budget.py's knapsack. 4. The normal asymmetric solve with the chosen per-layer
#    multipliers, rewrite, verify. --max-error: rel_L2(out)² ≈ κ·Σ e_l, κ first measured on a probe
#    (every layer at r = 1 with the curve-pass factors) and again after each
#    round; when the measured error misses the bound, κ is updated and the allocation re-solved
#    with a margin, at most MAX_ERROR_ROUNDS rounds in all.

#: L-BFGS rounds per multiplier when tracing an error curve (0 = the GSVD sweep only). Measured
#: on the MNIST model (tools/budget_study.py, --target-macs at uniform r = 2's MACs): with 0 the
#: final per-layer errors are 0.27–0.70 × the curve's (Spearman 0.75) and the output rel. L2 is
#: 0.050; with 10 they are 0.91–5.2 × (Spearman 0.93) but the output rel. L2 is 0.058 and the
#: curve pass slower. The allocation only needs the order, and 0 gave the better network.
CURVE_ITER = 0
#: κ in rel_L2(output)² ≈ κ · Σ_l e_l when it cannot be measured (no layer, zero errors);
#: otherwise a probe measures it (see _plan_budget) and each --max-error round re-measures it.
KAPPA0 = 1.0
#: --max-error: solve + verify rounds at most.
MAX_ERROR_ROUNDS = 3
#: After a miss, the next round aims at MARGIN × the bound.
MARGIN = 0.9


def _validate_budget(opts: DecomposeOptions, method: str) -> None:
    if opts.target_macs is not None and opts.max_error is not None:
        raise OptionError("give either --target-macs or --max-error, not both")
    if opts.calib is None or method != "gsvd":
        raise OptionError("--target-macs/--max-error need calibration data (--calib) and --method gsvd: "
                          "the per-layer error curves come from the data-driven statistics")
    if opts.multiplier != 1:
        raise OptionError("--multiplier cannot be combined with --target-macs/--max-error "
                          "(the budget chooses each layer's multiplier)")
    if opts.target_macs is not None and not (0 < opts.target_macs <= 1):
        raise BudgetError(f"--target-macs {opts.target_macs:g}: must be a fraction of the input model's "
                          f"MACs in (0, 1]")
    if opts.max_error is not None:
        if not opts.max_error > 0:
            raise BudgetError(f"--max-error {opts.max_error:g}: must be > 0 (relative L2 error of the outputs)")
        if not opts.verify:
            raise OptionError("--max-error is checked by verification; drop --no-verify")


def _option_macs(work: onnx.ModelProto, layers: list[ConvLayer], infos) -> dict[str, dict[int, int]]:
    """MACs of each layer per option (``SKIP`` and every profitable r), exact for the rewritten model.

    A layer's cost includes the 1×1 conv its new pointwise conv will be merged into (if any):
    kept regular, both convs run (``P·n·c·K + P·m·n``); decomposed, the depthwise conv and the
    merged pointwise (``P·c·r·K + P·m·c·r``).
    """
    dry = apply_replacements(work, [Replacement(layer, svd_factors(layer.weight, layer.bias, 1))
                                    for layer in layers])
    producer = {out: node.name for node in dry.graph.node for out in node.output}
    by_pointwise = {producer[layer.output]: layer.name for layer in layers}
    merges = fold_pointwise(dry, list(by_pointwise)).folds
    by_name = {node.name or f"{node.op_type}@{node.output[0]}": node for node in work.graph.node}
    second = {by_pointwise[m.first]: by_name[m.into] for m in merges}
    costs: dict[str, dict[int, int]] = {}
    for layer in layers:
        n, c, kh, kw = layer.weight_shape
        k = kh * kw
        out_shape = infos[layer.output].shape
        positions = int(np.prod(out_shape[:1] + out_shape[2:]))
        merged = node_macs(second[layer.name], infos) if layer.name in second else 0
        options = {SKIP: node_macs(work.graph.node[layer.node_index], infos) + merged}
        for r in range(1, k + 1):
            pointwise = merged // n * c * r if layer.name in second else positions * n * c * r
            macs = positions * c * r * k + pointwise
            if check_multiplier(layer.weight_shape, r) is None and macs < options[SKIP]:
                options[r] = macs
        costs[layer.name] = options
    return costs


def _curve_solver(curves: dict[str, dict[int, float]], wanted: dict[str, list[int]]):
    """A ``solve`` callback for calibrate_and_solve that records each layer's error per multiplier
    (GSVD with CURVE_ITER rounds, error on the fit statistics) and returns its r = 1 factors."""
    def solve(layer: ConvLayer, stats: LayerStats) -> SeparableFactors:
        errors, first = {}, None
        for r in wanted[layer.name]:
            f = gsvd_factors(layer.weight, layer.bias, stats, r, max_iter=CURVE_ITER)
            errors[r] = relative_response_error(layer.weight, layer.bias, f, stats)
            if first is None:
                first = f
        curves[layer.name] = errors
        return first
    return solve


class _Budget:
    """Curves, allocation and the --max-error rounds of one decompose call."""

    def __init__(self, opts: DecomposeOptions, curves: list[LayerCurve], fixed_macs: int, before_macs: int,
                 kappa: float):
        self.opts = opts
        self.curves = curves
        self.fixed = fixed_macs
        self.before = before_macs
        self.kappa = self.probe_kappa = kappa
        self.rounds: list[dict] = []
        self._states: list[tuple[Allocation, tuple]] = []
        self._best: int | None = None  # index of the cheapest round that met --max-error
        self.chosen_round = 0
        if opts.target_macs is not None:
            self.limit = int(np.floor(opts.target_macs * before_macs))
            self.allocation = allocate_macs(curves, self.limit - fixed_macs)
            self.bound = None
        else:
            self.limit = None
            self.bound = opts.max_error ** 2 / self.kappa
            self.allocation = allocate_error(curves, self.bound)

    def revise(self, verification, state: tuple, say) -> bool:
        """Record a solved round (``state`` is kept for :meth:`final`); True = solve again with
        ``self.allocation``.

        --max-error only: κ is re-measured from the round, ``κ = measured² / Σ e``. A miss
        re-allocates for ``MARGIN × bound`` (and strictly below the missed error sum); a hit with
        room to spare re-allocates the same way looser, when that saves MACs over the best hit
        so far. At most MAX_ERROR_ROUNDS rounds; an allocation is never solved twice.
        """
        measured = verification.worst_rel_l2() if verification is not None else None
        alloc = self.allocation
        self.rounds.append({"multipliers": dict(alloc.multipliers), "predicted_macs": self.fixed + alloc.macs,
                            "predicted_error_sum": alloc.error, "kappa": self.kappa,
                            "error_sum_bound": self.bound, "measured_output_rel_l2": measured})
        self._states.append((alloc, state))
        if self.opts.max_error is None or measured is None:
            return False
        target = self.opts.max_error
        hit = measured <= target
        if hit and (self._best is None or alloc.macs < self._states[self._best][0].macs):
            self._best = len(self._states) - 1
        if len(self.rounds) >= MAX_ERROR_ROUNDS or alloc.error <= 0 or measured <= 0:
            return False
        self.kappa = measured ** 2 / alloc.error
        self.bound = (MARGIN * target) ** 2 / self.kappa
        if not hit:
            self.bound = min(self.bound, 0.999 * alloc.error)
        nxt = allocate_error(self.curves, self.bound)
        tried = {tuple(sorted(a.multipliers.items())) for a, _ in self._states}
        if tuple(sorted(nxt.multipliers.items())) in tried:
            return False
        if self._best is not None and nxt.macs >= self._states[self._best][0].macs:
            return False
        self.allocation = nxt
        say(f"budget: output error {measured:.3g} {'≤' if hit else '>'} {target:g}; κ = {self.kappa:.3g}, "
            f"re-allocating (round {len(self.rounds) + 1})")
        return True

    def final(self) -> tuple:
        """The state of the chosen round: the cheapest that met --max-error, else the last one."""
        index = len(self._states) - 1 if self._best is None else self._best
        self.chosen_round = index
        self.allocation = self._states[index][0]
        return self._states[index][1]

    def measured(self) -> float | None:
        """Worst output rel. L2 of the chosen round's verification (None: not verified)."""
        return self.rounds[self.chosen_round]["measured_output_rel_l2"] if self.rounds else None

    def met(self, macs: int) -> bool | None:
        if self.opts.target_macs is not None:
            return macs <= self.limit
        measured = self.measured()
        return None if measured is None else measured <= self.opts.max_error

    def notes(self, macs: int) -> list[str]:
        if self.met(macs) is not False:
            return []
        if self.opts.target_macs is not None:
            return [f"budget NOT met: {macs} MACs > {self.limit} (--target-macs {self.opts.target_macs:g})"]
        return [f"budget NOT met after {len(self.rounds)} round(s): output rel. L2 "
                f"{self.measured():.3g} > --max-error {self.opts.max_error:g}"]

    def to_dict(self, macs: int, measured_errors: dict[str, float]) -> dict:
        chosen = self.allocation.multipliers
        kappa = self.rounds[self.chosen_round]["kappa"] if self.rounds else self.kappa
        lo, hi = reachable_macs(self.curves)
        return {
            "mode": "target_macs" if self.opts.target_macs is not None else "max_error",
            "target": self.opts.target_macs if self.opts.target_macs is not None else self.opts.max_error,
            "macs_limit": self.limit,
            "original_macs": self.before,
            "reachable_macs": [self.fixed + lo, self.fixed + hi],
            "predicted_macs": self.fixed + self.allocation.macs,
            "macs": macs,
            "predicted_error_sum": self.allocation.error,
            "kappa": kappa,  # the κ the chosen round was allocated with
            "probe_kappa": self.probe_kappa,
            "predicted_output_rel_l2": float(np.sqrt(kappa * self.allocation.error)),
            "measured_output_rel_l2": self.measured(),
            "met": self.met(macs),
            "exact": self.allocation.exact,
            "curve": f"symmetric statistics of the original network, GSVD with max_iter={CURVE_ITER}, "
                     f"relative response error on the fit samples",
            "rounds": self.rounds,
            "chosen_round": self.chosen_round,
            "layers": [{
                "name": c.name,
                "multiplier": "skip" if chosen[c.name] == SKIP else chosen[c.name],
                "predicted_error": c.option(chosen[c.name]).error,
                "measured_error": measured_errors.get(c.name, 0.0 if chosen[c.name] == SKIP else None),
                "macs": c.option(chosen[c.name]).macs,
                "curve": [{"multiplier": "skip" if o.multiplier == SKIP else o.multiplier, "macs": o.macs,
                           "predicted_error": o.error} for o in c.options],
            } for c in self.curves],
        }


def _plan_budget(work: onnx.ModelProto, layers: list[ConvLayer], data, infos, specs,
                 opts: DecomposeOptions, say) -> _Budget:
    """Error curves (one symmetric calibration pass of the original network), exact option costs
    and the first allocation; BudgetError when the budget is out of reach."""
    before = model_cost(work, infos).macs
    costs = _option_macs(work, layers, infos) if layers else {}
    # A conv that no multiplier makes cheaper (its merged pointwise would cost more) stays regular.
    layers = [layer for layer in layers if len(costs[layer.name]) > 1]
    costs = {layer.name: costs[layer.name] for layer in layers}
    fixed = before - sum(c[SKIP] for c in costs.values())
    least = fixed + sum(min(c.values()) for c in costs.values())
    if opts.target_macs is not None and opts.target_macs * before < least:
        raise BudgetError(
            f"--target-macs {opts.target_macs:g} is out of reach: with the {len(layers)} selected conv(s) "
            f"the output model's MACs range from {least / before:.4f} (each at its cheapest multiplier) to 1 "
            f"× the input's ({least} .. {before} MACs)")
    errors: dict[str, dict[int, float]] = {}
    kappa = KAPPA0
    if layers:
        say("budget: error curves (symmetric pass)")
        wanted = {name: sorted(r for r in c if r != SKIP) for name, c in costs.items()}
        fixed_batch = _fixed_batch(specs)
        outcome = calibrate_and_solve(work, layers, data, infos, _curve_solver(errors, wanted),
                                      CalibrationOptions(batch_size=opts.batch_size, positions=opts.positions,
                                                         symmetric=True, seed=opts.seed),
                                      fixed_batch=fixed_batch, progress=say)
        # κ probe: the network with every layer at r = 1 as the curve pass solved it, on the
        # held-out samples. Its factors are cruder than the final ones (symmetric, sweep only),
        # so the κ it gives tends to over-predict the final output error (conservative).
        say("budget: measuring κ (all layers at r = 1)")
        probe = apply_replacements(work, [Replacement(layer, outcome.layers[layer.name].factors)
                                          for layer in layers])
        batches = _batches(outcome.heldout_inputs, fixed_batch or opts.batch_size, fixed_batch)
        measured = compare_models(work, probe, batches, "held-out calibration samples").worst_rel_l2()
        total = sum(errors[layer.name][1] for layer in layers)
        if total > 0 and np.isfinite(measured):
            kappa = measured ** 2 / total
    curves = [LayerCurve(layer.name, tuple(
        Option(r, macs, 0.0 if r == SKIP else float(errors[layer.name][r]))
        for r, macs in sorted(costs[layer.name].items()))) for layer in layers]
    return _Budget(opts, curves, fixed, before, kappa)
