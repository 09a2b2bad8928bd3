"""Run the reproduction's experiments: single-layer errors, ``decompose`` runs with top-1, latency.

The experiments of the reproduction: isolated single-layer errors, ``decompose`` runs with
their top-1, and the latency benchmark; each returns plain data for :mod:`.results`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from evaluate import evaluate
from onnx import helper
from provenance import machine_info

from .config import (
    BENCH_BATCHES,
    CALIB,
    EXCLUDE,
    HOLDOUT,
    ISOLATED_KEYS,
    REGULAR,
    SEED,
    TEST,
    MethodConfig,
    decompose_options,
)
from .formatting import fmt_count, fmt_pct, short_layer_name
from .results import BenchRow, RunResult


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float tensors ``names`` (shape unspecified)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


def isolated_layer_errors(model_path: Path, calib_path: Path, calib_size: int,
                          multipliers: Sequence[int], include: tuple[str, ...] = (), say=print):
    """(a, isolated) Per layer, decomposed alone: held-out response error of svd / gsvd / channel.

    Uses the package's candidate finder, patch extraction, moment sums, hold-out split and
    solvers; the inputs of every layer come from one onnxruntime pass of the original model.
    Returns (layers, shapes, macs per position dict, errors dict).
    """
    from onnx_dwdecomp.calibration.holdout import split_holdout
    from onnx_dwdecomp.calibration.moments import MomentSums
    from onnx_dwdecomp.calibration.patches import extract_patches, output_hw
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.pipeline import reference_pass
    from onnx_dwdecomp.runtime import make_session
    from onnx_dwdecomp.shapes import graph_inputs
    from onnx_dwdecomp.solve import (
        channel_factors,
        channel_rank,
        gsvd_factors,
        relative_response_error,
        relative_weight_error,
        svd_factors,
    )

    model = onnx.load(str(model_path))
    layers = list(find_candidates(model, tuple(include), EXCLUDE).layers)
    with np.load(calib_path) as data:
        x = np.ascontiguousarray(data["input"][:calib_size], dtype=np.float32)
    n = len(x)
    # the split decompose makes: spread over the original outputs' energy
    energy = reference_pass(model, load_calibration(x, graph_inputs(model)), 32, None).energy
    held = split_holdout(n, HOLDOUT, SEED, energy)
    sess = make_session(with_outputs(model, [ly.input for ly in layers]), optimize=False)
    names = [ly.input for ly in layers]
    acts: dict[str, list[np.ndarray]] = {nm: [] for nm in names}
    for start in range(0, n, 64):
        for nm, value in zip(names, sess.run(names, {sess.get_inputs()[0].name: x[start:start + 64]})):
            acts[nm].append(value)
    errors: dict[tuple[str, str, int], float] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    macs: dict[str, dict[str, int]] = {}
    for k, ly in enumerate(layers):
        t0 = time.perf_counter()
        xin = np.concatenate(acts.pop(ly.input), axis=0)
        oh, ow = output_hw(ly, xin.shape[2:])
        positions = np.broadcast_to(np.arange(oh * ow), (n, oh * ow))
        patches = extract_patches(xin, ly, positions)
        rows = np.repeat(held, oh * ow)
        fit, check = MomentSums(ly.weight), MomentSums(ly.weight)
        fit.add(patches[~rows], patches[~rows])
        check.add(patches[rows], patches[rows])
        fit_stats, check_stats = fit.stats(), check.stats()
        w, b = ly.weight, ly.bias
        nout, cin, kh, kw = w.shape
        shapes[ly.name] = tuple(w.shape)
        macs[ly.name] = {"regular": oh * ow * nout * cin * kh * kw}
        for r in multipliers:
            facs = {"svd": svd_factors(w, b, r), "gsvd": gsvd_factors(w, b, fit_stats, r),
                    "channel": channel_factors(w, b, channel_rank(w.shape, r), fit_stats)}
            for key, f in facs.items():
                errors[(ly.name, key, r)] = float(
                    relative_response_error(w, b, f, check_stats))
            # svd's own objective, for the discussion: how far the weights are from rank r per channel
            errors[(ly.name, "svd_weight", r)] = float(relative_weight_error(w, facs["svd"].dense_weight()))
            macs[ly.name][f"sep_r{r}"] = oh * ow * facs["gsvd"].macs_per_position()
            macs[ly.name][f"chan_r{r}"] = oh * ow * facs["channel"].macs_per_position()
        say(f"  isolated {k + 1}/{len(layers)} {short_layer_name(ly.name)}: "
            + ", ".join(f"{key} r{r} {errors[(ly.name, key, r)]:.2e}" for r in multipliers for key in ISOLATED_KEYS)
            + f" ({time.perf_counter() - t0:.1f} s)")
    return [ly.name for ly in layers], shapes, macs, errors


def run_decompose(cfg: MethodConfig, calib_size: int, multiplier: int, work: Path, threads: int,
                  include: tuple[str, ...] = (), say=print) -> tuple[RunResult, onnx.ModelProto]:
    """One ``decompose`` run with ``calib_size`` images.

    svd gets calibration data too: its factors ignore the data (the model is the data-free one),
    but the report then carries held-out response errors. ``RunResult.calib_size`` is None for
    the data-free method.
    """
    import onnx_dwdecomp
    from onnx_dwdecomp.pipeline import DecomposeOptions

    supported = [f.name for f in dataclasses.fields(DecomposeOptions)]
    opts = decompose_options(cfg, CALIB, calib_size, multiplier, supported, include)
    t0 = time.perf_counter()
    model, report = onnx_dwdecomp.decompose(str(REGULAR), **opts)
    seconds = time.perf_counter() - t0
    path = work / f"{cfg.key}_n{calib_size}_r{multiplier}.onnx"
    onnx.save(model, str(path))
    top1 = evaluate(path, TEST, batch_size=100, threads=threads)
    errors = {ly.name: float(ly.rel_error) for ly in report.layers}
    res = RunResult(cfg.key, None if cfg.data_free else calib_size, multiplier, top1, errors,
                    int(report.model.macs_after), int(report.model.params_after), seconds, str(path))
    say(f"  {cfg.label:<24} N={calib_size:>4} r={multiplier}: top-1 "
        f"{fmt_pct(top1, 2)}, {len(errors)} layers, {fmt_count(res.macs)} MACs ({seconds:.0f} s)")
    return res, model


def run_bench_models(paths: Sequence[tuple[str, Path]], threads: int, runs: int, warmup: int,
                     batch_sizes: Sequence[int] = BENCH_BATCHES):
    from onnx_dwdecomp.bench import run_bench

    load = machine_info()["loadavg"]
    results = run_bench([p for _, p in paths], batch_sizes=tuple(batch_sizes), threads=threads, runs=runs,
                        warmup=warmup, seed=SEED)
    labels = [label for label, _ in paths] * len(batch_sizes)  # run_bench is batch-size-major
    rows = [BenchRow(label, r.macs, r.params, r.median_ms, r.p90_ms, r.batch_size)
            for label, r in zip(labels, results)]
    info = {"threads": threads, "runs": runs, "warmup": warmup,
            "batch_size": " and ".join(map(str, batch_sizes)), "loadavg": load,
            "onnxruntime": machine_info()["onnxruntime"]}
    return rows, info
