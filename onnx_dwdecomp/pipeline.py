"""The whole job: load → fold BN → candidates → price (pricing.py) → error curves and
sensitivity probes → plan (planning/) → [calibrate → solve → rewrite → fold pointwise pairs →
verify → revise] (search.py) → the chosen plan timed as a whole model → report.

``decompose(model_or_path, **options)`` returns ``(model, report)``; it never touches the
input (a path is read, a ``ModelProto`` is copied) and writes nothing to disk (a task-aware
job writes its candidates for the user's function into a private temporary folder, removed
after). The plan (what each conv becomes) is uniform, or budgeted — with calibration data and
method gsvd the default is the fastest plan whose held-out output error stays within
``DEFAULT_MAX_ERROR``; with ``evaluate`` the fastest whose score stays within ``max_drop``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnx

from . import resources
from .calibration.driver import CalibratedLayer, CalibrationOptions, calibrate_and_solve
from .calibration.holdout import split_holdout
from .calibration.reference import Reference, reference_pass
from .candidates import ConvLayer, candidate_notes, find_candidates
from .data.dataset import CalibrationData, load_calibration
from .data.specs import fix_dims, fixed_batch
from .errors import CalibrationError, OptionError, Refused
from .fold import FoldResult, fold_batchnorm, rewrite_and_merge
from .methods import METHODS
from .modelio import LoadedModel, load_model, model_byte_size
from .options import DEFAULT_MAX_ERROR, DecomposeOptions
from .planning.budget import SKIP
from .planning.error_model import curve_solver, layer_curves
from .planning.planner import Plan, Planner
from .planning.pricing import (cannot_pay_reason, check_latency_reachable, check_reachable, merge_targets,
                               merged_channels, price_options, time_option)
from .planning.search import PlanEvidence, SolvedRound, checked_choice, plan_record, solve_rounds
from .planning.sensitivity import Sensitivities, SensitivityProbes
from .planning.strategies import MaxError, TargetLatency, TargetMacs, TaskSearch
from .planning.tuning import DEFAULT_MAX_DROP, Scorer, parse_max_drop
from .progress import Steps, reporting, say
from .report import LayerResult, ModelTotals, Report, Selection
from .rewrite import Replacement
from .runtime import using_providers
from .shapes import ModelCost, graph_inputs, infer_tensor_info, model_cost, node_macs, resolve_input_shapes
from .solve import ChannelFactors, LayerStats, SeparableFactors, check_multiplier, relative_weight_error
from .timing.cache import TimingCache
from .timing.clock import default_threads, environment
from .timing.latency import MIN_GAIN, Decision, LatencySelector
from .timing.model import check_faster, check_time_limit
from .timing.node_profile import NodeTimes, cached_profile
from .verify import (OutputScale, PaddedFeeds, check_finite_weights, check_model, compare_models,
                     finite_stats_solver, model_outputs, random_batches)


class DecomposeResult(NamedTuple):
    model: onnx.ModelProto
    report: Report


@dataclass
class _Job:
    """What every round reads: the untouched source, the BN-folded working model, data, shapes."""

    opts: DecomposeOptions
    method: str
    source: onnx.ModelProto
    work: onnx.ModelProto
    specs: list
    data: CalibrationData | None
    shapes: dict[str, tuple[int, ...]]
    infos: dict
    fixed_batch: int | None
    timing: dict[str, float]
    selector: LatencySelector | None = None
    memory_estimate: dict | None = None  # resources.check_job's, for the report
    #: the plan rounds' solved layers, keyed by the (name, multiplier) of every rewritten layer up
    #: to and including it in graph order (_solve_all)
    solved: dict[tuple, CalibratedLayer] = dataclasses.field(default_factory=dict)
    _reference: Reference | None = None
    _heldout_mask: np.ndarray | None = None
    _heldout_batches: list[dict[str, np.ndarray]] | None = None
    _heldout_reference: list[dict[str, np.ndarray]] | None = None

    def reference(self) -> Reference:
        """The plain pass of the original model over the calibration samples (once per job; its
        onnxruntime run time is ``timing_s["reference_pass"]``)."""
        if self._reference is None:
            self._reference = reference_pass(self.source, self.data, self.opts.batch_size, self.fixed_batch)
            self.timing["reference_pass"] = self._reference.seconds
        return self._reference

    def output_scales(self) -> dict[str, OutputScale] | None:
        """Each output's per-feature scale over all calibration samples (None without data)."""
        return None if self.data is None else self.reference().scales

    def heldout_mask(self) -> np.ndarray:
        """The held-out samples, spread over the outputs' energy (calibration.holdout.split_holdout)."""
        if self._heldout_mask is None:
            self._heldout_mask = split_holdout(self.data.num_samples, CalibrationOptions().holdout, self.opts.seed,
                                               self.reference().energy)
        return self._heldout_mask

    def heldout_batches(self) -> list[dict[str, np.ndarray]]:
        """The held-out calibration samples as feeds (read once per job; calibrate_and_solve is
        given the same mask and leaves them out)."""
        if self._heldout_batches is None:
            fixed = self.fixed_batch
            self._heldout_batches = [PaddedFeeds(b.feeds, b.count) if fixed else b.feeds for b in
                                     self.data.subset_batches(self.heldout_mask(), fixed or self.opts.batch_size,
                                                              pad_to=fixed)]
        return self._heldout_batches

    def heldout_reference(self) -> list[dict[str, np.ndarray]]:
        """The input model's outputs on :meth:`heldout_batches` (run once per job; the probes and
        every round's verification compare against them; ``timing_s["heldout_reference"]``)."""
        if self._heldout_reference is None:
            batches = self.heldout_batches()
            t0 = time.perf_counter()
            self._heldout_reference = model_outputs(self.source, batches, "the input model")
            self.add_time("heldout_reference", time.perf_counter() - t0)
        return self._heldout_reference

    def deployment_batch(self) -> int:
        """The batch the deployment runs: the resolved batch (1 for a dynamic batch dim, or
        --input-shape's; a scalar input has none)."""
        return next((self.shapes[s.name][0] for s in self.specs if self.shapes[s.name]), 1)

    def deployment_feeds(self) -> dict[str, np.ndarray]:
        """One seeded deployment-sized input (the whole-model timing's and the profiles')."""
        return random_batches(self.specs, self.shapes, self.opts.seed, samples=self.deployment_batch())[0]

    def profiler(self):
        """``profile(model) → NodeTimes`` at the job's threads and providers, on one deployment
        input, kept in the timing cache (node_profile.cached_profile)."""
        feeds = self.deployment_feeds()
        threads = self.opts.threads or default_threads()
        cache = self.latency_selector().cache

        def profile(model: onnx.ModelProto) -> NodeTimes:
            t0 = time.perf_counter()
            times = cached_profile(model, feeds, threads=threads, providers=self.opts.providers, cache=cache)
            self.add_time("profiles", time.perf_counter() - t0)
            return times
        return profile

    def latency_selector(self) -> LatencySelector:
        """One selector per job (its timings are reused across plan rounds), backed by the
        persistent timing cache unless ``timing_cache=False``."""
        if self.selector is None:
            choice = self.opts.timing_cache
            cache = None if choice is False else TimingCache(None if choice in (None, True) else choice)
            self.selector = LatencySelector(threads=self.opts.threads, cache=cache, providers=self.opts.providers)
        return self.selector

    def add_time(self, key: str, seconds: float) -> None:
        self.timing[key] = self.timing.get(key, 0.0) + seconds


