"""Time the whole ``python -m onnx_dwdecomp`` process against one plain onnxruntime pass (issue #14).

What a user sees: the wall clock of the decompose *process* (imports, start-up, every phase of
the default job, writing the model and the report), over one plain onnxruntime forward pass of
the input model over the same images in a fresh process. Both run as subprocesses, interleaved
round by round (the machine is shared and noisy; ratios of neighbouring runs are what count).

- model: the merged regular counterpart of ShuffleNet V2 (``zoo.shufflenet_v2(width, "merged")``,
  random weights) at 224², written once into a temporary folder with the calibration ``.npz``
  (``--images`` seeded standard-normal images, key ``input``); or, with ``--model PATH --calib
  PATH`` (both), that model and ``.npz``, used where they are (not copied). The model must have
  one input; the reference reads the ``.npz`` array whose key is that input's name, or else its
  only array (``tools/make_residual_cnn.py`` writes such pairs);
- decompose: ``python -m onnx_dwdecomp model.onnx --calib calib.npz -o out.onnx --report r.json
  --quiet`` (default options; anything after ``--`` is passed through), wall clock of the
  process and its peak RSS (``os.wait4``: the child's own ``ru_maxrss``);
- reference: a fresh process makes one ``InferenceSession`` (default ``SessionOptions`` but
  ``intra_op_num_threads=2``, ``CPUExecutionProvider``) and runs the images in batches of 16.
  It reports session creation and the run loop separately; the ratio's denominator is
  **session creation + run loop** (the issue's "a fresh InferenceSession"); the ratio over the
  run loop alone is printed too. Imports of the reference process are not counted.

Both children run in the temporary folder and import ``onnx_dwdecomp`` from this checkout
(``PYTHONPATH``), or, for ``--baseline TREE``, the decompose process also from ``TREE`` in the
same round (the order of the two alternates), for before/after comparisons on a noisy machine.

Timing cache (``--cache``): ``warm`` (default) keeps one timing-cache file in the temporary
folder; a first, *cold* round fills it and is reported on its own, then ``--rounds`` warm rounds
are timed — the median is over the warm rounds, the case of a user's second run. ``cold``
deletes the file before every round; ``none`` passes ``--no-timing-cache``.

    python tools/bench_decompose.py                      # 128 images, cold round + 5 warm rounds
    python tools/bench_decompose.py --images 512 --rounds 1   # memory check
    python tools/bench_decompose.py -- --multiplier 1 --select all
    python tools/bench_decompose.py --baseline /tmp/old_tree    # A/B: the same rounds with another
                                                                # source tree's onnx_dwdecomp, interleaved
    python tools/make_residual_cnn.py --convs 48 --out-dir /tmp/res48      # any model + calibration .npz
    python tools/bench_decompose.py --model /tmp/res48/model.onnx --calib /tmp/res48/calib.npz

Random inputs have other statistics than photos, but the work done (forward passes, moment
sums, solves) depends on shapes; the plan (which convs, which multipliers) can differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

REFERENCE = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
model, calib, batch, threads, name, key = sys.argv[1:7]
batch, threads = int(batch), int(threads)
x = np.load(calib)[key]
t0 = time.perf_counter()
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
for start in range(0, len(x), batch):
    session.run(None, {name: x[start:start + batch]})
t2 = time.perf_counter()
print(json.dumps({"session_s": t1 - t0, "run_s": t2 - t1}))
"""


def _run(cmd: list[str], cwd: str, tree: Path = ROOT) -> tuple[float, int, int, str]:
    """(wall seconds, exit status, peak RSS in bytes, stdout+stderr) of one child process that
    imports onnx_dwdecomp from ``tree``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with tempfile.TemporaryFile(mode="w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return wall, proc.returncode, usage.ru_maxrss * 1024, out.read()


def model_input(model_path: Path) -> str:
    """The name of the model's single graph input (initializers are not inputs); SystemExit otherwise."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(names) != 1:
        raise SystemExit(f"{model_path}: the reference pass needs a model with one input, it has {len(names)}: {names}")
    return names[0]


