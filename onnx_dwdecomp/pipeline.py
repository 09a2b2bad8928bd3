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
from .calibrate import CalibrationOptions, calibrate_and_solve
from .candidates import ConvLayer, Skipped, find_candidates
from .errors import OptionError
from .fold import fold_batchnorm, fold_pointwise
from .latency import MIN_GAIN, Decision, LatencySelector
from .modelio import LoadedModel, load_model
from .report import LayerResult, ModelTotals, Report, Selection
from .rewrite import Replacement, apply_replacements
from .runtime import make_session
from .shapes import (ModelCost, graph_inputs, infer_tensor_info, model_cost, node_macs,
                     resolve_input_shapes)
from .solve import (ChannelFactors, LayerStats, SeparableFactors, channel_factors, channel_rank,
                    check_multiplier, gsvd_factors, relative_weight_error, svd_factors)
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

    calib_report = None
    heldout_errors: dict[str, float] = {}
    factors: dict[str, SeparableFactors | ChannelFactors] = {}
    verify_batches = None
    t0 = time.perf_counter()
    if data is not None and layers:
        fixed = specs[0].shape[0] if specs and specs[0].shape and specs[0].shape[0] else None
        calib_opts = CalibrationOptions(batch_size=opts.batch_size, positions=opts.positions,
                                        symmetric=opts.symmetric, seed=opts.seed)
        outcome = calibrate_and_solve(
            work, layers, data, infos,
            lambda layer, stats: _solve_layer(layer, method, opts.multiplier, stats),
            calib_opts, fixed_batch=fixed, progress=say)
        for name, result in outcome.layers.items():
            factors[name] = result.factors
            heldout_errors[name] = result.heldout_error
        verify_batches = _batches(outcome.heldout_inputs, fixed or opts.batch_size, fixed)
        timing["calibration"] = timing.get("calibration", 0.0) + sum(
            v for k, v in outcome.timing_s.items() if k != "solve")
        timing["solve"] = outcome.timing_s["solve"]
        t_ref = time.perf_counter()
        _reference_forward(source, data, opts.batch_size, fixed)
        timing["reference_forward"] = time.perf_counter() - t_ref
        calib_report = {"samples": outcome.samples, "heldout_samples": outcome.heldout_samples,
                        "positions": "all" if outcome.positions is None else outcome.positions,
                        "symmetric": opts.symmetric, "spilled_bytes": outcome.spilled_bytes,
                        "timing_s": {k: round(v, 4) for k, v in outcome.timing_s.items()}}
    else:
        for k, layer in enumerate(layers):
            say(f"solve: layer {k + 1}/{len(layers)} {layer.name}")
            factors[layer.name] = _solve_layer(layer, method, opts.multiplier, None)
        timing["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("rewrite")
    new_model = apply_replacements(work, [Replacement(layer, factors[layer.name]) for layer in layers])
    # The second conv of each replacement writes the layer's output tensor; merge it into a
    # 1×1 conv it feeds (depthwise-only counterparts), recovering the native structure.
    producer = {out: node.name for node in new_model.graph.node for out in node.output}
    pw_fold = fold_pointwise(new_model, [producer[layer.output] for layer in layers])
    new_model = pw_fold.model
    timing["rewrite"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    check_model(new_model)
    verification = None
    if opts.verify:
        say("verify")
        if verify_batches is None:
            verify_batches = random_batches(specs, shapes, opts.seed)
            what = f"random inputs (seed {opts.seed})"
        else:
            what = "held-out calibration samples"
        verification = compare_models(source, new_model, verify_batches, what)
    timing["verify"] = time.perf_counter() - t0

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
            name=layer.name, weight_shape=layer.weight_shape, method=method, multiplier=opts.multiplier,
            macs_before=macs_before, macs_after=positions * f.macs_per_position(), rel_error=float(err),
            error_kind=kind, iterations=getattr(f, "iterations", 0),
            fallback_channels=getattr(f, "fallback_channels", ()),
            rank=f.first.shape[0] if isinstance(f, ChannelFactors) else None))
    timing["total"] = time.perf_counter() - start
    totals = ModelTotals(before.macs, after.macs, before.params, after.params,
                         source.ByteSize(), new_model.ByteSize())
    if not layers:
        notes.append("no conv was rewritten; " + ("only BatchNormalization/Mul/Add were folded into convs"
                                                    if bn_fold.modified else "the output equals the input"))
    notes += [f"{r.node} not folded into its conv: {r.reason}" for r in bn_fold.refused]
    if opts.select == "latency":
        notes.append("latency selection timed each conv configuration in onnxruntime on this machine; "
                     "results depend on the machine and its load (--select all for a reproducible output)")
    report = Report(method=method, layers=tuple(results), skipped=tuple(skipped), model=totals,
                    verification=verification, timing_s=timing, notes=tuple(notes),
                    calibration=calib_report, options=_options_dict(opts, shapes),
                    select=opts.select, selection=tuple(selection), folded=bn_fold.folds,
                    merged=pw_fold.folds)
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
        session.run(None, b.feeds)


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
    }

