"""Every option of a decompose job, declared once: its default, its check, and its command-line
flag (:class:`DecomposeOptions`; the CLI builds its parser from the field metadata).

The API takes the fields as keyword arguments (``decompose(model, calib=..., multiplier=2)``);
the CLI maps each flag to one field, so an option's default and meaning cannot drift between
the two. ``to_dict`` gives the options as resolved for the report (defaults filled in).
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .data.readers import load_reader
from .errors import BudgetError, EvaluationError, OptionError
from .runtime import DEFAULT_PROVIDERS, check_providers
from .solve import RIDGE, SOLVER_ROUNDS
from .timing.clock import default_threads
from .planning.tuning import DEFAULT_MAX_DROP, parse_max_drop
from .usercode import display_name, load_callable

#: Default accuracy bound with calibration data: held-out output error ≤ 2 %, leaving room for
#: held-out calibration samples under-stating the error on new data (measurements behind it:
#: docs/DESIGN.md, "Why the default bound is 0.02").
DEFAULT_MAX_ERROR = 0.02

METHODS = ("svd", "gsvd", "channel")
SELECT = ("latency", "all")

# --help groups, in the order shown
INPUT, METHOD, CALIBRATION, SELECTION, VERIFICATION, RUNTIME = (
    "input and output", "method", "calibration", "selection and budget", "verification", "runtime")


def _flag(*flags: str, group: str, help: str, **argparse_kwargs: Any) -> dict:
    """One command-line flag of a field: ``add_argument(*flags, **argparse_kwargs)`` in ``group``."""
    return {"flags": flags, "group": group, "help": help, **argparse_kwargs}


def _option(default: Any = None, *flags: dict, factory: Any = None) -> Any:
    """A field with its default and its flags (``metadata["cli"]``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"cli": flags})
    return field(default=default, metadata={"cli": flags})


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.5,0.5"`` → ``(0.5, 0.5, 0.5)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:  # argparse names the flag
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5") from None