def decompose(model: str | os.PathLike | onnx.ModelProto, *, progress: Callable[[str], None] | None = None,
              **options: Any) -> DecomposeResult:
    """Rewrite the regular convs of ``model`` into depthwise + pointwise pairs.

    Parameters
    ----------
    model : path or onnx.ModelProto
        Never modified (a path is read, a ModelProto copied).
    progress : called with short status lines during long phases (the CLI prints them to stderr).
    **options : fields of :class:`DecomposeOptions`; an unknown name is an :class:`OptionError`.

    Returns
    -------
    (onnx.ModelProto, Report)
    """
    opts = DecomposeOptions.of(options)
    return decompose_loaded(load_model(model), opts, progress)


def decompose_loaded(loaded: LoadedModel, opts: DecomposeOptions,
                     progress: Callable[[str], None] | None = None) -> DecomposeResult:
    """:func:`decompose` of a model already read by ``modelio.load_model`` (the CLI's entry: it
    keeps the loaded model to save the result the way the input was stored)."""
    with using_providers(opts.providers), reporting(progress):
        return _decompose(loaded, opts)


def _decompose(loaded: LoadedModel, opts: DecomposeOptions) -> DecomposeResult:
    start = time.perf_counter()
    job, bn_fold, notes = _prepare(loaded, opts)
    candidates = find_candidates(job.work, opts.include, opts.exclude)
    skipped = list(candidates.skipped)
    layers: list[ConvLayer] = []
    selection: list[Selection] = []
    uniform_r = opts.multiplier or 1
    for layer in candidates.layers:
        reason = (METHODS[job.method].unprofitable(layer.weight_shape, uniform_r) if opts.plan_mode() == "uniform"
                  else check_multiplier(layer.weight_shape, 1))
        if reason:
            skipped.append(reason.named(layer.name))
            selection.append(Selection(layer.name, False, reason.reason))
        else:
            layers.append(layer)
    # memory estimate and --threads bound, before any big allocation
    job.memory_estimate = resources.check_decompose_job(job, layers)

    # choose plan → solve → rewrite → verify → revise plan
    t0 = time.perf_counter()
    planner: Planner | None = None
    sensitivities: Sensitivities | None = None
    if opts.plan_mode() == "uniform":
        t1 = time.perf_counter()
        selected = (_select_by_latency(job, layers) if opts.select == "latency" else
                    Selected(layers, [Selection(layer.name, True, "--select all") for layer in layers], []))
        job.add_time("pricing", time.perf_counter() - t1)
        plan = Plan({layer.name: uniform_r for layer in selected.layers})
    else:
        planner, sensitivities, selected = _budget_planner(job, layers)
    layers = selected.layers
    selection += selected.selection
    skipped += selected.skipped
    job.add_time("plan", time.perf_counter() - t0)
    solve_round = functools.partial(_solve_rewrite_verify, job, layers)
    model_check: Decision | None = None
    # the whole-model timing's setting: the deployment batch and the job's threads; its input
    # is made only when a plan is timed
    batch = job.deployment_batch()
    threads = opts.threads or default_threads()
    if planner is None:
        chosen = solve_round(plan)
    else:
        rounds = solve_rounds(planner, solve_round)
        def time_model(model: onnx.ModelProto) -> Decision:
            t0 = time.perf_counter()
            decision = check_faster(job.work, model, job.deployment_feeds(), threads=threads,
                                    providers=opts.providers, cache=job.latency_selector().cache,
                                    time_limit_s=check_time_limit(job.reference().seconds if job.data else None))
            job.add_time("model_check", time.perf_counter() - t0)
            return decision

        chosen, model_check = checked_choice(planner, rounds, solve_round, time_model, notes)
        not_faster = model_check is not None and not model_check.rewrite
        skipped += [Refused(layer.name, planner.kept_reason(layer.name, not_faster))
                    for layer in layers if chosen.plan.multipliers.get(layer.name, SKIP) == SKIP]

    if chosen.verification is not None:
        chosen.verification.require_pass(job.source)  # NaN/Inf where the input model is finite: a failure
    report = _report(job, bn_fold, chosen, planner, skipped, selection, notes, start,
                     PlanEvidence(sensitivities, model_check, threads, batch))
    return DecomposeResult(chosen.model, report)


