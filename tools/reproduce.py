"""Regenerate ``docs/RESULTS.md`` and its plots: the paper's experiments on the trained MNIST models.

Usage::

    python tools/reproduce.py [--out-dir docs] [--threads 2] [--finetune-epochs 5] [--quick]

Needs the ``tools`` extra (matplotlib), torch (CPU, for the fine-tune column only) and the
package itself; reads ``models/mnist/`` (see its README) and writes ``RESULTS.md``,
``single_layer.png`` and ``top1_vs_calib.png`` into ``--out-dir``. Decomposed models go to a
private temporary folder (``--keep-models DIR`` keeps them). Everything is seeded; the numbers
depend only on the package version and the models (the latencies also on the machine's load).

What it runs (issue #4, point 4):

a. **Single-layer study** — for every regular 3×3 conv except the stem, the relative response
   error on held-out calibration samples, ``E‖Wx + b − Ŵx̂ − b̂‖² / E‖Wx − E[Wx]‖²``, of svd,
   gsvd (symmetric / asymmetric) and channel decomposition at matched MACs, multipliers 1 and 2,
   in two settings: *isolated* (only this layer decomposed, inputs from the original network —
   there symmetric and asymmetric coincide) computed from the package's own calibration
   primitives (``calibration.moments.MomentSums`` / ``extract_patches`` / ``split_holdout``) and solvers
   (``solve.*_factors``); and *in sequence* (every layer decomposed, earlier layers already
   replaced), which is the per-layer ``rel_error`` of ``decompose``'s report.
b. **Whole network** — top-1 on ``test.npz`` of the original regular model, the standard model
   trained from scratch and each method after decomposition against calibration-set size (the
   first N of ``calib.npz``; N = 32 / 128 / 256 / 512), multiplier 1, stem excluded, no
   fine-tune; plus a fine-tune column (a few seeded epochs in torch on the MNIST training split
   of ``tools/train.py``, the decomposed ONNX run in torch by ``tools/onnx_torch.py``'s
   ``onnx_to_torch``, the trained weights written back into the same ONNX graph by its
   ``replace_initializers``).
c. **Cost** — MACs, parameters and onnxruntime latency (``onnx_dwdecomp.bench.run_bench``: the
   models timed interleaved in one run, median) of the regular, decomposed and standard models.
d. **Discussion** — verdicts on the paper's claims derived from the numbers (``repro.claims``).
e. **Per-layer multiplier budgets** (issue #6, section 4) — at N = 256 and 512, gsvd at uniform
   multiplier 2 vs ``target_macs`` = the MACs fraction that reached vs ``max_error`` = 0.05
   (``tools/budget_study.py``'s ``study``, verification on): top-1, MACs, held-out output rel. L2,
   the per-layer multipliers, whether the budget was met.

This file is the command line and the order of the runs; the parts are the modules of
``tools/repro/`` (configurations, formatting, results, experiments, fine-tune, claims,
discussion, rendering, plots; see its ``__init__``). torch and matplotlib are imported only
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

import budget_study
from evaluate import evaluate
from provenance import git_description, machine_info
from repro import finetune
from repro.config import (
    BUDGET_CALIB_SIZES,
    BUDGET_CONFIGS,
    BUDGET_MAX_ERROR,
    BUDGET_MULTIPLIER,
    CALIB,
    CALIB_SIZES,
    CHANNEL,
    GSVD_ASYM,
    METHOD_CONFIGS,
    MULTIPLIERS,
    REGULAR,
    ROOT,
    SEED,
    STANDARD,
    TEST,
)
from repro.discussion import discussion
from repro.experiments import isolated_layer_errors, run_bench_models, run_decompose
from repro.formatting import fmt_count, fmt_pct
from repro.plots import plot_single_layer, plot_top1
from repro.render import render_results
from repro.results import BudgetRow, Results, RunResult, budget_row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime / torch threads")
    parser.add_argument("--finetune-epochs", type=int, default=finetune.EPOCHS)
    parser.add_argument("--finetune-lr", type=float, default=finetune.LR)
    parser.add_argument("--bench-runs", type=int, default=200)
    parser.add_argument("--keep-models", type=Path, default=None, metavar="DIR",
                        help="write the decomposed / fine-tuned models here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true",
                        help="debug run: stage 2 only, N = 32 / 64, one fine-tune epoch, a short bench "
                             "(writes to --out-dir all the same: point it elsewhere)")
    args = parser.parse_args(argv)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    sizes = (32, 64) if args.quick else CALIB_SIZES
    budget_sizes = (max(sizes),) if args.quick else BUDGET_CALIB_SIZES
    include = ("/stage2/*",) if args.quick else ()
    epochs = 1 if args.quick else args.finetune_epochs
    bench_runs = 30 if args.quick else args.bench_runs
    machine = machine_info()
    machine["git"] = git_description()
    command = "python tools/reproduce.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                             if (argv if argv is not None else sys.argv[1:]) else "")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="reproduce_") as tmp:
        work = args.keep_models or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        say("originals")
        regular_top1 = evaluate(REGULAR, TEST, threads=args.threads)
        standard_top1 = evaluate(STANDARD, TEST, threads=args.threads)
        say(f"  regular {fmt_pct(regular_top1, 2)}, standard {fmt_pct(standard_top1, 2)}")

        say(f"(a) isolated single-layer study, N = {max(sizes)}")
        layers, shapes, macs, isolated = isolated_layer_errors(REGULAR, CALIB, max(sizes), MULTIPLIERS,
                                                               include, say)

        say("(b) whole network, multiplier 1; (a) in-sequence errors")
        runs: list[RunResult] = []
        models: dict[tuple[str, int | None, int], onnx.ModelProto] = {}
        for cfg in METHOD_CONFIGS:
            for n in ((max(sizes),) if cfg.data_free else sizes):
                res, model = run_decompose(cfg, n, 1, work, args.threads, include, say)
                runs.append(res)
                models[(cfg.key, res.calib_size, 1)] = model
        notes: list[str] = []
        say("(a) in-sequence errors, multiplier 2")
        for cfg in METHOD_CONFIGS:
            res, _ = run_decompose(cfg, max(sizes), 2, work, args.threads, include, say)
            runs.append(res)
        from onnx_dwdecomp.pipeline import DecomposeOptions
        budget_option = "target_macs" in {f.name for f in dataclasses.fields(DecomposeOptions)}
        budget_rows: list[BudgetRow] = []
        if budget_option:
            for n in budget_sizes:
                say(f"(e) per-layer budgets, N = {n}: uniform r={BUDGET_MULTIPLIER}, target_macs, "
                    f"max_error {BUDGET_MAX_ERROR:g}")
                rows = budget_study.study(str(CALIB), work, BUDGET_MULTIPLIER, (BUDGET_MAX_ERROR,), say,
                                          threads=args.threads, calib_size=n, seed=SEED,
                                          **({"include": include} if include else {}))
                budget_rows += [budget_row(row, n) for row in rows]  # labels: the BUDGET_CONFIGS keys
            # The uniform budget row is the section-2 multiplier-2 gsvd run with verification on:
            # the same model, so the same top-1.
            for row in budget_rows:
                same = next((r for r in runs if r.config == GSVD_ASYM.key and r.multiplier == BUDGET_MULTIPLIER
                             and r.calib_size == row.calib_size), None)
                if row.config == BUDGET_CONFIGS[0].key and same is not None and (
                        same.top1 != row.top1 or same.macs != row.macs):
                    notes.append(f"Check failed: uniform r={BUDGET_MULTIPLIER} at N = {row.calib_size} gives "
                                 f"top-1 {fmt_pct(row.top1, 2)} / {row.macs} MACs in section 4 but "
                                 f"{fmt_pct(same.top1, 2)} / {same.macs} MACs in section 1.")

        # Consistency: the first layer sees the original input in both settings (x̂ = x), so the
        # in-sequence gsvd error of layer 1 must equal the isolated one.
        first = layers[0]
        seq_first = next(r for r in runs if r.config == GSVD_ASYM.key and r.calib_size == max(sizes)
                         and r.multiplier == 1).layer_errors.get(first)
        iso_first = isolated[(first, "gsvd", 1)]
        if seq_first is None or not math.isclose(seq_first, iso_first, rel_tol=1e-3):
            notes.append(f"Check failed: first-layer gsvd error isolated {iso_first:.4e} vs in sequence "
                         f"{seq_first} — the two settings do not use the same statistics.")
        say(f"  consistency: layer 1 gsvd isolated {iso_first:.4e}, in sequence {seq_first:.4e}")

        say(f"(b) fine-tune ({epochs} epochs) of the N = {max(sizes)} models")
        recipe = finetune.make_recipe(epochs, args.finetune_lr)
        finetuned: dict[str, float] = {}
        ft_seconds = []
        for cfg in METHOD_CONFIGS:
            key = (cfg.key, None if cfg.data_free else max(sizes), 1)
            tuned, log = finetune.finetune(models[key], recipe, args.threads, say)
            path = work / f"{cfg.key}_finetuned.onnx"
            onnx.save(tuned, str(path))
            finetuned[cfg.key] = evaluate(path, TEST, threads=args.threads)
            ft_seconds.append(log["seconds"])
            say(f"  {cfg.label}: fine-tuned top-1 {fmt_pct(finetuned[cfg.key], 2)} ({log['seconds']:.0f} s, "
                f"torch/onnxruntime max diff {log['check_diff']:.1e})")
        ft_info = dict(dataclasses.asdict(recipe), seed=SEED, threads=args.threads,
                       seconds_per_model=float(np.median(ft_seconds)))

        say("(c) cost and latency")
        gsvd_path = Path(next(r.path for r in runs if r.config == GSVD_ASYM.key and r.calib_size == max(sizes)
                              and r.multiplier == 1))
        chan_path = Path(next(r.path for r in runs if r.config == CHANNEL.key and r.calib_size == max(sizes)
                              and r.multiplier == 1))
        bench, bench_info = run_bench_models(
            [("regular (original)", REGULAR), ("decomposed, separable (gsvd; svd same graph)", gsvd_path),
             ("decomposed, channel", chan_path), ("standard ShuffleNet V2", STANDARD)],
            args.threads, bench_runs, 20)
        per_image = [b for b in bench if b.batch_size == 1] or bench
        bench_info["regular_macs"] = per_image[0].macs // per_image[0].batch_size
        bench_info["standard_macs"] = per_image[-1].macs // per_image[-1].batch_size
        for b in bench:
            say(f"  {b.label}: {fmt_count(b.macs)} MACs, {fmt_count(b.params)} params, {b.median_ms:.3f} ms")

    machine["cpu_seconds"] = f"{time.process_time() - cpu_start:.0f}"
    results = Results(command=command, date=date, machine=machine, seconds=time.perf_counter() - t_start,
                      regular_top1=regular_top1, standard_top1=standard_top1, layers=layers,
                      layer_shapes=shapes, layer_macs=macs, isolated=isolated, runs=runs,
                      finetune=finetuned, finetune_info=ft_info, bench=bench, bench_info=bench_info,
                      calib_sizes=tuple(sizes), notes=notes, budget_rows=budget_rows,
                      budget_option=budget_option)
    if args.quick:
        results.notes.insert(0, "QUICK DEBUG RUN (--quick): small calibration sets, one fine-tune epoch, "
                                "short bench; not the published results.")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_single_layer(results, args.out_dir / "single_layer.png")
    plot_top1(results, args.out_dir / "top1_vs_calib.png")
    text = render_results(results, discussion(results))
    (args.out_dir / "RESULTS.md").write_text(text)
    say(f"wrote {args.out_dir / 'RESULTS.md'} and 2 plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
