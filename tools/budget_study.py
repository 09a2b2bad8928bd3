"""Budgeted per-layer multipliers vs one uniform multiplier on the trained MNIST model (issue #6).

Usage::

    python tools/budget_study.py [--calib-size 256] [--multiplier 2] [--max-error E ...] [--out-dir DIR]
                                 [--curve-iter N]

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
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from evaluate import evaluate

from onnx_dwdecomp import decompose, pipeline
from onnx_dwdecomp.modelio import save_model_atomic

MODEL = ROOT / "models/mnist/shufflenetv2_x0.5_regular.onnx"
CALIB = ROOT / "models/mnist/calib.npz"
TEST = ROOT / "models/mnist/test.npz"


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def curve_fidelity(budget: dict) -> dict:
    """Predicted (curve) vs measured (final) per-layer errors of the decomposed layers."""
    pairs = [(layer["predicted_error"], layer["measured_error"]) for layer in budget["layers"]
             if layer["multiplier"] != "skip" and layer["measured_error"]]
    if len(pairs) < 2:
        return {"layers": len(pairs)}
    pred, meas = map(np.asarray, zip(*pairs))
    ratio = meas / pred
    spearman = float(np.corrcoef(_ranks(pred), _ranks(meas))[0, 1])
    return {"layers": len(pairs), "median_ratio": float(np.median(ratio)), "min_ratio": float(ratio.min()),
            "max_ratio": float(ratio.max()), "spearman": spearman}


def run(label: str, out_dir: Path, calib: dict, **options) -> dict:
    t0 = time.perf_counter()
    model, report = decompose(str(MODEL), calib=calib, exclude=("/conv1/*",), select="all", **options)
    seconds = time.perf_counter() - t0
    path = out_dir / f"{label}.onnx"
    save_model_atomic(model, path, external_data=False)
    m = report.model
    row = {"label": label, "options": options, "top1": evaluate(path, TEST), "macs": m.macs_after, "macs_before": m.macs_before,
        "rel_l2": report.verification.worst_rel_l2(), "seconds": seconds, "budget": report.budget,
        "multipliers": [layer.multiplier for layer in report.layers]}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--multiplier", type=int, default=2)
    p.add_argument("--max-error", type=float, nargs="*", default=[])
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--curve-iter", type=int, help="L-BFGS rounds per multiplier for the error curves "
                                                  "(default: pipeline.CURVE_ITER)")
    args = p.parse_args(argv)
    if args.curve_iter is not None:
        pipeline.CURVE_ITER = args.curve_iter
    with np.load(CALIB) as z:
        calib = {"input": z["input"][:args.calib_size]}
    with tempfile.TemporaryDirectory(prefix="budget_study_") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [run(f"uniform_r{args.multiplier}", out_dir, calib, multiplier=args.multiplier)]
        fraction = rows[0]["macs"] / rows[0]["macs_before"]
        rows.append(run("target_macs", out_dir, calib, target_macs=fraction))
        for e in args.max_error:
            rows.append(run(f"max_error_{e:g}", out_dir, calib, max_error=e))
    base = rows[0]["macs_before"]
    print(f"MNIST ShuffleNet V2 x0.5 regular counterpart, {args.calib_size} calibration images "
          f"(first {args.calib_size} of calib.npz), stem excluded, --select all; top-1 on test.npz "
          f"(1,000 digits); rel. L2: verification on the held-out calibration samples.\n")
    print("| run | top-1 | MACs | MACs fraction | output rel. L2 | per-layer r | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        opts = ", ".join(f"--{k.replace('_', '-')} {v:.4g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                         for k, v in r["options"].items())
        mults = r["budget"] and [lay["multiplier"] for lay in r["budget"]["layers"]] or r["multipliers"]
        counts = {}
        for m in mults:
            counts[m] = counts.get(m, 0) + 1
        spread = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
        met = "" if not r["budget"] else (" (met)" if r["budget"]["met"] else " (NOT met)")
        print(f"| {opts}{met} | {100 * r['top1']:.1f} % | {r['macs'] / 1e6:.3f} M | {r['macs'] / base:.4f} | "
              f"{r['rel_l2']:.4f} | {spread} | {r['seconds']:.0f} s |")
    for r in rows[1:]:
        b = r["budget"]
        fid = curve_fidelity(b)
        print(f"\n{r['label']}: predicted output rel. L2 {b['predicted_output_rel_l2']:.4f} "
              f"(κ {b['kappa']:.3g}, probe κ {b['probe_kappa']:.3g}, Σ e {b['predicted_error_sum']:.4f}), "
              f"measured {b['measured_output_rel_l2']:.4f}; rounds {len(b['rounds'])}; curve vs final "
              f"per-layer error over {fid['layers']} layers: " + (
                  f"final/predicted median {fid['median_ratio']:.2f} (range {fid['min_ratio']:.2f}–"
                  f"{fid['max_ratio']:.2f}), Spearman {fid['spearman']:.2f}" if "spearman" in fid else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