def _prepare(loaded: LoadedModel, opts: DecomposeOptions) -> tuple[_Job, FoldResult, list[str]]:
    """Load, fold BatchNormalization / per-channel Mul/Add into the convs, read the data, infer shapes.

    ``work`` (the folded model) is what every later stage reads; verification compares the final
    model with the untouched ``source``.
    """
    timing: dict[str, float] = {"load": loaded.seconds}
    source = loaded.model
    specs = graph_inputs(source)
    t0 = time.perf_counter()
    bn_fold = fold_batchnorm(source)
    timing["fold"] = time.perf_counter() - t0
    data = None
    named = _named_shapes(opts.input_shapes, specs)
    fixed = fixed_batch(specs)
    notes = [*loaded.notes, candidate_notes(source)]
    if opts.calib is not None:
        t0 = time.perf_counter()
        say("calibrate: reading data")
        # --input-shape sets the dims the model leaves dynamic before the data is read (an image
        # folder is cropped to them)
        data = load_calibration(opts.calib, fix_dims(specs, named), calib_size=opts.calib_size,
                                mean=opts.mean, std=opts.std)
        timing["calibration"] = time.perf_counter() - t0
        notes += data.notes
        if data.max_batch is not None and opts.batch_size > data.max_batch:  # one value per run (data.specs)
            if fixed is not None and fixed > data.max_batch:
                raise CalibrationError(f"calibration input(s) {', '.join(sorted(repr(n) for n in data.unbatched))} "
                                       f"have no sample axis and values that differ between samples, but the "
                                       f"model's batch is fixed at {fixed}: give one value for all samples")
            notes.append(f"calibration runs one sample at a time (batch size 1): input(s) "
                         f"{', '.join(sorted(repr(n) for n in data.unbatched))} have no sample axis and their "
                         f"values differ between samples")
            opts = dataclasses.replace(opts, batch_size=data.max_batch)
    shapes, shape_notes = resolve_input_shapes(specs, named, data.sample_shapes if data is not None else None)
    notes = [n for n in notes if n] + shape_notes
    infos = infer_tensor_info(bn_fold.model, shapes)
    job = _Job(opts, opts.resolved_method(), source, bn_fold.model, specs, data, shapes, infos,
               fixed, timing)
    return job, bn_fold, notes


