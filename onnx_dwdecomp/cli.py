"""Command line: ``onnx-dwdecomp [decompose] MODEL [OUTPUT] [options]`` and ``onnx-dwdecomp bench``.

A thin layer over :func:`onnx_dwdecomp.decompose`: parse flags (built from the fields of
:class:`~onnx_dwdecomp.options.DecomposeOptions`, so flags and API cannot drift), print progress
to stderr and the report to stdout, write the model (atomically) and the JSON report. The
subcommand word is optional for decompose; a model file named like a subcommand is given as
``decompose bench`` or ``./bench``. User errors print one line ``error: …`` and exit 2
(traceback only with ``--debug``); a failed ``--max-rel-error`` gate, or NaN/Inf in the rewritten
model's outputs, exits 1 and writes nothing; a bug prints one ``internal error: …`` line and
exits 3 (the codes: errors.py). Both destinations are tried before any work, and the model and
the report are written together or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from dataclasses import fields
from pathlib import Path

from .bench import add_bench_arguments, run_bench_command
from .console import Progress, print_to_stdout
from .errors import (EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR, DwDecompError, OptionError, UserError,
                     VerificationFailed, one_line)
from .modelio import check_writable, commit_together, default_output_path, load_model, stage_model, stage_text
from .options import INPUT, RUNTIME, VERIFICATION, DecomposeOptions
from .pipeline import decompose_loaded
from .plot import check_plot_path, frontier_plot
from .shapes import parse_input_shapes, split_shapes
from .timing.cache import default_cache_path
from .version import version_line

COMMANDS = ("decompose", "bench")

EPILOG = """\
examples:
  onnx-dwdecomp model.onnx                          data-free SVD, writes model.dw.onnx
  onnx-dwdecomp model.onnx out.onnx --calib calib.npz   data-driven GSVD, fastest plan within 2 % output error
  onnx-dwdecomp model.onnx --calib calib.npz --multiplier 1 --select all   the paper's uniform setting
  onnx-dwdecomp model.onnx --calib imgs/ --multiplier 2 -o fast.onnx --report report.json
  onnx-dwdecomp model.onnx --calib calib.npz --target-macs 0.5   per-layer multipliers, half the MACs
  onnx-dwdecomp model.onnx --input-shape 1,3,224,224   fix a dynamic input (several: a:1,3,H,W b:1,4)
  onnx-dwdecomp model.onnx --calib imgs/ --input-shape 1,3,224,224   images, cropped to 224² (dynamic H, W)
  onnx-dwdecomp model.onnx --calib calib.npz --max-rel-error 0.05   write nothing if the output error exceeds 5 %
  quantized model (QDQ or QLinearConv): decompose the float model, then quantize the result
  onnx-dwdecomp bench model.onnx model.dw.onnx      side-by-side onnxruntime latency
