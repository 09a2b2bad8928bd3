"""The plan's trade-off as a picture (``--plot FILE.png|svg``): what other output error bounds
would give, with the chosen plan and the measured rounds marked.

Left panel: predicted output error (x) against the predicted model latency ratio — or, when
the whole model was not timed, the candidate convs' latency ratio, or the MACs ratio — (y) for
each bound of the report's frontier; the verified rounds as measured points; the chosen plan
circled. Right panel: the same points against the MACs ratio — or, in task-aware mode
(``--eval``), the user's score of each evaluated plan against its MACs ratio, with the input
model's score and the tolerance line (the lowest score allowed), the chosen plan circled.
Needs matplotlib (the ``plot`` extra); it is imported only here.
"""

from __future__ import annotations

import io
import os

from .errors import OptionError

FORMATS = (".png", ".svg")


def check_plot_path(path: str | os.PathLike) -> str:
    """The format (``"png"``/``"svg"``) of ``path``; :class:`OptionError` for another suffix or
    without matplotlib — before any work is done."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise OptionError(f"--plot {os.fspath(path)}: expected a file name ending in .png or .svg")
    try:
        import matplotlib  # noqa: F401  (optional dependency)
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'onnx-dwdecomp[plot]'") from None
    return suffix[1:]


def _latency_axis(budget: dict) -> tuple[str, str]:
    """(frontier key or "convs", axis label) of the best latency measure the report has."""
    points = budget.get("frontier") or []
    if any(p.get("model_latency_ratio") is not None for p in points):
        return "model_latency_ratio", "predicted model latency (× all-regular)"
    if budget.get("latency_ms_before"):
        return "convs", "predicted latency of the candidate convs (× regular)"
    return "macs_ratio", "MACs (× input model)"


def frontier_plot(budget: dict, fmt: str) -> bytes:
    """The figure of a report's ``budget`` record as ``fmt`` bytes (deterministic: no dates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.hashsalt": "onnx_dwdecomp"}):  # same ids, same bytes
        return _draw(plt, budget, fmt)


def _draw_scores(ax, budget: dict) -> None:
    """Task-aware mode: each scored plan's score against its MACs ratio, the input's score and
    the tolerance line; the plan handed back circled."""
    ax.clear()
    original = max(budget.get("original_macs") or 1, 1)
    rounds = budget.get("rounds", [])
    scored = [(k, (r["predicted_macs"] or 0) / original, r["score"], r.get("within"))
              for k, r in enumerate(rounds) if r.get("score") is not None]
    for within, color, text in ((True, "tab:green", "scored plan, within tolerance"),
                                (False, "tab:orange", "scored plan, outside")):
        pts = [(x, y) for _, x, y, w in scored if bool(w) is within]
        if pts:
            ax.plot(*zip(*pts), "o", color=color, label=text)
    tolerance = budget.get("tolerance") or {}
    base, drop = tolerance.get("input_score"), tolerance.get("allowed_drop")
    if base is not None:
        ax.axhline(base, color="tab:blue", linewidth=1, label="input model's score")
        if drop is not None:
            ax.axhline(base - drop, color="tab:gray", linestyle="--", linewidth=1, label="tolerance")
    chosen = budget.get("chosen_round")
    for k, x, y, _ in scored:
        if k == chosen and not rounds[k].get("fallback"):
            ax.plot([x], [y], "o", markersize=14, markerfacecolor="none", markeredgecolor="tab:red",
                    label="chosen plan")
    ax.set_xlabel("MACs (× input model)")
    ax.set_ylabel("score (--eval)")
    ax.grid(True, alpha=0.3)


def _draw(plt, budget: dict, fmt: str) -> bytes:

    points = budget.get("frontier") or []
    key, label = _latency_axis(budget)
    before = budget.get("latency_ms_before") or 0.0

    def speed(p: dict) -> float | None:
        if key == "convs":
            return None if p.get("latency_ms") is None or not before else p["latency_ms"] / before
        return p.get(key)

    fig, (ax_lat, ax_macs) = plt.subplots(1, 2, figsize=(10, 4.2))
    xs = [p["predicted_output_rel_l2"] for p in points]
    for ax, ys, ylabel in ((ax_lat, [speed(p) for p in points], label),
                           (ax_macs, [p["macs_ratio"] for p in points], "MACs (× input model)")):
        pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pairs:
            ax.plot(*zip(*pairs), "o-", color="tab:blue", label="frontier (predicted, per bound)")
        labelled = set()
        for p, x, y in zip(points, xs, ys):
            if y is not None and p["bound"] is not None and (x, y) not in labelled:  # looser bounds, same plan: once
                labelled.add((x, y))
                ax.annotate(f"{p['bound']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if p.get("chosen") and y is not None:
                ax.plot([x], [y], "o", markersize=14, markerfacecolor="none", markeredgecolor="tab:red",
                        label="chosen plan")
        ax.set_xlabel("output error (per-feature rel. L2, held-out)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    timed = budget.get("model_latency")
    if timed and key == "model_latency_ratio" and budget.get("measured_output_rel_l2") is not None \
            and not budget["rounds"][budget["chosen_round"]].get("fallback"):
        ax_lat.plot([budget["measured_output_rel_l2"]], [timed["ratio"]], "x", color="tab:green", markersize=9,
                    label="chosen plan (measured)")
    measured = [(r["measured_output_rel_l2"], (r["predicted_macs"] or 0) / max(budget["original_macs"], 1))
                for r in budget.get("rounds", []) if r.get("measured_output_rel_l2") is not None]
    if budget.get("mode") == "task":
        _draw_scores(ax_macs, budget)
    elif measured:
        ax_macs.plot(*zip(*measured), "x", color="tab:green", label="verified rounds (measured)")
    if budget.get("mode") == "max_error":
        for ax in (ax_lat, ax_macs):
            ax.axvline(budget["target"], color="tab:gray", linestyle="--", linewidth=1, label="bound")
    for ax in (ax_lat, ax_macs):
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle("onnx_dwdecomp plan: error against speed for other bounds")
    fig.tight_layout()
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buffer, format=fmt, dpi=110, metadata=metadata)
    plt.close(fig)
    return buffer.getvalue()
