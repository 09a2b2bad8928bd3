"""Configuration of the reproduction: MNIST models and data, seeds, decomposition and budget configs.

What the reproduction runs on and with: the MNIST models and data, seeds, the decomposition
configurations and the per-layer budget configurations, and the ``decompose`` options of one run.

Also the one place for the MNIST paths, the stem exclusion and the data seed of the other MNIST
studies (``tools/budget_study.py``, ``tools/accuracy_study.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "mnist"
REGULAR = MODELS / "shufflenetv2_x0.5_regular.onnx"
STANDARD = MODELS / "shufflenetv2_x0.5.onnx"
CALIB = MODELS / "calib.npz"
TEST = MODELS / "test.npz"

EXCLUDE = ("/conv1/*",)  # the 3-channel stem gains nothing from decomposition
#: Whole-network calibration sizes; 256 is the size issue #3's accuracy target is stated at.
CALIB_SIZES = (32, 128, 256, 512)
MULTIPLIERS = (1, 2)
SEED = 0
DATA_SEED = 0  # tools/train.py --seed 0 made models/mnist: the same train/test split
HOLDOUT = 0.1  # decompose's held-out share (calibration.holdout.HOLDOUT_FRACTION)
#: Two top-1 values on the 1,000 test digits at most this far apart (points) are a tie: the
#: binomial standard error at 98 % is 0.44 points.
TIE_POINTS = 0.5
BENCH_BATCHES = (1, 32)


@dataclass(frozen=True)
class MethodConfig:
    """One way of decomposing: a ``decompose`` method plus its symmetric flag."""

    key: str
    label: str
    method: str
    symmetric: bool = False
    data_free: bool = False


SVD = MethodConfig("svd", "svd (data-free)", "svd", data_free=True)
GSVD_SYM = MethodConfig("gsvd_sym", "gsvd, symmetric", "gsvd", symmetric=True)
GSVD_ASYM = MethodConfig("gsvd_asym", "gsvd, asymmetric", "gsvd")
CHANNEL = MethodConfig("channel", "channel decomposition", "channel")
METHOD_CONFIGS = (SVD, GSVD_SYM, GSVD_ASYM, CHANNEL)
#: The isolated single-layer setting has x̂ = x, so symmetric and asymmetric gsvd coincide.
ISOLATED_KEYS = ("svd", "gsvd", "channel")

# Per-layer multiplier budgets (issue #6): tools/budget_study.py's `study` runs, for each N of
# BUDGET_CALIB_SIZES, gsvd (asymmetric) at uniform multiplier BUDGET_MULTIPLIER, then
# `target_macs` = the MACs fraction that run reached, then `max_error` = BUDGET_MAX_ERROR; its row
# labels are the keys below. `results.budget_row` turns its rows into `BudgetRow`s
# (Results.budget_rows), `render.render_budget_section` renders them. To add a configuration,
# extend `budget_study.study` and list its label here.
BUDGET_MULTIPLIER = 2
BUDGET_MAX_ERROR = 0.05
BUDGET_CALIB_SIZES = (256, 512)
BUDGET_CONFIGS: tuple[MethodConfig, ...] = (
    MethodConfig(f"uniform_r{BUDGET_MULTIPLIER}", f"uniform multiplier {BUDGET_MULTIPLIER}", "gsvd"),
    MethodConfig("target_macs", f"`target_macs` = uniform r={BUDGET_MULTIPLIER}'s MACs fraction", "gsvd"),
    MethodConfig(f"max_error_{BUDGET_MAX_ERROR:g}", f"`max_error` = {BUDGET_MAX_ERROR:g}", "gsvd"),
)


def decompose_options(cfg: MethodConfig, calib: str | os.PathLike | None, calib_size: int | None,
                      multiplier: int, supported: Iterable[str] | None = None,
                      include: tuple[str, ...] = ()) -> dict:
    """Keyword arguments of ``onnx_dwdecomp.decompose`` for one run.

    ``supported`` (the field names of ``DecomposeOptions``) switches on options that only newer
    versions have: ``select="all"`` rewrites every candidate (no timing-based, machine-dependent
    layer selection), so every method decomposes the same 19 layers.
    """
    opts = {"method": cfg.method, "multiplier": int(multiplier), "exclude": EXCLUDE, "seed": SEED,
            "verify": False}
    if include:
        opts["include"] = tuple(include)
    if calib is not None:
        opts["calib"] = str(calib)
        if calib_size is not None:
            opts["calib_size"] = int(calib_size)
        if cfg.symmetric:
            opts["symmetric"] = True
    if supported is not None and "select" in set(supported):
        opts["select"] = "all"
    return opts
