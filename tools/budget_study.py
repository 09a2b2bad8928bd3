"""Budgeted per-layer multipliers vs one uniform multiplier on the trained MNIST model (issue #6).

Usage::

    python tools/budget_study.py [--calib-size 256] [--multiplier 2] [--max-error E ...] [--out-dir DIR]

1. Decompose ``models/mnist/shufflenetv2_x0.5_regular.onnx`` (stem excluded, ``--select all``,
   the first ``--calib-size`` images of ``calib.npz``) at uniform ``--multiplier`` and note the
   MACs fraction it reaches.
2. Decompose again with ``--target-macs`` set to that fraction.
3. Optionally (``--max-error``) decompose with each error bound.
4. Top-1 of each model on ``test.npz`` (``tools/evaluate.py``), MACs, verification rel. L2 on the
   held-out calibration samples, and a markdown table; then, for the budgeted run, how close
   the error curves (symmetric statistics, GSVD sweep only, fit samples) came to the final
   per-layer errors (asymmetric, L-BFGS, held-out samples): median ratio and rank correlation.

numpy + onnxruntime + the package only; the models go to a private temporary folder unless
``--out-dir`` is given. Deterministic for the seed (``--select all``).

Importable (``tools/reproduce.py`` renders its budget section from :func:`study`): :func:`run`
(one decompose + evaluation, a plain dict), :func:`study` (the uniform / ``target_macs`` /
``max_error`` sequence) and the pure helpers :func:`row_multipliers`, :func:`multiplier_counts`,
:func:`format_counts`, :func:`budget_met`, :func:`curve_fidelity`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from evaluate import evaluate
from repro.config import CALIB, EXCLUDE, REGULAR, TEST

from onnx_dwdecomp import decompose
from onnx_dwdecomp.modelio import save_model_atomic

SKIP = "skip"  # a layer the budget kept regular (report.budget's spelling)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def curve_fidelity(budget: dict) -> dict:
    """Predicted (curve) vs measured (final) per-layer errors of the decomposed layers."""
    pairs = [(layer["predicted_error"], layer["measured_error"]) for layer in budget["layers"]
             if layer["multiplier"] != SKIP and layer["measured_error"]]
    if len(pairs) < 2:
        return {"layers": len(pairs)}
    pred, meas = map(np.asarray, zip(*pairs))
    ratio = meas / pred
    spearman = float(np.corrcoef(_ranks(pred), _ranks(meas))[0, 1])
    return {"layers": len(pairs), "median_ratio": float(np.median(ratio)), "min_ratio": float(ratio.min()),
            "max_ratio": float(ratio.max()), "spearman": spearman}


# ---------------------------------------------------------------------------- pure helpers

def row_multipliers(row: Mapping) -> dict[str, int | str]:
    """Layer name -> multiplier of one :func:`run` row; ``"skip"`` = kept regular by the budget.

    A budgeted row takes the budget's per-layer choice (it lists every candidate, skipped ones
    too); a uniform row the report's decomposed layers.
    """
    budget = row.get("budget")
    if budget:
        return {layer["name"]: layer["multiplier"] for layer in budget["layers"]}
    return dict(row.get("layer_multipliers", {}))


def multiplier_counts(multipliers: Iterable[int | str]) -> dict[int | str, int]:
    """How many layers got each multiplier, multipliers ascending, ``"skip"`` last."""
    counts: dict[int | str, int] = {}
    for m in multipliers:
        counts[m] = counts.get(m, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == SKIP, kv[0] if kv[0] != SKIP else 0)))


def format_counts(counts: Mapping[int | str, int]) -> str:
    """{1: 9, 3: 2, 'skip': 1} -> 'r=1: 9, r=3: 2, regular: 1' (layers per multiplier)."""
    return ", ".join(("regular" if k == SKIP else f"r={k}") + f": {v}" for k, v in counts.items()) or "—"


def budget_met(row: Mapping) -> bool | None:
    """The report's verdict on the budget; None for a run without one."""
    budget = row.get("budget")
    return None if not budget else budget.get("met")