def parse_positions(text: str) -> int | None:
    """``"all"`` → None, else an integer."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:  # argparse names the flag
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer or 'all'") from None


def _calib_reader(spec: str) -> Any:
    return load_reader(spec)  # imports the user's module: only when the flag is given


def _evaluate_fn(spec: str) -> Any:
    return load_callable(spec, "evaluate function", EvaluationError)


@dataclass(frozen=True)
class DecomposeOptions:
    """Every knob of :func:`~onnx_dwdecomp.decompose`; each field maps to one command-line flag."""

    method: str | None = _option(None, _flag(
        "--method", group=METHOD, choices=METHODS,
        help="svd: data-free per-channel SVD; gsvd: data-driven generalized SVD with inter-channel "
             "compensation and multi-layer correction; channel: Zhang et al. channel decomposition at "
             "matched MACs (default: gsvd with --calib, else svd)"))
    multiplier: int | None = _option(None, _flag(
        "--multiplier", group=METHOD, type=int, metavar="R",
        help="depthwise filters per input channel, 1..kh·kw, the same for every rewritten conv "
             "(default: with --calib and gsvd each conv gets its own, the fastest plan within the "
             f"default error bound {DEFAULT_MAX_ERROR:g}; otherwise 1)"))
    include: tuple[str, ...] = _option((), _flag(
        "--include", group=SELECTION, action="append", metavar="PATTERN",
        help="only rewrite Conv nodes whose name matches this glob (repeat the flag for several)"))
    exclude: tuple[str, ...] = _option((), _flag(
        "--exclude", group=SELECTION, action="append", metavar="PATTERN",
        help="never rewrite Conv nodes whose name matches this glob (repeat the flag for several)"))
    input_shapes: Mapping[str, tuple[int, ...]] = _option(None, _flag(
        "--input-shape", group=INPUT, action="append", metavar="NAME:D0,D1,...",
        help="fix the dims of graph inputs, several after one flag (NAME:1,3,224,224 ...; bare dims "
             "1,3,224,224 for a single-input model); a dynamic batch dim defaults to 1"), factory=dict)
    calib: Any = _option(None, _flag(
        "--calib", group=CALIBRATION, metavar="PATH", exclusive="calib",
        help="calibration data: .npy, .npz (keyed by input name) or a folder of jpg/png images"), _flag(
        "--calib-reader", group=CALIBRATION, metavar="MODULE:CALLABLE", type=_calib_reader, exclusive="calib",
        help="calibration from a CalibrationDataReader returned by CALLABLE() (module name or "
             "path/to/file.py)"))
    calib_size: int | None = _option(None, _flag(
        "--calib-size", group=CALIBRATION, type=int, metavar="N",
        help="read at most N calibration samples (default: 512; accuracy saturates at 256-512 images)"))
    batch_size: int = _option(32, _flag(
        "--batch-size", group=CALIBRATION, type=int, metavar="B", help="onnxruntime batch during calibration"))
    positions: int | None = _option(64, _flag(
        "--positions", group=CALIBRATION, type=parse_positions, metavar="P",
        help="output positions sampled per image for the statistics (at least; raised to give 4·D fit "
             "patches per layer), or 'all'"))
    symmetric: bool = _option(False, _flag(
        "--symmetric", group=CALIBRATION, action="store_true",
        help="fit each layer on original-network inputs only (no multi-layer correction)"))
    mean: tuple[float, ...] = _option((0.485, 0.456, 0.406), _flag(
        "--mean", group=CALIBRATION, type=parse_floats, metavar="M0,M1,...",
        help="image-folder normalisation mean (per channel)"))
    std: tuple[float, ...] = _option((0.229, 0.224, 0.225), _flag(
        "--std", group=CALIBRATION, type=parse_floats, metavar="S0,S1,...",
        help="image-folder normalisation std (per channel)"))
    verify: bool = _option(True, _flag(
        "--no-verify", group=VERIFICATION, action="store_false", help="skip the onnxruntime comparison"))
    seed: int = _option(0, _flag(
        "--seed", group=RUNTIME, type=int, metavar="N", help="seed for sampling and random inputs"))
    select: str = _option("latency", _flag(
        "--select", group=SELECTION, choices=SELECT,
        help="latency: a conv's separable form is used only where onnxruntime runs it at least 5 %% "
             "faster than the regular conv, timed on this machine; all: time nothing - a uniform "
             "--multiplier rewrites every candidate, a plan prices its options by MACs"))
    threads: int | None = _option(None, _flag(
        "--threads", group=RUNTIME, type=int, metavar="N",
        help=f"onnxruntime threads for the latency timing (default: the CPUs available, {default_threads()})"))
    # onnxruntime execution providers, in priority order, for every session of the job:
    # calibration, latency timing (and its cache key), verification
    providers: tuple[str, ...] = _option(DEFAULT_PROVIDERS, _flag(
        "--providers", group=RUNTIME, metavar="NAME[,NAME...]",
        help="onnxruntime execution providers in priority order, for calibration, latency timing and "
             "verification (e.g. CUDAExecutionProvider,CPUExecutionProvider with onnxruntime-gpu)"))
    # persistent timing cache (timing/cache.py): None = the default file in the user cache
    # folder, a path = that file, False = measure afresh and store nothing
    timing_cache: str | os.PathLike | bool | None = _option(None, _flag(
        "--timing-cache", group=RUNTIME, metavar="PATH", exclusive="timing_cache",
        help="persistent onnxruntime timing cache (default: onnx_dwdecomp/timing_cache.json in "
             "$XDG_CACHE_HOME or ~/.cache); a file to commit next to a model or share"), _flag(
        "--no-timing-cache", group=RUNTIME, action="store_const", const=False, exclusive="timing_cache",
        help="measure every timing afresh and store nothing"))
    target_macs: float | None = _option(None, _flag(
        "--target-macs", group=SELECTION, type=float, metavar="F",
        help="choose each conv's multiplier (or keep it regular) for the least predicted error with "
             "output MACs ≤ F × the input model's (needs --calib)"))
    target_latency: float | None = _option(None, _flag(
        "--target-latency", group=SELECTION, type=float, metavar="F",
        help="choose each conv's multiplier (or keep it regular) for the least predicted error with the "
             "candidate convs' onnxruntime latency ≤ F × their regular latency, timed on this machine "
             "(needs --calib)"))
    max_error: float | None = _option(None, _flag(
        "--max-error", group=SELECTION, type=float, metavar="E",
        help="choose each conv's multiplier (or keep it regular) for the fastest plan (fewest MACs with "
             "--select all) with the output error (per-feature relative L2 against the calibration "
             "outputs' scale) on held-out calibration samples ≤ E (needs --calib; the default with "
             f"--calib and gsvd: {DEFAULT_MAX_ERROR:g})"))

    evaluate: Any = _option(None, _flag(
        "--eval", group=SELECTION, metavar="MODULE:FUNCTION", type=_evaluate_fn,
        help="task-aware plan: FUNCTION(model_path) -> float, higher is better (module name or "
             "path/to/file.py), scores the input model and candidate plans; the fastest plan whose "
             "score drops at most --max-drop is chosen (needs --calib)"))
    # solver tunables (tools/accuracy_study.py varies them; solve.py says how the defaults were chosen)
    solver_rounds: int = _option(SOLVER_ROUNDS, _flag(
        "--solver-rounds", group=METHOD, type=int, metavar="N",
        help=f"L-BFGS rounds of inter-channel compensation in the gsvd solve (0: the GSVD sweep alone; "
             f"default {SOLVER_ROUNDS})"))
    ridge: float = _option(RIDGE, _flag(
        "--ridge", group=METHOD, type=float, metavar="λ",
        help=f"ridge of the data-driven solvers, relative to the input moments' mean diagonal (default {RIDGE:g})"))
    max_drop: str | float | None = _option(None, _flag(
        "--max-drop", group=SELECTION, metavar="DROP",
        help=f"with --eval: tolerated score drop, absolute (0.5) or relative to the input model's score "
             f"(3%%; default {DEFAULT_MAX_DROP.replace('%', '%%')})"))

    def __post_init__(self):
        if isinstance(self.providers, str):  # "A,B" as on the command line
            object.__setattr__(self, "providers", tuple(p.strip() for p in self.providers.split(",")))
        for name in ("include", "exclude", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> DecomposeOptions:
        """Validated options from keyword arguments; an unknown name is an :class:`OptionError`
        listing the valid ones (with the closest as a hint)."""
        names = [f.name for f in fields(cls)]
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise OptionError(f"unknown option {key!r}{hint}; valid options: {', '.join(names)}")
        opts = cls(**options)
        opts.validate()
        return opts

    def resolved_method(self) -> str:
        return self.method or ("gsvd" if self.calib is not None else "svd")

    def plan_mode(self) -> str:
        """``"uniform"`` (every selected conv at one multiplier), ``"target_macs"``,
        ``"target_latency"``, ``"max_error"`` or ``"task"`` (``evaluate`` given). With calibration
        data, method gsvd and no ``multiplier``, the default is ``"max_error"`` at
        :data:`DEFAULT_MAX_ERROR`."""
        if self.evaluate is not None:
            return "task"
        if self.target_macs is not None:
            return "target_macs"
        if self.target_latency is not None:
            return "target_latency"
        if self.max_error is not None or (self.multiplier is None and self.calib is not None
                                          and self.resolved_method() == "gsvd"):
            return "max_error"
        return "uniform"

    @property
    def default_plan(self) -> bool:
        """True when the accuracy bound is the default, not asked for."""
        return self.plan_mode() == "max_error" and self.max_error is None

    def validate(self) -> None:
        """:class:`OptionError` (or :class:`BudgetError`) for any value or combination that
        cannot work, naming the flag."""
        _check_types(self)
        method = self.resolved_method()
        if method not in METHODS:
            raise OptionError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
        if self.multiplier is not None and self.multiplier < 1:
            raise OptionError(f"--multiplier {self.multiplier}: must be ≥ 1 (depthwise filters per channel)")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size {self.batch_size}: must be ≥ 1")
        if self.positions is not None and self.positions < 1:
            raise OptionError(f"--positions {self.positions}: must be ≥ 1 or 'all'")
        if self.calib_size is not None and self.calib_size < 1:
            raise OptionError(f"--calib-size {self.calib_size}: must be ≥ 1")
        if self.seed < 0:
            raise OptionError(f"--seed {self.seed}: must be ≥ 0")
        if self.solver_rounds < 0:
            raise OptionError(f"--solver-rounds {self.solver_rounds}: must be ≥ 0 (L-BFGS rounds)")
        if not self.ridge > 0:
            raise OptionError(f"--ridge {self.ridge:g}: must be > 0 (relative to the moments' mean diagonal)")
        if any(s <= 0 for s in self.std):
            raise OptionError(f"--std {','.join(map(str, self.std))}: values must be positive")
        if method == "gsvd" and self.calib is None:
            raise OptionError("--method gsvd needs calibration data: pass --calib (or use --method svd)")
        if self.symmetric and self.calib is None:
            raise OptionError("--symmetric needs calibration data (--calib)")
        if self.select not in SELECT:
            raise OptionError(f"--select {self.select!r}: expected one of {', '.join(SELECT)}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads {self.threads!r}: must be an integer ≥ 1")
        if self.target_macs is not None or self.max_error is not None or self.target_latency is not None:
            _validate_budget(self, method)
        if self.evaluate is not None or self.max_drop is not None:
            _validate_task(self, method)
        check_providers(self.providers)
        if self.default_plan and not self.verify:
            raise OptionError("--no-verify: the default plan is chosen by verifying candidates on held-out "
                              "calibration samples; give --multiplier R for one multiplier everywhere, unverified")

    def flag(self, name: str) -> str:
        """The command-line flag of field ``name`` (for messages)."""
        return next(f for f in fields(self) if f.name == name).metadata["cli"][0]["flags"][0]

    def to_dict(self, shapes: Mapping[str, tuple[int, ...]]) -> dict:
        """The options as resolved for the report: defaults filled in, the input shapes the job
        used, the calibration source as a path or a reader's type name."""
        calib = self.calib
        if calib is not None and not (isinstance(calib, (str, bytes)) or hasattr(calib, "__fspath__")):
            calib = type(calib).__name__
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(
            method=self.resolved_method(), include=list(self.include), exclude=list(self.exclude),
            input_shapes={k: list(v) for k, v in shapes.items()}, calib=None if calib is None else str(calib),
            positions="all" if self.positions is None else self.positions, mean=list(self.mean),
            std=list(self.std), threads=self.threads or default_threads(), providers=list(self.providers),
            timing_cache=None if self.timing_cache is None else str(self.timing_cache), plan=self.plan_mode(),
            max_error=DEFAULT_MAX_ERROR if self.default_plan else self.max_error,
            evaluate=None if self.evaluate is None else display_name(self.evaluate),
            max_drop=(DEFAULT_MAX_DROP if self.max_drop is None else str(self.max_drop)) if self.evaluate else None)
        return out