def _named_shapes(given: Mapping[str, tuple[int, ...]], specs) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values by input name; bare dims (name ``""``) name the only input."""
    shapes = dict(given)
    if "" in shapes:
        if len(specs) != 1:
            raise OptionError(f"--input-shape {','.join(map(str, shapes['']))}: bare dims need a single-input "
                              f"model; this one has inputs {', '.join(s.name for s in specs)}: give NAME:D0,D1,...")
        shapes[specs[0].name] = shapes.pop("")
    return shapes


class Selected(NamedTuple):
    """The layers that go on to be planned, each candidate's selection record, and the layers
    kept regular with the reason."""

    layers: list[ConvLayer]
    selection: list[Selection]
    skipped: list[Refused]


def _budget_planner(job: _Job, layers: list[ConvLayer]) -> tuple[Planner, Sensitivities | None, Selected]:
    """Price the options, trace the error curves on held-out patches, probe each layer's
    sensitivity, and the mode's strategy (planning/strategies.py)."""
    opts = job.opts
    price = "latency" if opts.select == "latency" else "macs"
    selector = job.latency_selector() if price == "latency" else None
    profile = job.profiler() if price == "latency" else None
    t0, profiled = time.perf_counter(), job.timing.get("profiles", 0.0)
    priced, timed, without_options = price_options(job.work, layers, job.infos, price, selector, profile)
    job.add_time("pricing", time.perf_counter() - t0 - (job.timing.get("profiles", 0.0) - profiled))
    selected = Selected([layer for layer in layers if layer.name in priced.macs],
                        timed or [Selection(layer.name, layer.name in priced.macs, "--select all: priced by MACs")
                                  for layer in layers], without_options)
    cannot_pay = cannot_pay_reason(priced, opts.plan_mode())
    if cannot_pay:  # no curve pass, no probes, no rounds: nothing they could find would be used
        dropped = {layer.name for layer in selected.layers}
        selected = Selected([], [dataclasses.replace(s, rewritten=False, reason=f"{s.reason}; {cannot_pay}")
                                 if s.name in dropped else s for s in selected.selection],
                            selected.skipped + [Refused(layer.name, f"kept regular: {cannot_pay}")
                                                for layer in selected.layers])
    layers = selected.layers
    before = model_cost(job.work, job.infos).macs
    if opts.target_macs is not None:
        check_reachable(opts.target_macs, before, priced.macs)
    if opts.target_latency is not None:
        check_latency_reachable(opts.target_latency, priced.latency_ms or {})
    errors: dict[str, dict[int, float]] = {}
    sensitivities = None
    if layers:
        say("plan: error curves and sensitivity probes (symmetric pass)")
        wanted = {name: sorted(r for r in c if r != SKIP) for name, c in priced.macs.items()}
        # one probe per layer: that layer alone at its first offered option (the curve pass's
        # factors), on the held-out samples, run inside the pass (sensitivity.py)
        first = {layer.name: wanted[layer.name][0] for layer in layers}
        probes = SensitivityProbes(job.heldout_reference(), job.output_scales(), first, len(layers))
        t0 = time.perf_counter()
        calibrate_and_solve(job.work, layers, job.data, job.infos,
                            finite_stats_solver(curve_solver(errors, wanted, rounds=opts.solver_rounds,
                                                             ridge=opts.ridge)),
                            _calibration_options(opts, symmetric=True), fixed_batch=job.fixed_batch,
                            heldout=job.heldout_mask(), probe=probes)
        sensitivities = probes.finish(job.work, job.heldout_batches(), [layer.name for layer in layers])
        job.add_time("curve_pass", time.perf_counter() - t0 - sensitivities.seconds)
        job.add_time("sensitivity_probes", sensitivities.seconds)
    curves = layer_curves(layers, priced, errors, sensitivities.weights() if sensitivities else {})
    fixed = before - sum(c.option(SKIP).macs for c in curves)
    common = {"price": price, "curves": curves, "fixed_macs": fixed, "before_macs": before, "model_ms": priced.model_ms}
    planner: Planner
    if opts.evaluate is not None:  # the report's target: the default bound (the search has none)
        tolerance = parse_max_drop(DEFAULT_MAX_DROP if opts.max_drop is None else opts.max_drop)
        planner = TaskSearch(score=Scorer(opts.evaluate, job.add_time), tolerance=tolerance, source=job.source,
                             target=DEFAULT_MAX_ERROR, **common)
    elif opts.target_macs is not None:
        planner = TargetMacs(target=opts.target_macs, **common)
    elif opts.target_latency is not None:
        planner = TargetLatency(target=opts.target_latency, **common)
    else:
        planner = MaxError(target=opts.max_error or DEFAULT_MAX_ERROR, default=opts.default_plan,
                           unplanned=cannot_pay or "", **common)
    return planner, sensitivities, selected