def calib_key(calib_path: Path, name: str) -> tuple[str, tuple[int, ...]]:
    """The ``.npz`` member for input ``name`` — the key ``name``, or else the only array — and its
    shape (read from the member's header; the data is not loaded); SystemExit otherwise."""
    import zipfile

    try:
        with zipfile.ZipFile(calib_path) as zf:
            keys = {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}
            key = name if name in keys else next(iter(keys)) if len(keys) == 1 else None
            if key is None:
                raise SystemExit(f"{calib_path}: no array {name!r} (the model's input) and not a single array: "
                                 f"{sorted(keys)}")
            with zf.open(keys[key]) as member:
                version = np.lib.format.read_magic(member)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                shape = read[version](member)[0] if version in read else \
                    np.lib.format._read_array_header(member, version)[0]  # 3.0: no public reader
    except (OSError, zipfile.BadZipFile) as exc:
        raise SystemExit(f"{calib_path}: not a readable .npz file ({exc})") from exc
    return key, tuple(shape)


def _breakdown(report: dict) -> str:
    timing = report.get("timing_s", {})
    calib = (report.get("calibration") or {}).get("timing_s", {})
    parts = [f"{k} {v:.2f}" for k, v in timing.items()]
    line = "timing_s: " + ", ".join(parts)
    if calib:
        line += "\n    calibration.timing_s (chosen round): " + ", ".join(f"{k} {v:.2f}" for k, v in calib.items())
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="bench this ONNX model (with --calib) instead of ShuffleNet V2")
    parser.add_argument("--calib", type=Path, help="its calibration .npz (with --model)")
    parser.add_argument("--width", type=float, help="ShuffleNet V2 width (default 1.0; not with --model)")
    parser.add_argument("--images", type=int, help="ShuffleNet V2 images (default 128; not with --model)")
    parser.add_argument("--image-size", type=int, help="ShuffleNet V2 input side (default 224; not with --model)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds timed (default 5)")
    parser.add_argument("--cache", choices=["warm", "cold", "none"], default="warm",
                        help="timing cache: warm (one cold round first, reported apart), cold (deleted "
                             "before every round), none (--no-timing-cache)")
    parser.add_argument("--ref-batch", type=int, default=16)
    parser.add_argument("--ref-threads", type=int, default=2)
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--baseline", metavar="TREE", type=Path,
                        help="also time, in every round, the decompose process importing onnx_dwdecomp from "
                             "TREE (a copy of an older source tree): interleaved A/B")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.calib is None):
        parser.error("--model and --calib go together")
    if args.model is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("width", "images", "image_size") if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)}: ShuffleNet V2 options, not for --model")
        for path in (args.model, args.calib):
            if not path.is_file():
                parser.error(f"no such file: {path}")
    else:
        args.width = 1.0 if args.width is None else args.width
        args.images = 128 if args.images is None else args.images
        args.image_size = 224 if args.image_size is None else args.image_size

    with tempfile.TemporaryDirectory(prefix="bench_decompose_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache_path = work / "timing_cache.json"
        if args.model is not None:  # referenced where they are (absolute: the children run in work/)
            model_path, calib_path = args.model.resolve(), args.calib.resolve()
            input_name = model_input(model_path)
            key, shape = calib_key(calib_path, input_name)
            args.images = shape[0] if shape else 1
            what = (f"model: {args.model} (input {input_name!r} ← {args.calib}[{key!r}], "
                    f"{' × '.join(map(str, shape))})")
        else:
            import onnx

            from onnx_dwdecomp import zoo

            model_path, calib_path = work / "model.onnx", work / "calib.npz"
            onnx.save_model(zoo.shufflenet_v2(args.width, "merged", image_size=args.image_size), str(model_path))
            images = np.random.default_rng(0).standard_normal(
                (args.images, 3, args.image_size, args.image_size), dtype=np.float32)
            np.savez(calib_path, input=images)
            del images
            input_name, key = "input", "input"
            what = f"model: ShuffleNet V2 x{args.width} merged, {args.image_size}², {args.images} images"
        py = sys.executable
        decompose = [py, "-m", "onnx_dwdecomp", str(model_path), "--calib", str(calib_path),
                     "-o", str(work / "out.onnx"), "--report", str(work / "report.json"), "--quiet"]
        decompose += ["--no-timing-cache"] if args.cache == "none" else ["--timing-cache", str(cache_path)]
        decompose += extra
        reference = [py, "-c", REFERENCE, str(model_path), str(calib_path), str(args.ref_batch),
                     str(args.ref_threads), input_name, key]
        print(f"{what}; "
              f"decompose: default options{' + ' + ' '.join(extra) if extra else ''}, cache {args.cache}; "
              f"reference: fresh session, batch {args.ref_batch}, {args.ref_threads} threads")

        trees = {"this": ROOT} if args.baseline is None else {"this": ROOT, "baseline": args.baseline.resolve()}
        rounds: dict[str, list[dict]] = {name: [] for name in trees}
        plan = ["cold"] + ["timed"] * args.rounds if args.cache == "warm" else ["timed"] * args.rounds
        for i, kind in enumerate(plan):
            # per round: the reference, then each tree's decompose (their order alternates)
            _, rc, _, text = _run(reference, str(work))
            if rc != 0:
                print(text, file=sys.stderr)
                raise SystemExit(f"reference exited {rc}")
            ref = json.loads(text.strip().splitlines()[-1])
            denom = ref["session_s"] + ref["run_s"]
            order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                if args.cache == "cold" or (args.cache == "warm" and kind == "cold"):
                    cache_path.unlink(missing_ok=True)
                wall, rc, rss, text = _run(decompose, str(work), tree)
                if rc != 0:
                    print(text, file=sys.stderr)
                    raise SystemExit(f"decompose ({name}: {tree}) exited {rc}")
                report = json.loads((work / "report.json").read_text())
                row = {"kind": kind, "decompose_s": wall, "peak_rss_mb": rss / 2**20, "ref_session_s": ref["session_s"],
                       "ref_run_s": ref["run_s"], "ratio": wall / denom, "ratio_run_only": wall / ref["run_s"],
                       "report_total_s": report["timing_s"].get("total"), "timing_s": report["timing_s"],
                       "calibration_timing_s": (report.get("calibration") or {}).get("timing_s"),
                       "rewritten": len(report.get("layers", [])),
                       "multipliers": {layer["name"]: layer["multiplier"] for layer in report.get("layers", [])}}
                rounds[name].append(row)
                label = "cold " if kind == "cold" else f"#{sum(r['kind'] == 'timed' for r in rounds[name])}   "
                tag = f"[{name}] " if len(trees) > 1 else ""
                print(f"{label} {tag}decompose {wall:6.2f} s (report total {row['report_total_s']:.2f}, outside "
                      f"{wall - row['report_total_s']:.2f}), peak RSS {row['peak_rss_mb']:6.0f} MB | reference "
                      f"session {ref['session_s']:.3f} + run {ref['run_s']:.3f} s | ratio {row['ratio']:5.2f} "
                      f"(run only {row['ratio_run_only']:5.2f}) | {row['rewritten']} convs rewritten", flush=True)
                print("      " + _breakdown(report).replace("\n", "\n      "), flush=True)

        summary = {"images": args.images, "width": args.width, "cache": args.cache, "extra_args": extra,
                   "model": str(model_path) if args.model is not None else None}
        for name, tree in trees.items():
            timed = [r for r in rounds[name] if r["kind"] == "timed"]
            result = {
                "tree": str(tree),
                "median_ratio": statistics.median(r["ratio"] for r in timed),
                "median_ratio_run_only": statistics.median(r["ratio_run_only"] for r in timed),
                "median_decompose_s": statistics.median(r["decompose_s"] for r in timed),
                "median_reference_s": statistics.median(r["ref_session_s"] + r["ref_run_s"] for r in timed),
                "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rounds[name]),
                "median_timing_s": {k: statistics.median(r["timing_s"].get(k, 0.0) for r in timed)
                                    for k in timed[-1]["timing_s"]},
                "rounds": rounds[name],
            }
            summary[name] = result
            tag = f"[{name}] " if len(trees) > 1 else ""
            print(f"{tag}median over {len(timed)} {'warm ' if args.cache == 'warm' else ''}round(s): decompose "
                  f"{result['median_decompose_s']:.2f} s / reference {result['median_reference_s']:.3f} s = "
                  f"{result['median_ratio']:.2f}× (run loop only: {result['median_ratio_run_only']:.2f}×); "
                  f"peak RSS {result['max_peak_rss_mb']:.0f} MB")
            print(f"{tag}median timing_s: " + ", ".join(f"{k} {v:.2f}" for k, v in result["median_timing_s"].items()))
        if len(trees) > 1:
            pairs = [a["decompose_s"] / b["decompose_s"] for a, b in zip(rounds["this"], rounds["baseline"])
                     if a["kind"] == "timed"]
            summary["this_over_baseline"] = pairs
            print("this / baseline decompose time per round: " + ", ".join(f"{p:.3f}" for p in pairs)
                  + f"; median {statistics.median(pairs):.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