def _validate_task(opts: DecomposeOptions, method: str) -> None:
    if opts.evaluate is None:
        raise OptionError("--max-drop needs --eval (the score whose drop it bounds)")
    if not callable(opts.evaluate):
        raise OptionError(f"evaluate {opts.evaluate!r}: expected a callable, evaluate(model_path) -> float")
    others = [flag for flag, value in (("--target-macs", opts.target_macs), ("--target-latency", opts.target_latency),
                                       ("--max-error", opts.max_error), ("--multiplier", opts.multiplier))
              if value is not None]
    if others:
        raise OptionError(f"--eval chooses the plan by its score: drop {' and '.join(others)}")
    if opts.calib is None or method != "gsvd":
        raise OptionError("--eval needs calibration data (--calib) and --method gsvd: the candidate plans come "
                          "from the data-driven error curves")
    if not opts.verify:
        raise OptionError("--eval verifies every candidate on held-out calibration samples; drop --no-verify")
    parse_max_drop(DEFAULT_MAX_DROP if opts.max_drop is None else opts.max_drop)


_INTS = ("multiplier", "calib_size", "batch_size", "positions", "seed", "threads", "solver_rounds")
_FLOATS = ("target_macs", "target_latency", "max_error", "ridge")


def _check_types(opts: DecomposeOptions) -> None:
    """Numbers must be numbers (the API has no argparse to convert them)."""
    for name in _INTS:
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(f"{opts.flag(name)} {value!r}: expected an integer")
    for name in _FLOATS:
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise OptionError(f"{opts.flag(name)} {value!r}: expected a finite number")


