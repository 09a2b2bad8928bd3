"""Side-by-side onnxruntime latency of several models: ``onnx-dwdecomp bench A.onnx B.onnx``.

Method
------
Each model gets its own onnxruntime session (on ``--providers``, default the CPU) with the
settings of a real deployment:
``ORT_ENABLE_ALL`` graph optimisation, sequential execution, ``intra_op_num_threads = threads``
(default: the CPUs this process may use), ``inter_op_num_threads = 1``. Sessions are created
from the model *path*, so weights stored as external data beside the model are found.

One setting differs from onnxruntime's default: thread-pool *spinning* is off unless asked for
(``--allow-spinning``). With spinning on, the worker threads of the session that just ran keep
busy-waiting for milliseconds after ``run`` returns and steal the cores from the next model of
the interleaved sequence. Measured on the 2-core development VM (ShuffleNet V2 x1.0 vs its merged
regular counterpart, 2 threads, median ms): alone 8.9 / 25.0, interleaved 13.2 / 38.1 with
spinning; alone 5.1 / 13.8, interleaved 5.3 / 13.6 without. Off, interleaving costs nothing and
every call pays the thread wake-up that a server with sparse requests pays.

Every model is fed the same seeded inputs (``numpy.random.default_rng(seed)``: float inputs
standard normal, integer and bool inputs zeros) whenever the input signatures match, at each
requested batch size. For each batch size::

    warm-up:   A × warmup, B × warmup, ...
    timing:    A, B, A, B, ... (``runs`` rounds), each call timed with time.perf_counter

Why interleave: see :mod:`onnx_dwdecomp.timing.clock`.

Why median and p90, not mean. Latency distributions are skewed: a few slow calls (a preemption,
a page fault) can move the mean a lot while telling nothing about the model. The median is the
typical latency and is robust to those outliers; p90 shows the tail a user sees one call in ten.
The speed-up is the ratio of medians, ``median(first model) / median(this model)``, so > 1 means
faster than the first model, the reference.

MACs are multiply-accumulates of Conv/Gemm/MatMul nodes *per inference at that batch size*
(i.e. batch × per-sample MACs), parameters count the elements of all initializers and
``Constant`` tensors, and the size is that of the model file plus its external data files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .console import Progress, print_to_stdout
from .checks import check_int, parse_int
from .errors import ModelError, OptionError, first_line
from .formatting import fmt_bytes, fmt_shape
from .graph import constant_tensors
from .memory import array_bytes, check_threads, require
from .modelio import check_writable, load_model, write_text_atomic
from .pipeline import _named_shapes
from .report import text_table
from .runtime import DEFAULT_PROVIDERS, check_providers, session_options
from .shapes import graph_inputs, infer_tensor_info, model_cost, parse_input_shapes, resolve_input_shapes
from .timing.clock import default_threads, environment, interleaved_timings
from .version import version_line

__all__ = ["ModelBench", "run_bench", "format_table", "add_bench_arguments", "run_bench_command"]

#: run_bench forwards progress messages at most this often (seconds); phase changes always pass.
PROGRESS_INTERVAL_S = 0.25


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelBench:
    """One model at one batch size.

    Attributes
    ----------
    path : Path
        The model file.
    batch_size : int
    median_ms, p90_ms : float
        Median and 90th percentile of the per-call latency, milliseconds, for one inference of
        the whole batch.
    macs : int
        Multiply-accumulates per inference at this batch size (batch × per-sample MACs).
    params : int
        Elements of all initializers and ``Constant`` tensors.
    file_size : int
        Bytes on disk: the model file plus its external data files.
    speedup : float
        ``median_ms`` of the first model at this batch size / this ``median_ms``; > 1 is faster.
    times_ms : tuple of float
        Every timed call, milliseconds, in call order (for your own statistics).
    """

    path: Path
    batch_size: int
    median_ms: float
    p90_ms: float
    macs: int
    params: int
    file_size: int
    speedup: float
    times_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["times_ms"] = list(self.times_ms)
        return d


# --------------------------------------------------------------------------------------------
# Models, inputs, sessions
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Prepared:
    """What the timing needs of one model; the ModelProto itself is not kept."""

    path: Path
    label: str
    input_names: tuple[str, ...]
    input_dtypes: tuple[np.dtype, ...]
    shapes: dict[int, tuple[tuple[int, ...], ...]]  # batch size -> shape per input
    macs: dict[int, int]                            # batch size -> MACs per inference
    params: int
    file_size: int


def _file_size_on_disk(path: Path, used_external_data: bool, main_size: int) -> int:
    """Size of the model file plus every distinct external data file it refers to."""
    if not used_external_data:
        return main_size
    stub = onnx.load(str(path), load_external_data=False)  # weights not read: cheap
    files = set()
    for t in constant_tensors(stub.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    files.add((path.parent / entry.value).resolve())
    return main_size + sum(f.stat().st_size for f in files if f.is_file())


def _prepare(path: Path, label: str, batch_sizes: Sequence[int],
             overrides: Mapping[str, tuple[int, ...]]) -> _Prepared:
    loaded = load_model(path)
    model = loaded.model
    specs = graph_inputs(model)
    if not specs:
        raise ModelError(f"{label}: the model has no inputs to feed")
    for spec in specs:
        if spec.dtype.kind not in "fiub":
            raise ModelError(f"{label}: input {spec.name!r} has dtype {spec.dtype}; bench can only "
                             f"feed float, integer and bool inputs")
    try:  # bare dims (name "") go to the model's single input, as for decompose
        overrides = _named_shapes(overrides, specs)
    except OptionError as exc:
        raise OptionError(f"{label}: {exc}") from None
    shapes: dict[int, tuple[tuple[int, ...], ...]] = {}
    macs: dict[int, int] = {}
    params = 0
    for b in batch_sizes:
        mine: dict[str, tuple[int, ...]] = {}
        for spec in specs:
            if not spec.shape:
                continue  # a scalar input has no batch dim
            fixed = spec.shape[0]
            if fixed is not None and fixed != b:
                raise OptionError(f"{label}: input {spec.name!r} has a fixed batch size of {fixed} "
                                  f"{fmt_shape(spec.shape)}, but --batch-sizes asks for {b}; "
                                  f"use --batch-sizes {fixed} or export the model with a dynamic batch")
            if spec.name in overrides:
                mine[spec.name] = (b,) + tuple(overrides[spec.name][1:])
        try:
            resolved, _notes = resolve_input_shapes(specs, mine)  # notes are about batch 1: moot
        except OptionError as exc:
            raise OptionError(f"{label}: {exc}") from None
        per_input = tuple((b,) + tuple(resolved[s.name][1:]) if s.shape else tuple(resolved[s.name])
                          for s in specs)
        shapes[b] = per_input
        cost = model_cost(model, infer_tensor_info(model, dict(zip((s.name for s in specs), per_input))))
        macs[b] = cost.macs
        params = cost.params
    file_size = _file_size_on_disk(path, loaded.used_external_data, loaded.file_size or 0)
    return _Prepared(path, label, tuple(s.name for s in specs), tuple(s.dtype for s in specs),
                     shapes, macs, params, file_size)


def _make_inputs(dtypes: Sequence[np.dtype], shapes: Sequence[tuple[int, ...]], seed: int,
                 cache: dict) -> list[np.ndarray]:
    """Seeded inputs; identical (the same arrays) for every model with the same dtypes and shapes."""
    key = (tuple(str(d) for d in dtypes), tuple(shapes))
    if key not in cache:
        require(2 * sum(array_bytes(shape, np.float32) for shape in shapes),
                          f"bench inputs of shapes {', '.join(map(str, shapes))}",
                          "--batch-sizes or --input-shape with smaller dims")
        rng = np.random.default_rng(seed)
        arrays = []
        for dtype, shape in zip(dtypes, shapes):
            if dtype.kind == "f":
                arrays.append(rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False))
            else:
                arrays.append(np.zeros(shape, dtype=dtype))
        cache[key] = arrays
    return cache[key]


def _session(path: Path, label: str, threads: int, allow_spinning: bool, providers: Sequence[str]):
    import onnxruntime as ort

    so = session_options(threads, spinning=allow_spinning)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own unrelated types
        raise ModelError(f"{label}: onnxruntime cannot load the model: {first_line(exc)}") from exc




def _runner(sess, feeds: dict, label: str, batch: int) -> Callable[[], object]:
    run = sess.run

    def call():
        try:
            return run(None, feeds)
        except Exception as exc:
            raise ModelError(f"{label}: onnxruntime failed at batch {batch}: {first_line(exc)}") from exc

    return call


def _labels(paths: Sequence[Path]) -> list[str]:
    """File names, or the paths as given where two models share a file name."""
    names = [p.name for p in paths]
    return [str(p) if names.count(p.name) > 1 else p.name for p in paths]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def run_bench(paths: Sequence[str | os.PathLike], *, batch_sizes: Sequence[int] = (1,),
              threads: int | None = None, runs: int = 50, warmup: int = 5,
              input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
              progress: Callable[[str], None] | None = None,
              allow_spinning: bool = False, providers: str | Sequence[str] = DEFAULT_PROVIDERS
              ) -> list[ModelBench]:
    """Benchmark models side by side with onnxruntime (see the module docstring).

    Parameters
    ----------
    paths : sequence of path
        Model files; the first is the reference of the speed-up.
    batch_sizes : sequence of int
        Each is benchmarked in turn; replaces the batch dim (dim 0) of every input.
    threads : int, optional
        ``intra_op_num_threads``; default :func:`default_threads`.
    runs, warmup : int
        Timed rounds and untimed warm-up calls per model and batch size.
    input_shapes : mapping name -> dims, optional
        Fixes dynamic dims, like ``--input-shape``; dim 0 is replaced by the batch size. A name
        applies to every model with such an input and must belong to at least one. The name
        ``""`` (bare dims on the command line) applies to each model's single input; a model
        with several inputs is then an :class:`OptionError` that names them.
    seed : int
        Seed of the random inputs.
    progress : callable(str), optional
        Receives short status lines, at most every 0.25 s except at a change of phase.
    allow_spinning : bool
        Let onnxruntime's idle worker threads busy-wait (its default); off by default because
        the spinning threads of one model slow down the next one (see the module docstring).
    providers : sequence of str, or one comma-separated string
        onnxruntime execution providers of every session, in priority order (default: CPU).

    Returns
    -------
    list of ModelBench
        Batch-size-major: all models at ``batch_sizes[0]``, then at ``batch_sizes[1]``, ...

    Raises
    ------
    OptionError
        Bad argument, unknown input name, or a batch size that a model's fixed batch forbids.
    ModelError
        Missing or unreadable model, or onnxruntime cannot load or run it.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise OptionError("bench needs at least one model file")
    if isinstance(batch_sizes, (int, str)) or not batch_sizes:
        raise OptionError(f"--batch-sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
    batch_sizes = [check_int(b, "--batch-sizes", 1) for b in batch_sizes]
    if len(set(batch_sizes)) != len(batch_sizes):
        raise OptionError(f"--batch-sizes lists a batch size twice: {batch_sizes}")
    threads = default_threads() if threads is None else check_int(threads, "--threads", 1)
    check_threads(threads)
    runs = check_int(runs, "--runs", 1)
    warmup = check_int(warmup, "--warmup", 0)
    seed = check_int(seed, "--seed", 0)
    providers = check_providers(providers)
    overrides = {str(k): tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}

    last_sent = [-math.inf]

    def say(msg: str, *, force: bool = False) -> None:
        if progress is None:
            return
        now = time.monotonic()
        if force or now - last_sent[0] >= PROGRESS_INTERVAL_S:
            last_sent[0] = now
            progress(msg)

    # Load and check everything before the first (possibly long) timing loop.
    labels = _labels(paths)
    prepared = []
    for path, label in zip(paths, labels):
        say(f"bench: loading {label}", force=True)
        prepared.append(_prepare(path, label, batch_sizes, overrides))
    used = {name for p in prepared for name in p.input_names}
    unknown = sorted(set(overrides) - used - {""})
    if unknown:
        raise OptionError(f"--input-shape names {unknown}, but no model has such an input "
                          f"(inputs: {sorted(used)})")
    sessions = [_session(p.path, p.label, threads, bool(allow_spinning), providers) for p in prepared]

    results: list[ModelBench] = []
    for b in batch_sizes:
        cache: dict = {}
        fns = []
        for p, sess in zip(prepared, sessions):
            arrays = _make_inputs(p.input_dtypes, p.shapes[b], seed, cache)
            fns.append(_runner(sess, dict(zip(p.input_names, arrays)), p.label, b))
        say(f"bench: batch {b}, warm-up", force=True)
        timings = interleaved_timings(
            fns, runs=runs, warmup=warmup,
            on_round=lambda r, b=b: say(f"bench: batch {b}, round {r}/{runs}", force=(r == runs)))
        medians = [float(np.median(t)) * 1e3 for t in timings]
        for p, t, med in zip(prepared, timings, medians):
            results.append(ModelBench(
                path=p.path, batch_size=b, median_ms=med,
                p90_ms=float(np.percentile(t, 90)) * 1e3, macs=p.macs[b], params=p.params,
                file_size=p.file_size, speedup=medians[0] / med if med > 0 else math.inf,
                times_ms=tuple(float(x) * 1e3 for x in t)))
    return results


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def format_table(results: Sequence[ModelBench]) -> str:
    """Plain-text table with aligned columns, one row per model and batch size."""
    labels = dict(zip(dict.fromkeys(r.path for r in results), _labels(list(dict.fromkeys(r.path for r in results)))))
    header = ("model", "batch", "median ms", "p90 ms", "speed-up", "MMACs", "params", "size")
    rows = [(labels[r.path], str(r.batch_size), f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}",
             f"{r.speedup:.2f}x", f"{r.macs / 1e6:.2f}", f"{r.params:,}", fmt_bytes(r.file_size))
            for r in results]
    return "\n".join(text_table([header, *rows]))


