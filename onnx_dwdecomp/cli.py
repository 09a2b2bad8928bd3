"""Command line: ``python -m onnx_dwdecomp MODEL.onnx [-o OUT.onnx] [options]`` and ``... bench``.

A thin layer over :func:`onnx_dwdecomp.decompose`: parse flags, print progress to stderr and the
report to stdout, write the model (atomically) and the JSON report. User errors print one line
``error: …`` and exit 2 (traceback only with ``--debug``); a failed ``--max-rel-error`` gate
exits 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .errors import DwDecompError, OptionError, UserError, VerificationFailed
from .modelio import default_output_path, load_model, save_model_atomic

EPILOG = """\
examples:
  onnx-dwdecomp model.onnx                          data-free SVD, writes model.dw.onnx
  onnx-dwdecomp model.onnx --calib calib.npz        data-driven GSVD, fastest plan within 2 % output error
  onnx-dwdecomp model.onnx --calib calib.npz --multiplier 1 --select all   the paper's uniform setting
  onnx-dwdecomp model.onnx --calib imgs/ --multiplier 2 -o fast.onnx --report report.json
  onnx-dwdecomp model.onnx --calib calib.npz --target-macs 0.5   per-layer multipliers, half the MACs
  onnx-dwdecomp bench model.onnx model.dw.onnx      side-by-side onnxruntime latency
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnx-dwdecomp",
        description="Rewrite the regular k×k convolutions of an ONNX CNN into depthwise + pointwise "
                    "convolutions (depth-wise decomposition), verify and report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", help="output path (default: <stem>.dw.onnx beside the input)")
    p.add_argument("--method", choices=["svd", "gsvd", "channel"],
                   help="svd: data-free per-channel SVD; gsvd: data-driven generalized SVD with "
                        "inter-channel compensation and multi-layer correction; channel: Zhang et al. "
                        "channel decomposition at matched MACs (default: gsvd with --calib, else svd)")
    p.add_argument("--multiplier", type=int, metavar="R",
                   help="depthwise filters per input channel, 1..kh·kw, the same for every rewritten conv "
                        "(default: with --calib and gsvd each conv gets its own, the fastest plan "
                        "within the default error bound; otherwise 1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-macs", type=float, metavar="F",
                        help="choose each conv's multiplier (or keep it regular) for the least predicted "
                             "error with output MACs ≤ F × the input model's (needs --calib)")
    budget.add_argument("--target-latency", type=float, metavar="F",
                        help="choose each conv's multiplier (or keep it regular) for the least predicted "
                             "error with the candidate convs' onnxruntime latency ≤ F × their regular "
                             "latency, timed on this machine (needs --calib)")
    budget.add_argument("--max-error", type=float, metavar="E",
                        help="choose each conv's multiplier (or keep it regular) for the fastest plan "
                             "(fewest MACs with --select all) with the output error (per-feature relative "
                             "L2 against the calibration outputs' scale) on held-out calibration samples ≤ E "
                             "(needs --calib; the default with --calib and gsvd: 0.02)")
    p.add_argument("--include", nargs="+", default=[], metavar="PATTERN",
                   help="only rewrite Conv nodes whose name matches one of these globs")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                   help="never rewrite Conv nodes whose name matches one of these globs")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                   help="fix the dims of a graph input (repeatable); a dynamic batch dim defaults to 1")
    p.add_argument("--calib", metavar="PATH",
                   help="calibration data: .npy, .npz (keyed by input name) or a folder of jpg/png images")
    p.add_argument("--calib-reader", metavar="MODULE:CALLABLE",
                   help="calibration from a CalibrationDataReader returned by CALLABLE() "
                        "(module name or path/to/file.py)")
    p.add_argument("--calib-size", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="onnxruntime batch during calibration")
    p.add_argument("--positions", default="64", metavar="P",
                   help="output positions sampled per image for the statistics, or 'all' (default 64)")
    p.add_argument("--symmetric", action="store_true",
                   help="fit each layer on original-network inputs only (no multi-layer correction)")
    p.add_argument("--mean", default="0.485,0.456,0.406", help="image-folder normalisation mean (per channel)")
    p.add_argument("--std", default="0.229,0.224,0.225", help="image-folder normalisation std (per channel)")
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--max-rel-error", type=float, metavar="E",
                   help="fail (exit 1, write nothing) if any output's relative L2 error exceeds E")
    p.add_argument("--select", choices=["latency", "all"], default="latency",
                   help="latency: a conv's separable form is used only where onnxruntime runs it at "
                        "least 5 %% faster than the regular conv, timed on this machine (default); all: "
                        "time nothing - a uniform --multiplier rewrites every candidate, a plan prices "
                        "its options by MACs")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--timing-cache", metavar="PATH",
                       help="persistent onnxruntime timing cache (default: onnx_dwdecomp/timing_cache.json in "
                            "$XDG_CACHE_HOME or ~/.cache); a file to commit next to a model or share")
    cache.add_argument("--no-timing-cache", action="store_true",
                       help="measure every timing afresh and store nothing")
    p.add_argument("--threads", type=int, metavar="N",
                   help="onnxruntime threads for the latency timing (default: all CPUs)")
    p.add_argument("--providers", default="CPUExecutionProvider", metavar="NAME[,NAME...]",
                   help="onnxruntime execution providers in priority order, for calibration, latency "
                        "timing, verification (default: CPUExecutionProvider; e.g. "
                        "CUDAExecutionProvider,CPUExecutionProvider with onnxruntime-gpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and random inputs (default 0)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`OptionError` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):
        raise OptionError(f"{message} (see --help)")


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5") from None


def _options_from_args(args: argparse.Namespace) -> dict:
    from .calibdata import load_reader
    from .shapes import parse_input_shape

    if args.calib and args.calib_reader:
        raise OptionError("give either --calib or --calib-reader, not both")
    calib = args.calib
    if args.calib_reader:
        calib = load_reader(args.calib_reader)
    positions = None if args.positions == "all" else _int(args.positions, "--positions")
    shapes = dict(parse_input_shape(s) for s in args.input_shape)
    std = _floats(args.std, "--std")
    if any(s <= 0 for s in std):
        raise OptionError(f"--std {args.std!r}: values must be positive")
    if args.max_rel_error is not None and not args.max_rel_error >= 0:
        raise OptionError(f"--max-rel-error {args.max_rel_error}: must be ≥ 0")
    if args.max_rel_error is not None and args.no_verify:
        raise OptionError("--max-rel-error needs verification; drop --no-verify")
    return dict(method=args.method, multiplier=args.multiplier, include=tuple(args.include),
                exclude=tuple(args.exclude), input_shapes=shapes, calib=calib, calib_size=args.calib_size,
                batch_size=args.batch_size, positions=positions, symmetric=args.symmetric,
                mean=_floats(args.mean, "--mean"), std=std, verify=not args.no_verify, seed=args.seed,
                select=args.select, threads=args.threads, target_macs=args.target_macs,
                target_latency=args.target_latency,
                timing_cache=False if args.no_timing_cache else args.timing_cache,
                max_error=args.max_error, providers=args.providers)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"{flag} {text!r}: expected an integer") from None