def _validate_budget(opts: DecomposeOptions, method: str) -> None:
    given = [flag for flag, value in (("--target-macs", opts.target_macs), ("--target-latency", opts.target_latency),
                                      ("--max-error", opts.max_error)) if value is not None]
    if len(given) > 1:
        raise OptionError(f"give one of --target-macs, --target-latency, --max-error, not {' and '.join(given)}")
    if opts.calib is None or method != "gsvd":
        raise OptionError(f"{given[0]} needs calibration data (--calib) and --method gsvd: "
                          "the per-layer error curves come from the data-driven statistics")
    if opts.multiplier is not None:
        raise OptionError(f"--multiplier cannot be combined with {given[0]} "
                          "(the budget chooses each layer's multiplier)")
    if opts.target_latency is not None:
        if not (0 < opts.target_latency <= 1):
            raise BudgetError(f"--target-latency {opts.target_latency:g}: must be a fraction of the regular "
                              f"convs' latency in (0, 1]")
        if opts.select != "latency":
            raise OptionError("--target-latency prices options by timing them: drop --select all")
    if opts.target_macs is not None and not (0 < opts.target_macs <= 1):
        raise BudgetError(f"--target-macs {opts.target_macs:g}: must be a fraction of the input model's "
                          f"MACs in (0, 1]")
    if opts.max_error is not None:
        if not opts.max_error > 0:
            raise BudgetError(f"--max-error {opts.max_error:g}: must be > 0 (relative L2 error of the outputs)")
        if not opts.verify:
            raise OptionError("--max-error is checked by verification; drop --no-verify")