"""


#: The usage line of ``--help`` (the decompose help, the default command): every command.
USAGE = """
  onnx-dwdecomp [decompose] MODEL [OUTPUT] [options]    rewrite a model (options below)
  onnx-dwdecomp bench A.onnx [B.onnx ...] [options]     side-by-side latency (bench --help)
  onnx-dwdecomp --version
  (or python -m onnx_dwdecomp ...)"""


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`OptionError` (one line, exit 2) instead of printing usage,
    and takes flags only as written in full (an abbreviation would slip past
    :func:`split_multi_values`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise OptionError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and the subcommands ``decompose`` and ``bench``."""
    top = Parser(prog="onnx-dwdecomp", description="Depth-wise decomposition of the regular convs of an ONNX "
                                                   "CNN, and side-by-side onnxruntime benchmarks.")
    top.add_argument("--version", action="version", version=version_line())
    commands = top.add_subparsers(dest="command", parser_class=Parser)
    add_decompose_arguments(commands.add_parser(
        "decompose", help="rewrite a model (the default command)", epilog=EPILOG, usage=USAGE,
        description="Rewrite the regular k×k convolutions of an ONNX CNN into depthwise + pointwise "
                    "convolutions (depth-wise decomposition), verify and report. The word 'decompose' "
                    "may be left out: onnx-dwdecomp MODEL [OUTPUT] [options].",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    add_bench_arguments(commands.add_parser(
        "bench", help="side-by-side onnxruntime latency of several models",
        description="Side-by-side onnxruntime latency (ORT_ENABLE_ALL, interleaved runs A, B, A, B, ...; "
                    "median and p90). The first model is the reference of the speed-up column."))
    return top


def add_decompose_arguments(p: argparse.ArgumentParser) -> None:
    """The decompose flags: the CLI-only ones here, the job's options from their declaration."""
    groups = {}

    def group(title: str):
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        return groups[title]

    io = group(INPUT)
    io.add_argument("model", nargs="?", metavar="MODEL", help="input .onnx model (never modified)")
    io.add_argument("output", nargs="?", metavar="OUTPUT",
                    help="output path (default: <stem>.dw.onnx beside the input); or -o")
    io.add_argument("-o", "--output", dest="output_flag", metavar="OUTPUT", help="output path, as the positional")
    io.add_argument("--save-as-external-data", action="store_true",
                    help="store the output's weights in OUTPUT.data beside it (default: only when the input "
                         "did or the model passes protobuf's 2 GiB)")
    io.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    io.add_argument("--plot", metavar="FILE.png|svg",
                    help="also draw the plan's trade-off (predicted output error against latency and MACs for "
                         "other bounds, the chosen plan marked; needs matplotlib: the 'plot' extra)")
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(DecomposeOptions):
        for spec in f.metadata["cli"]:
            spec = dict(spec)
            flags, title, key = spec.pop("flags"), spec.pop("group"), spec.pop("exclusive", None)
            target = group(title)
            if key is not None:
                if key not in exclusive:
                    exclusive[key] = target.add_mutually_exclusive_group()
                target = exclusive[key]
            if f.default not in (None, (), False, True) and "default" not in spec["help"]:
                shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
                spec["help"] += f" (default: {shown})"
            target.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, **spec)
    group(VERIFICATION).add_argument(
        "--max-rel-error", type=float, metavar="E",
        help="fail (exit 1, write nothing) if the output error on the verification samples exceeds E: the "
             "per-feature relative L2 that --max-error bounds and the report shows as rel. error")
    run = group(RUNTIME)
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    run.add_argument("--verbose", action="store_true",
                     help="the full report: every conv rewritten, timed and planned, each kept conv's reason "
                          "(the JSON report always has them)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    run.add_argument("--version", action="version", version=version_line())


def _with_command(argv: list[str]) -> list[str]:
    """``argv`` with the subcommand word; decompose when none is given."""
    if argv and (argv[0] in COMMANDS or argv[0] == "--version"):
        return argv
    return ["decompose", *argv]


#: Flags that take several values after one flag (``--input-shape a:1,3 b:1,4``).
MULTI_VALUE_FLAGS = ("--input-shape",)


def split_multi_values(argv: list[str]) -> list[str]:
    """``--input-shape A B`` → ``--input-shape=A --input-shape=B``, so argparse never hands the
    flag a positional: after the first value, only values that look like shapes
    (shapes.split_shapes) belong to it; the next one is a positional, left in place. ``argv``
    ends before any ``--`` (parse_args splits there)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, first = token.partition("=")
        if flag in MULTI_VALUE_FLAGS and (eq or i + 1 < len(argv)):
            first, i = (first, i + 1) if eq else (argv[i + 1], i + 2)
            values, _ = split_shapes(argv[i:])
            out += [f"{flag}={v}" for v in [first, *values]]
            i += len(values)
            continue
        out.append(token)
        i += 1
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; positionals may come anywhere between the flags."""
    argv = _with_command(argv)
    top = build_parser()
    if argv[0] not in COMMANDS:  # --version
        return top.parse_args(argv)
    command = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    rest = argv[1:]
    after: list[str] = []  # after "--": positionals only (a model named "-m.onnx")
    if "--" in rest:
        k = rest.index("--")
        rest, after = rest[:k], rest[k + 1:]
    args = command.parse_intermixed_args(split_multi_values(rest))
    args.command = argv[0]
    if after and args.command == "bench":
        args.models += after
    elif after:
        given = [v for v in (args.model, args.output) if v is not None] + after
        if len(given) > 2:
            raise OptionError(f"unrecognized arguments: {' '.join(given[2:])} (expected MODEL [OUTPUT])")
        args.model, args.output = (given + [None])[:2]
    if args.command == "decompose":
        _output_once(args)
    return args


def _output_once(args: argparse.Namespace) -> None:
    """OUTPUT is the second positional or ``-o``, not both; MODEL is required."""
    if args.model is None:
        raise OptionError("the following arguments are required: MODEL (see onnx-dwdecomp --help)")
    if args.output is not None and args.output_flag is not None:
        raise OptionError(f"give the output once: positional {args.output} or -o {args.output_flag}")
    if args.output is None:
        args.output = args.output_flag


def options_from_args(args: argparse.Namespace) -> DecomposeOptions:
    """The job's options: every flag the user gave, by field name (the rest keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(DecomposeOptions) if hasattr(args, f.name)}
    if "input_shapes" in given:
        given["input_shapes"] = parse_input_shapes(given["input_shapes"])
    if args.max_rel_error is not None and not args.max_rel_error >= 0:
        raise OptionError(f"--max-rel-error {args.max_rel_error}: must be ≥ 0")
    if args.max_rel_error is not None and not given.get("verify", True):
        raise OptionError("--max-rel-error needs verification; drop --no-verify")
    return DecomposeOptions.of(given)


def _check_destinations(args: argparse.Namespace, input_path: Path, out_path: Path, report_path: Path | None,
                        input_files: tuple[Path, ...] = ()) -> None:
    """Fail before any work if a result would land on a file the job reads, on another result,
    or in a folder that takes no new file (one is created and removed, modelio.check_writable).

    Read: the model, its external data files (``input_files``, known once it is loaded), the
    calibration file. Written: OUTPUT, ``OUTPUT.data``, the report, the timing cache."""
    reads = {_resolved(input_path, "MODEL"): "the input model",
             **{f: "the input model's external data" for f in input_files}}
    if isinstance(getattr(args, "calib", None), str):
        reads[_resolved(Path(args.calib), "--calib")] = "the calibration data"
    writes = [("OUTPUT", out_path), ("OUTPUT's external data", out_path.with_name(out_path.name + ".data"))]
    if report_path is not None:
        writes.append(("--report", report_path))
    if getattr(args, "plot", None):
        writes.append(("--plot", Path(args.plot)))
    cache = getattr(args, "timing_cache", None)
    if cache is not False:
        writes.append(("--timing-cache", Path(cache) if cache else default_cache_path()))
    seen: dict[Path, str] = {}
    for flag, path in writes:
        try:
            where = _resolved(path, flag)
        except OptionError:
            if flag == "--timing-cache":  # the cache notes its own trouble and the job goes on
                continue
            raise
        clash = reads.get(where) or seen.get(where)
        if clash:
            raise OptionError(f"{flag} {path}: would overwrite {clash}; choose another path")
        seen[where] = f"{flag} {path}"
    plot_path = Path(args.plot) if getattr(args, "plot", None) else None
    for flag, path in (("OUTPUT", out_path), ("--report", report_path), ("--plot", plot_path)):
        if path is not None:  # the timing cache notes its own trouble and the job goes on
            check_writable(path, flag)


def _resolved(path: Path, flag: str) -> Path:
    """``path.resolve()``; a symbolic link loop (or a path the system cannot resolve) is an
    :class:`OptionError` naming the flag, not a crash."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13: RuntimeError("Symlink loop from ...")
        what = "is a symbolic link loop" if "loop" in str(exc).lower() else f"cannot be resolved ({exc})"
        raise OptionError(f"{flag} {path}: {what}; give a path to a real file") from None


def process_seconds() -> float:
    """Seconds since this process started (Linux: from /proc, so interpreter start-up and
    imports count; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def run_decompose(args: argparse.Namespace) -> int:
    input_path = Path(args.model)
    out_path = Path(args.output) if args.output else default_output_path(input_path)
    report_path = Path(args.report) if args.report else None
    _check_destinations(args, input_path, out_path, report_path)
    options = options_from_args(args)
    plot_format = check_plot_path(args.plot) if args.plot else None
    if plot_format and options.plan_mode() == "uniform":
        raise OptionError("--plot draws a plan's trade-off: it needs a planned job (--calib with method gsvd and no "
                          "--multiplier, or a budget flag)")
    say = None if args.quiet else Progress()
    try:
        loaded = load_model(input_path)
        if loaded.external_files:  # now known: the input's weights must not be overwritten either
            _check_destinations(args, input_path, out_path, report_path, loaded.external_files)
        model, report = decompose_loaded(loaded, options, say)
    finally:
        if say is not None:
            say.close()  # an error line must not be glued to a progress line
    if args.max_rel_error is not None and report.verification is not None:
        worst = report.verification.worst_error()
        if worst > args.max_rel_error:
            raise VerificationFailed(f"verification failed: output rel. error {worst:.3e} (per-feature relative L2 "
                                     f"on {report.verification.samples} {report.verification.inputs}) exceeds "
                                     f"--max-rel-error {args.max_rel_error:g}; nothing written")
    # model and report: both staged beside their destinations, then moved into place together or not
    # at all; the report text is rendered first, so nothing is written when that fails
    staged = [stage_model(model, out_path, external_data=args.save_as_external_data or loaded.used_external_data,
                          input_path=input_path, flag="OUTPUT")]
    written = staged[0].destination
    report.timing_s["wall"] = process_seconds()  # process start to the written model
    try:
        if report_path is not None:
            staged.append(stage_text(report_path, report.to_json()))
        if plot_format and report.budget is not None:
            staged.append(stage_text(Path(args.plot), frontier_plot(report.budget, plot_format), flag="--plot"))
        text = None if args.quiet else report.render(verbose=args.verbose, source=str(input_path), output=str(written))
    except BaseException:
        for st in staged:
            st.discard()
        raise
    commit_together(staged)
    if text is not None:
        extra = [str(p) for p in (report_path, Path(args.plot) if plot_format else None) if p is not None]
        print_to_stdout(f"{text}\nwrote {written}" + (f" and {', '.join(extra)}" if extra else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (errors.py: 0 written, 1 verification
    failed, 2 unusable input, 3 internal error, 130 interrupted). Every failure prints one
    line to stderr; ``--debug`` shows the traceback (and numpy's warnings) instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            if not debug:  # non-finite values are checked where they matter; numpy's own notes are noise
                warnings.simplefilter("ignore", RuntimeWarning)
            args = parse_args(argv)
            if args.command == "bench":
                return run_bench_command(args)
            return run_decompose(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _traceback(debug)
        print("error: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        _traceback(debug)
        print(f"error: out of memory ({one_line(str(exc)) or 'MemoryError'}), an allocation the memory estimate "
              f"(onnx_dwdecomp/resources.py) did not foresee; smaller inputs or batches need less (--input-shape, "
              f"--batch-size, --calib-size, --positions; bench: --batch-sizes)", file=sys.stderr)
        return EXIT_USER_ERROR
    except DwDecompError as exc:
        _traceback(debug)
        if isinstance(exc, (UserError, VerificationFailed)):
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
        else:
            _internal_error(exc)
        return exc.exit_code
    except Exception as exc:  # a bug: one line, never a raw traceback
        _traceback(debug)
        _internal_error(exc)
        return EXIT_INTERNAL_ERROR


def _traceback(debug: bool) -> None:
    """With ``--debug``, the traceback of the exception being handled (the exit code stays the
    one without ``--debug``)."""
    if debug:
        traceback.print_exc()


def _internal_error(exc: BaseException) -> None:
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
    print(f"internal error: {type(exc).__name__}: {one_line(str(exc), 240) or '(no message)'}{where} "
          f"(rerun with --debug and report it)", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