def _calibration_options(opts: DecomposeOptions, symmetric: bool) -> CalibrationOptions:
    return CalibrationOptions(batch_size=opts.batch_size, positions=opts.positions, symmetric=symmetric,
                              seed=opts.seed)


def _solve_rewrite_verify(job: _Job, all_layers: list[ConvLayer], plan: Plan) -> SolvedRound:
    """Solve the plan's layers (calibrated in graph order with data), rewrite, merge pointwise pairs, verify."""
    layers = plan.rewritten(all_layers)
    solved = _solve_all(job, layers, plan.multipliers)
    for key, value in solved.timing.items():
        job.add_time(key, value)

    t0 = time.perf_counter()
    say("rewrite")
    # Each new pointwise conv is merged into a 1×1 conv it feeds (depthwise-only counterparts),
    # recovering the native structure.
    pw_fold, _ = rewrite_and_merge(job.work, [Replacement(layer, solved.factors[layer.name]) for layer in layers])
    new_model = pw_fold.model
    job.add_time("rewrite", time.perf_counter() - t0)

    # the input model's passes are timed on their own (reference_pass, heldout_reference)
    reference = job.heldout_reference() if job.data is not None and job.opts.verify else None
    t0 = time.perf_counter()
    check_model(new_model)
    check_finite_weights(job.source, new_model)
    verification = None
    if job.opts.verify:
        say("verify")
        if job.data is not None:
            batches = job.heldout_batches()
            what = "held-out calibration samples"
        else:
            batches = random_batches(job.specs, job.shapes, job.opts.seed)
            what = f"random inputs (seed {job.opts.seed})"
        verification = compare_models(job.source, new_model, batches, what, job.output_scales(), reference)
    job.add_time("verify", time.perf_counter() - t0)
    return SolvedRound(plan, layers, solved.factors, solved.heldout_errors, solved.patches, solved.calib_report,
                       new_model, pw_fold, verification)


