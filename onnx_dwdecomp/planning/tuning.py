r"""Task-aware tuning: the fastest plan whose score, by the user's own metric, stays within a tolerance.

Output error is a proxy: PP-OCR's text detector keeps IoU 0.953 at output error 0.19, while
another detector's box F1 fell to 0.87 at 0.03. Only the user's metric says how much error a
model tolerates. As in Intel Neural Compressor (``eval_func`` + ``accuracy_criterion``) the user
gives ``evaluate(model_path) -> float`` (higher is better) and a tolerated drop
(:class:`Tolerance`: absolute, or relative to the input model's score; default 1 % relative).

The search
----------
1. The input model is scored once: ``s₀``; a plan is *within tolerance* when its score is at
   least ``s₀ − allowed``.
2. Candidates are the distinct allocations of the frontier (:func:`candidate_allocations`):
   the least-price plan for each output error bound on a geometric ladder, built from the
   per-layer curves and sensitivities — so the plans grow by adding the least sensitive convs
   first. They are ordered by predicted output error, which (with the price) grows along the
   list.
3. Scores are taken to fall, roughly, as the predicted error grows: a binary search over the
   list (:class:`Bisection`) finds the last candidate within tolerance in
   ``⌈log₂(n + 1)⌉`` evaluations; each evaluated candidate is solved, rewritten and verified
   like a --max-error round. At most :data:`MAX_EVALUATIONS` calls of ``evaluate`` in all,
   the input model's included; every score is in the report.
4. The result is the fastest evaluated candidate within tolerance (the search's lower end);
   none → the all-regular model, with the reason.

strategies.TaskSearch runs the search; :class:`Scorer` calls the user's function on a model,
each call an :class:`Evaluation` in the report.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import EvaluationError, OptionError
from ..modelio import save_model_atomic
from ..progress import say
from ..usercode import display_name
from .budget import SKIP, Allocation, LayerCurve, allocate_error

#: Calls of the user's evaluate function per job at most, the input model's included.
MAX_EVALUATIONS = 8
#: Default tolerated drop: 1 % relative (Intel Neural Compressor's default accuracy criterion).
DEFAULT_MAX_DROP = "1%"
#: Output error bounds the candidates are drawn from (geometric, 0.002 .. 0.5).
LADDER = tuple(float(v) for v in np.geomspace(0.002, 0.5, 25))


@dataclass(frozen=True)
class Tolerance:
    """A tolerated score drop: ``value`` absolute, or with ``relative`` a fraction of |s₀|."""

    value: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.relative else self.value

    def describe(self) -> str:
        return f"{100 * self.value:g} %" if self.relative else f"{self.value:g}"


def parse_max_drop(value: str | float | int) -> Tolerance:
    """``"3%"`` → 3 % relative; ``0.5`` or ``"0.5"`` → 0.5 absolute (``--max-drop``)."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)", text)
    if isinstance(value, bool) or match is None:
        raise OptionError(f"--max-drop {value!r}: expected a number ≥ 0 (absolute drop of the score) or a "
                          f"percentage like 1% (relative to the input model's score)")
    number = float(match.group(1))
    if not math.isfinite(number):
        raise OptionError(f"--max-drop {value!r}: expected a finite number")
    return Tolerance(number / 100 if match.group(2) else number, bool(match.group(2)))


@dataclass(frozen=True)
class Evaluation:
    """One call of the user's function: the ``model`` scored (``"input"``, or ``"candidate k/n"``)
    and its ``score``; for a candidate the index of its solved ``round``, the convs it rewrites,
    whether it is ``within`` the tolerance and its measured output error. The report's JSON is
    :meth:`to_dict` (the input model's: ``model`` and ``score`` alone)."""

    model: str
    score: float
    round: int | None = None
    convs_rewritten: int | None = None
    within: bool | None = None
    measured_output_rel_l2: float | None = None

    def to_dict(self) -> dict:
        if self.round is None:
            return {"model": self.model, "score": self.score}
        return {"model": self.model, "round": self.round, "convs_rewritten": self.convs_rewritten,
                "score": self.score, "within": self.within, "measured_output_rel_l2": self.measured_output_rel_l2}


class Scorer:
    """``score(model, what)``: the user's ``evaluate`` on an in-memory model, written to a private
    temporary folder that is removed after the call with whatever ``evaluate`` wrote beside it;
    the seconds go to ``add_time("evaluate", s)``."""

    def __init__(self, evaluate: Callable[[str], float], add_time: Callable[[str, float], None]):
        self._evaluate, self._add_time = evaluate, add_time
        self._name = display_name(evaluate)
        self._calls = 0

    def __call__(self, model: onnx.ModelProto, what: str) -> float:
        with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_eval_") as tmp:
            path = save_model_atomic(model, os.path.join(tmp, f"candidate{self._calls}.onnx"), external_data=False)
            self._calls += 1
            say(f"plan: scoring {what} with {self._name}")
            t0 = time.perf_counter()
            value = call_evaluate(self._evaluate, str(path), self._name, what)
            self._add_time("evaluate", time.perf_counter() - t0)
        return value


def call_evaluate(evaluate: Callable[[str], float], path: str, name: str, what: str) -> float:
    """``evaluate(path)`` as a float; anything else (an exception, a non-number, NaN/Inf) is
    one :class:`EvaluationError` naming the function and the model it was scoring."""
    try:
        score = evaluate(path)
    except (Exception, SystemExit) as exc:  # the user's code may raise anything, sys.exit() included
        text = str(exc).strip().splitlines()
        raise EvaluationError(f"evaluate function {name} raised {type(exc).__name__}"
                              f"{': ' + text[0] if text else ''} while scoring {what}") from exc
    if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)):
        raise EvaluationError(f"evaluate function {name} returned {type(score).__name__} {score!r:.60} for {what}; "
                              f"expected a number (higher is better)")
    score = float(score)
    if not math.isfinite(score):
        raise EvaluationError(f"evaluate function {name} returned {score} for {what}; expected a finite number")
    return score


def candidate_allocations(curves: list[LayerCurve], price: str, ladder: tuple[float, ...] = LADDER
                          ) -> list[tuple[float, Allocation]]:
    """``(bound, allocation)`` for each distinct plan that rewrites something, over the ladder of
    output error bounds (interaction scale 1: the set of plans does not depend on it, only which
    bound reaches which); ordered by predicted error sum."""
    seen: dict[tuple, tuple[float, Allocation]] = {}
    for bound in ladder:
        alloc = allocate_error(curves, bound ** 2, price=price)
        key = tuple(sorted(alloc.multipliers.items()))
        if alloc.error > 0 and any(r != SKIP for r in alloc.multipliers.values()) and key not in seen:
            seen[key] = (bound, alloc)
    return sorted(seen.values(), key=lambda item: item[1].error)


class Bisection:
    """Binary search for the last index within tolerance in a list ordered slow → fast.

    ``lo`` is the last index known within tolerance (−1: only the all-regular model), ``hi``
    the first known outside (``n``: none known). :meth:`next` gives the index to evaluate, or
    None when ``hi = lo + 1`` or the evaluation budget is spent.
    """

    def __init__(self, n: int, budget: int):
        self.lo, self.hi, self.budget = -1, n, budget

    def next(self) -> int | None:
        if self.hi - self.lo <= 1 or self.budget <= 0:
            return None
        return (self.lo + self.hi + 1) // 2

    def record(self, index: int, within: bool) -> None:
        self.budget -= 1
        if within:
            self.lo = index
        else:
            self.hi = index