def _write_text_atomic(path: Path, text: str) -> None:
    if not path.parent.exists():
        raise OptionError(f"report folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress(quiet: bool):
    if quiet:
        return None
    tty = sys.stderr.isatty()

    def say(msg: str) -> None:
        if tty:
            sys.stderr.write("\r\033[K" + msg)
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    return say


def _check_destinations(input_path: Path, out_path: Path, report_path: Path | None) -> None:
    """Fail before any work if the model or the report could not be written at the end."""
    if out_path.resolve() == input_path.resolve():
        raise OptionError(f"output path {out_path} is the input file; choose another with -o")
    for flag, path in (("-o", out_path), ("--report", report_path)):
        if path is None:
            continue
        if not path.parent.is_dir():
            raise OptionError(f"{flag} {path}: folder {path.parent} does not exist")
        if path.is_dir():
            raise OptionError(f"{flag} {path}: is a directory, expected a file path")
    if report_path is not None and report_path.resolve() in (input_path.resolve(), out_path.resolve()):
        which = "input" if report_path.resolve() == input_path.resolve() else "output"
        raise OptionError(f"--report {report_path}: would overwrite the {which} model")


def run_decompose(argv: list[str]) -> int:
    from .pipeline import DecomposeOptions, decompose_loaded

    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        input_path = Path(args.model)
        out_path = Path(args.output) if args.output else default_output_path(input_path)
        _check_destinations(input_path, out_path, Path(args.report) if args.report else None)
        say = _progress(args.quiet)
        options = _options_from_args(args)
        loaded = load_model(input_path)
        model, report = decompose_loaded(loaded, DecomposeOptions.of(options), say)
        if say and sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
        if args.max_rel_error is not None and report.verification is not None:
            worst = report.verification.worst_rel_l2()
            if worst > args.max_rel_error:
                raise VerificationFailed(f"verification failed: relative L2 error {worst:.3e} exceeds "
                                         f"--max-rel-error {args.max_rel_error:g}; nothing written")
        written = save_model_atomic(model, out_path, external_data=loaded.used_external_data,
                                    input_path=input_path)
        if args.report:
            _write_text_atomic(Path(args.report), report.to_json())
        if not args.quiet:
            print(report.render())
            print(f"wrote {written}" + (f" and {args.report}" if args.report else ""))
        return 0
    except DwDecompError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import bench_main
        debug = "--debug" in argv
        try:
            return bench_main([a for a in argv[1:] if a != "--debug"])
        except UserError as exc:
            if debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    return run_decompose(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