def _report(job: _Job, bn_fold, chosen: SolvedRound, planner: Planner | None, skipped: list[Refused],
            selection: list[Selection], notes: list[str], start: float, evidence: PlanEvidence) -> Report:
    opts, work, infos = job.opts, job.work, job.infos
    new_model = chosen.model
    new_infos = infer_tensor_info(new_model, job.shapes)
    # MACs from the folded model (BN has none, and `infos` names its tensors), parameters
    # from the original (BN parameters included).
    before = ModelCost(model_cost(work, infos).macs, model_cost(job.source, {}).params)
    after = model_cost(new_model, new_infos)
    results = []
    for layer in chosen.layers:
        f = chosen.factors[layer.name]
        node = work.graph.node[layer.node_index]
        out_shape = infos[layer.output].shape if layer.output in infos else None
        positions = int(np.prod(out_shape[:1] + out_shape[2:])) if out_shape else 0
        if layer.name in chosen.heldout_errors:
            err, kind = chosen.heldout_errors[layer.name], "response"
        else:
            err, kind = relative_weight_error(layer.weight, f.dense_weight()), "weight"
        results.append(LayerResult(
            name=layer.name, weight_shape=layer.weight_shape, method=job.method,
            multiplier=chosen.plan.multipliers[layer.name], macs_before=node_macs(node, infos),
            macs_after=positions * f.macs_per_position(), rel_error=float(err), error_kind=kind,
            iterations=getattr(f, "iterations", 0), fallback_channels=getattr(f, "fallback_channels", ()),
            rank=f.first.shape[0] if isinstance(f, ChannelFactors) else None,
            patches=chosen.patches.get(layer.name)))
    timing = job.timing
    # The whole decompose call; reference_pass (onnxruntime's share of the plain pass that gives
    # the output scales) is part of it. The CLI adds ``wall``: process start to written files.
    timing["total"] = time.perf_counter() - start
    totals = ModelTotals(before.macs, after.macs, before.params, after.params,
                         model_byte_size(job.source), model_byte_size(new_model))
    if not chosen.layers:
        notes.append("no conv was rewritten; " + ("only BatchNormalization/Mul/Add were folded into convs"
                                                    if bn_fold.modified else "the output equals the input"))
    notes += [f"{r.name} not folded into its conv: {r.reason}" for r in bn_fold.refused]
    if planner is not None:
        notes += planner.notes(after.macs, rewritten=bool(chosen.layers))
    if job.data is None:
        notes.append("no calibration data: data-free SVD, no accuracy was checked on real inputs "
                     "(pass --calib for the data-driven, accuracy-bounded plan)")
    if job.selector is not None:
        sel = job.selector
        if sel.cache is not None:
            notes += sel.cache.notes
            hits, total = len(sel.cache_hits), len(sel.timings)
            loaded = sum(1 for t in sel.timings.values() if getattr(t, "loaded", False))
            fresh = f", {total - hits - loaded} measured now and stored" if total - hits - loaded else ""
            fresh += f", {loaded} measured under load and not stored" if loaded else ""
            notes.append(f"timing cache {sel.cache.path}: {hits} of {total} conv timing(s) read from it{fresh} "
                         f"(timings depend on the machine and its onnxruntime; --no-timing-cache measures afresh)")
        else:
            notes.append(f"no timing cache: {len(sel.timings)} conv timing(s) measured now; timings depend on the "
                         f"machine and its load, decisions near the threshold may differ between runs")
    budget = None
    if planner is not None:
        budget = plan_record(planner, evidence, after.macs, chosen.heldout_errors, chosen.patches)
    return Report(method=job.method, layers=tuple(results), skipped=tuple(skipped), model=totals,
                  verification=chosen.verification, timing_s=timing, notes=tuple(notes),
                  calibration=chosen.calib_report, options=opts.to_dict(job.shapes),
                  select=opts.select, selection=tuple(selection), folded=bn_fold.folds,
                  merged=chosen.merged.folds, budget=budget,
                  environment=environment(opts.providers, opts.threads or default_threads()),
                  memory_estimate=job.memory_estimate)


