"""The two figures of RESULTS.md: per-layer errors (section 1) and top-1 against N (section 2).

matplotlib is imported inside the functions only (Agg backend, PNG files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import CHANNEL, GSVD_ASYM, GSVD_SYM, ISOLATED_KEYS, SVD
from .formatting import fmt_pct, short_layer_name
from .results import Results


def plot_single_layer(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = max(res.calib_sizes)
    fig, axes = plt.subplots(len(res.multipliers), 2, figsize=(15, 4.2 * len(res.multipliers)),
                             sharey=True, squeeze=False)
    x = np.arange(len(res.layers))
    colors = {"svd": "#999999", "gsvd": "#1f77b4", "gsvd_sym": "#9ecae1", "gsvd_asym": "#1f77b4",
              "channel": "#ff7f0e"}
    for row, r in enumerate(res.multipliers):
        iso = [(k, {"svd": "svd", "gsvd": "gsvd (sym = asym)", "channel": "channel"}[k],
                [res.isolated.get((ly, k, r), np.nan) for ly in res.layers]) for k in ISOLATED_KEYS]
        seq = []
        for cfg in (SVD, GSVD_SYM, GSVD_ASYM, CHANNEL):
            run = res.run(cfg.key, big, r)
            if run is not None:
                seq.append((cfg.key, cfg.label.replace(" (data-free)", ""),
                            [run.layer_errors.get(ly, np.nan) for ly in res.layers]))
        for col, (title, series) in enumerate((("isolated (only this layer decomposed)", iso),
                                               ("in sequence (all layers decomposed)", seq))):
            ax = axes[row][col]
            width = 0.8 / max(len(series), 1)
            for i, (key, label, vals) in enumerate(series):
                ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label, color=colors[key])
            ax.set_yscale("log")
            ax.set_ylim(5e-4, 20)  # headroom for the legend above the bars
            ax.set_title(f"{title}, multiplier {r}", fontsize=10)
            ax.set_xticks(x, [short_layer_name(ly) for ly in res.layers], rotation=70, fontsize=7)
            ax.grid(axis="y", which="major", alpha=0.3)
            if col == 0:
                ax.set_ylabel("relative response error (held-out)")
            ax.legend(fontsize=8, ncol=len(series), loc="upper center")
    fig.suptitle(f"Per-layer relative response error, trained ShuffleNet V2 x0.5 regular (MNIST), "
                 f"{big} calibration images, matched MACs", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_top1(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = list(res.calib_sizes)
    styles = {GSVD_ASYM.key: ("#1f77b4", "o"), GSVD_SYM.key: ("#9ecae1", "s"), CHANNEL.key: ("#ff7f0e", "^")}
    lows = [res.regular_top1, res.standard_top1]
    for cfg in (GSVD_ASYM, GSVD_SYM, CHANNEL):
        vals = [res.top1(cfg.key, n) for n in sizes]
        pts = [(n, 100 * v) for n, v in zip(sizes, vals) if v is not None]
        if pts:
            color, marker = styles[cfg.key]
            ax.plot(*zip(*pts), marker=marker, color=color, label=cfg.label)
            lows += [v for v in vals if v is not None]
        ft = res.finetune.get(cfg.key)
        if ft is not None:
            color, marker = styles[cfg.key]
            offset = {GSVD_ASYM.key: 1.0, GSVD_SYM.key: 0.95, CHANNEL.key: 1.05}[cfg.key]
            ax.scatter([max(sizes) * 1.25 * offset], [100 * ft], marker=marker, facecolors="none", edgecolors=color,
                       s=60, zorder=3)
    ax.axhline(100 * res.regular_top1, color="black", lw=1, label=f"regular original {fmt_pct(res.regular_top1)}")
    ax.axhline(100 * res.standard_top1, color="green", lw=1, ls="--",
               label=f"standard from scratch {fmt_pct(res.standard_top1)}")
    lo = 100 * min(lows) - 1.0
    svd = res.top1(SVD.key, None)
    if svd is not None:
        if 100 * svd >= lo:
            ax.axhline(100 * svd, color="#999999", lw=1, ls=":", label=f"svd (data-free) {fmt_pct(svd)}")
        else:
            ax.text(sizes[0], lo + 0.2, f"svd (data-free): {fmt_pct(svd)} (below the axis)", fontsize=8,
                    color="#555555")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes + [max(sizes) * 1.25], [str(n) for n in sizes] + ["FT"])
    ax.set_ylim(lo, 100)
    ax.set_xlabel("calibration images N (first N of calib.npz); FT = fine-tuned from N = "
                  f"{max(sizes)} (hollow markers)", fontsize=8)
    ax.set_ylabel("top-1 on 1,000 test digits (%)")
    ax.set_title("Decomposed regular ShuffleNet V2 x0.5 (MNIST), multiplier 1, no fine-tune", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
