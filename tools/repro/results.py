"""The plain data of one reproduction: every number RESULTS.md shows, and the lookups on it.

Plain dataclasses, so rendering, claims and plots are testable without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from budget_study import budget_met, row_multipliers

from .config import CALIB_SIZES, MULTIPLIERS, SVD


@dataclass
class RunResult:
    """One ``decompose`` run: top-1, per-layer held-out errors, cost, wall time."""

    config: str
    calib_size: int | None
    multiplier: int
    top1: float
    layer_errors: dict[str, float]
    macs: int
    params: int
    seconds: float
    path: str = ""


@dataclass
class BudgetRow:
    """One run of the budget comparison (issue #6): a ``tools/budget_study.py`` row, plain data."""

    config: str  # a BUDGET_CONFIGS key
    calib_size: int
    top1: float
    macs: int
    macs_before: int
    rel_l2: float | None  # worst output rel. L2 of decompose's verification (held-out samples)
    multipliers: dict[str, int | str]  # layer -> multiplier, "skip" = kept regular by the budget
    layer_errors: dict[str, float]  # layer -> held-out rel_error (decomposed layers)
    met: bool | None  # the report's budget verdict; None: no budget (uniform multiplier)
    target: float | None = None  # target_macs fraction or max_error bound
    predicted_rel_l2: float | None = None  # the budget's prediction of the output rel. L2
    rounds: int | None = None  # solve + verify rounds (max_error)
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.macs / self.macs_before if self.macs_before else float("nan")


def budget_row(row: dict, calib_size: int) -> BudgetRow:
    """A ``budget_study.run`` row (a dict) as a :class:`BudgetRow`."""
    budget = row.get("budget") or {}
    return BudgetRow(config=row["label"], calib_size=int(calib_size), top1=float(row["top1"]),
                     macs=int(row["macs"]), macs_before=int(row["macs_before"]),
                     rel_l2=None if row.get("rel_l2") is None else float(row["rel_l2"]),
                     multipliers=row_multipliers(row), layer_errors=dict(row.get("layer_errors", {})),
                     met=budget_met(row), target=budget.get("target"),
                     predicted_rel_l2=budget.get("predicted_output_rel_l2"),
                     rounds=len(budget["rounds"]) if budget.get("rounds") is not None else None,
                     seconds=float(row.get("seconds", 0.0)))


@dataclass
class BenchRow:
    label: str
    macs: int
    params: int
    median_ms: float
    p90_ms: float
    batch_size: int = 1


@dataclass
class Results:
    """Every number RESULTS.md shows (plain data, so rendering is testable without running)."""

    command: str
    date: str
    machine: dict[str, str]
    seconds: float
    regular_top1: float
    standard_top1: float
    layers: list[str]
    layer_shapes: dict[str, tuple[int, ...]]
    layer_macs: dict[str, dict[str, int]]  # layer -> {"regular", "sep_r1", "chan_r1", ...}
    isolated: dict[tuple[str, str, int], float]  # (layer, method key, r) -> error; "svd_weight": ‖W−Ŵ‖²/‖W‖²
    runs: list[RunResult]
    finetune: dict[str, float]  # config key -> top-1 after fine-tune (calib 512, r=1)
    finetune_info: dict[str, object]
    bench: list[BenchRow]
    bench_info: dict[str, object]
    calib_sizes: tuple[int, ...] = CALIB_SIZES
    multipliers: tuple[int, ...] = MULTIPLIERS
    notes: list[str] = field(default_factory=list)
    budget_rows: list[BudgetRow] = field(default_factory=list)  # issue #6, see BUDGET_CONFIGS
    budget_option: bool = False  # the package has per-layer budgets (DecomposeOptions.target_macs)

    def run(self, config: str, calib_size: int | None, multiplier: int = 1) -> RunResult | None:
        for r in self.runs:
            if r.config == config and r.multiplier == multiplier and (
                    r.calib_size == calib_size or (config == SVD.key)):
                return r
        return None

    def top1(self, config: str, calib_size: int | None, multiplier: int = 1) -> float | None:
        r = self.run(config, calib_size, multiplier)
        return None if r is None else r.top1