def _header(threads: int, runs: int, warmup: int, seed: int, batch_sizes: Sequence[int],
            allow_spinning: bool, providers: Sequence[str]) -> dict:
    return {
        "tool": "onnx-dwdecomp bench",
        **environment(providers, threads),
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "inter_op_threads": 1,
        "allow_spinning": allow_spinning,
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "batch_sizes": list(batch_sizes),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parse_batch_sizes(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",")]
    try:
        sizes = [int(t) for t in parts]
    except ValueError:
        raise OptionError(f"--batch-sizes expects positive integers separated by commas, "
                          f"e.g. 1,8; got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise OptionError(f"--batch-sizes expects positive integers separated by commas, "
                          f"e.g. 1,8; got {text!r}")
    return sizes


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags (cli.py builds the parser)."""
    p.add_argument("models", nargs="*", metavar="MODEL.onnx", help="models to compare (at least one)")
    p.add_argument("--batch-sizes", default="1", metavar="B1,B2,...",
                   help="batch sizes to benchmark, e.g. 1,8 (default: 1)")
    p.add_argument("--threads", default=None, metavar="N",
                   help=f"onnxruntime intra-op threads (default: CPUs available, {default_threads()})")
    p.add_argument("--runs", default="50", metavar="N", help="timed rounds (default: 50)")
    p.add_argument("--warmup", default="5", metavar="N", help="warm-up calls per model (default: 5)")
    p.add_argument("--input-shape", action="append", default=[], metavar="[NAME:]D0,D1,...",
                   help="fix the dims of inputs, as for decompose: NAME:D0,D1,... (several after one "
                        "flag, each applied to every model with such an input), or bare D0,D1,... for "
                        "models with a single input (each model's one input); dim 0 is replaced by the "
                        "batch size")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results and a header (versions, settings, date) as JSON")
    p.add_argument("--seed", default="0", metavar="N", help="seed of the random inputs (default: 0)")
    p.add_argument("--allow-spinning", action="store_true",
                   help="keep onnxruntime's thread spinning on (its default); off by default "
                        "because one model's spinning threads slow down the next one")
    p.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), metavar="NAME[,NAME...]",
                   help="onnxruntime execution providers in priority order (default: CPUExecutionProvider)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=version_line())


def run_bench_command(args: argparse.Namespace) -> int:
    """``onnx-dwdecomp bench ...`` from parsed arguments; returns the exit code.

    Raises :class:`~onnx_dwdecomp.errors.UserError` for bad flags or models; the caller prints it.
    """
    shapes = args.input_shape
    models = args.models
    if not models:
        raise OptionError("bench needs at least one model file (see onnx-dwdecomp bench --help)")
    batch_sizes = _parse_batch_sizes(args.batch_sizes)
    threads = None if args.threads is None else parse_int(args.threads, "--threads", 1)
    runs = parse_int(args.runs, "--runs", 1)
    warmup = parse_int(args.warmup, "--warmup", 0)
    seed = parse_int(args.seed, "--seed", 0)
    providers = check_providers(args.providers)
    overrides = parse_input_shapes(shapes)  # the parser decompose uses; bare dims under the name ""
    json_path = Path(args.json) if args.json else None
    if json_path is not None:  # before the (long) benchmark
        if any(json_path.resolve() == Path(m).resolve() for m in models):
            raise OptionError(f"--json {json_path}: would overwrite a model being benchmarked; choose another path")
        check_writable(json_path, "--json")

    reporter = None if args.quiet else Progress(interval=1.0)
    try:
        results = run_bench(models, batch_sizes=batch_sizes, threads=threads, runs=runs,
                            warmup=warmup, input_shapes=overrides, seed=seed, progress=reporter,
                            allow_spinning=args.allow_spinning, providers=providers)
    finally:
        if reporter is not None:
            reporter.close()
    threads_used = default_threads() if threads is None else threads
    header = _header(threads_used, runs, warmup, seed, batch_sizes, args.allow_spinning, providers)
    if json_path is not None:  # before printing: a reader that stops early must not cost the file
        payload = {"header": header, "results": [r.to_json() for r in results]}
        write_text_atomic(json_path, json.dumps(payload, indent=2) + "\n", flag="--json")
    print_to_stdout(f"onnxruntime {header['onnxruntime']} {','.join(providers)}, {threads_used} intra-op thread"
                    f"{'s' if threads_used != 1 else ''}, ORT_ENABLE_ALL, spinning "
                    f"{'on' if args.allow_spinning else 'off'}; {runs} interleaved rounds after {warmup} "
                    f"warm-up; speed-up = first model's median / median\n{format_table(results)}")
    return 0