def _select_by_latency(job: _Job, layers: list[ConvLayer]) -> Selected:
    """The layers whose replacement onnxruntime runs faster (see timing/latency.py), timed as emitted
    (merged into a following 1×1 conv where it will be), with every layer's decision."""
    infos, method, opts, selector = job.infos, job.method, job.opts, job.latency_selector()
    merged = merged_channels(merge_targets(job.work, layers), infos)
    selected = Selected([], [], [])
    for k, layer in enumerate(layers):
        info = infos.get(layer.input)
        if info is None or info.shape is None:
            decision = Decision(False, "input shape unknown, latency not measured; --select all forces it")
        else:
            decision = time_option(selector, layer, info.shape, METHODS[method], opts.multiplier or 1,
                                   merged.get(layer.name, 0), f"{k + 1}/{len(layers)}")
        t = decision.timing
        selected.selection.append(Selection(layer.name, decision.rewrite, decision.reason,
                                            t.regular_ms if t else None, t.separable_ms if t else None))
        if decision.rewrite:
            selected.layers.append(layer)
        else:
            selected.skipped.append(Refused(layer.name, "kept regular: latency not measured" if t is None else
                                            f"kept regular: not ≥ {100 * MIN_GAIN:g} % faster in onnxruntime"))
    return selected


class _Solved(NamedTuple):
    factors: dict[str, SeparableFactors | ChannelFactors]
    heldout_errors: dict[str, float]
    patches: dict[str, int]  # fit patches per layer (calibrated layers only)
    calib_report: dict | None
    timing: dict[str, float]


def _solve_all(job: _Job, layers: list[ConvLayer], multipliers: dict[str, int]) -> _Solved:
    """Factors for ``layers`` (each at ``multipliers[name]``): calibrated in graph order with data,
    else one by one."""
    opts = job.opts
    method = METHODS[job.method]

    def solve(layer: ConvLayer, stats: LayerStats | None, *_heldout_error) -> SeparableFactors | ChannelFactors:
        return method.solve(layer, multipliers[layer.name], stats, rounds=opts.solver_rounds, ridge=opts.ridge)

    if job.data is None or not layers:
        t0 = time.perf_counter()
        factors = {}
        steps = Steps("solve: layer", len(layers))
        for k, layer in enumerate(layers):
            steps.step(k, layer.name)
            factors[layer.name] = solve(layer, None)
        return _Solved(factors, {}, {}, None, {"solve": time.perf_counter() - t0})
    # a layer solved in an earlier round against the same earlier layers at the same multipliers
    # (asymmetric statistics depend on them) is reused, not re-solved
    ordered = sorted(layers, key=lambda layer: layer.node_index)
    keys = {layer.name: tuple((earlier.name, multipliers[earlier.name]) for earlier in ordered[:k + 1])
            for k, layer in enumerate(ordered)}
    known = {} if opts.symmetric else {name: job.solved[key] for name, key in keys.items() if key in job.solved}
    outcome = calibrate_and_solve(
        job.work, layers, job.data, job.infos, finite_stats_solver(solve),
        _calibration_options(opts, opts.symmetric), fixed_batch=job.fixed_batch,
        heldout=job.heldout_mask(), known=known)
    job.solved.update({keys[name]: result for name, result in outcome.layers.items()})
    factors = {name: result.factors for name, result in outcome.layers.items()}
    errors = {name: result.heldout_error for name, result in outcome.layers.items()}
    patches = {name: result.stats_count for name, result in outcome.layers.items()}
    timing = {"calibration": sum(v for k, v in outcome.timing_s.items() if k != "solve"),
              "solve": outcome.timing_s["solve"]}
    calib_report = {"samples": outcome.samples, "heldout_samples": outcome.heldout_samples,
                    "positions": "all" if outcome.positions is None else outcome.positions,
                    "patches_per_layer": patches,
                    "symmetric": opts.symmetric, "spilled_bytes": outcome.spilled_bytes,
                    "timing_s": {k: round(v, 4) for k, v in outcome.timing_s.items()}}
    return _Solved(factors, errors, patches, calib_report, timing)