def format_options(options: Mapping) -> str:
    """{'target_macs': 0.37225} -> '--target-macs 0.3723' (the CLI spelling)."""
    return ", ".join(f"--{k.replace('_', '-')} {v:.4g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                     for k, v in options.items())


# ---------------------------------------------------------------------------- runs

def run(label: str, out_dir: Path, calib, *, model: Path = REGULAR, test: Path = TEST,
        exclude: tuple[str, ...] = EXCLUDE, threads: int | None = None, **options) -> dict:
    """One ``decompose`` (``select="all"``, verification on) of ``model``, saved and evaluated.

    ``options`` go to ``decompose`` (multiplier, target_macs, max_error, calib_size, seed, ...)
    and are kept in the row (``"options"``) minus the bookkeeping ones.
    """
    t0 = time.perf_counter()
    result_model, report = decompose(str(model), calib=calib, exclude=exclude, select="all", **options)
    seconds = time.perf_counter() - t0
    path = out_dir / f"{label}.onnx"
    save_model_atomic(result_model, path, external_data=False)
    m = report.model
    shown = {k: v for k, v in options.items() if k in ("multiplier", "target_macs", "max_error")}
    return {"label": label, "options": shown, "top1": evaluate(path, test, threads=threads),
            "macs": m.macs_after, "macs_before": m.macs_before, "params": m.params_after,
            "rel_l2": report.verification.worst_rel_l2() if report.verification is not None else None,
            "seconds": seconds, "budget": report.budget, "path": str(path),
            "multipliers": [layer.multiplier for layer in report.layers],
            "layer_multipliers": {layer.name: layer.multiplier for layer in report.layers},
            "layer_errors": {layer.name: float(layer.rel_error) for layer in report.layers}}


def study(calib, out_dir: Path, multiplier: int = 2, max_errors: Iterable[float] = (),
          say: Callable[[str], None] | None = None, **common) -> list[dict]:
    """Uniform ``multiplier``; ``target_macs`` = the MACs fraction that reached; each ``max_error``.

    Rows labelled ``uniform_r{multiplier}``, ``target_macs``, ``max_error_{e:g}``; ``common``
    goes to every :func:`run` (calib_size, seed, include, threads, ...).
    """
    def done(row: dict) -> dict:
        if say is not None:
            say(f"  {row['label']:<16} top-1 {100 * row['top1']:.2f} %, MACs {row['macs'] / row['macs_before']:.4f}"
                f" of the original, output rel. L2 {row['rel_l2']:.4f}, "
                f"{format_counts(multiplier_counts(row_multipliers(row).values()))} ({row['seconds']:.0f} s)")
        return row

    rows = [done(run(f"uniform_r{multiplier}", out_dir, calib, multiplier=multiplier, **common))]
    fraction = rows[0]["macs"] / rows[0]["macs_before"]
    rows.append(done(run("target_macs", out_dir, calib, target_macs=fraction, **common)))
    for e in max_errors:
        rows.append(done(run(f"max_error_{e:g}", out_dir, calib, max_error=e, **common)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--multiplier", type=int, default=2)
    p.add_argument("--max-error", type=float, nargs="*", default=[])
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args(argv)
    with np.load(CALIB) as z:
        calib = {"input": z["input"][:args.calib_size]}
    with tempfile.TemporaryDirectory(prefix="budget_study_") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = study(calib, out_dir, args.multiplier, args.max_error)
    base = rows[0]["macs_before"]
    print(f"MNIST ShuffleNet V2 x0.5 regular counterpart, {args.calib_size} calibration images "
          f"(first {args.calib_size} of calib.npz), stem excluded, --select all; top-1 on test.npz "
          f"(1,000 digits); rel. L2: verification on the held-out calibration samples.\n")
    print("| run | top-1 | MACs | MACs fraction | output rel. L2 | per-layer r | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        met = budget_met(r)
        met = "" if met is None else (" (met)" if met else " (NOT met)")
        spread = format_counts(multiplier_counts(row_multipliers(r).values()))
        print(f"| {format_options(r['options'])}{met} | {100 * r['top1']:.1f} % | {r['macs'] / 1e6:.3f} M | "
              f"{r['macs'] / base:.4f} | {r['rel_l2']:.4f} | {spread} | {r['seconds']:.0f} s |")
    for r in rows[1:]:
        b = r["budget"]
        fid = curve_fidelity(b)
        print(f"\n{r['label']}: predicted output rel. L2 {b['predicted_output_rel_l2']:.4f} "
              f"(interaction scale α {b['interaction_scale']:.3g}, Σ s·e {b['predicted_error_sum']:.4f}), "
              f"measured {b['measured_output_rel_l2']:.4f}; rounds {len(b['rounds'])}; curve vs final "
              f"per-layer error over {fid['layers']} layers: " + (
                  f"final/predicted median {fid['median_ratio']:.2f} (range {fid['min_ratio']:.2f}–"
                  f"{fid['max_ratio']:.2f}), Spearman {fid['spearman']:.2f}" if "spearman" in fid else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
