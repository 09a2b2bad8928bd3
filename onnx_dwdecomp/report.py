"""What changed and how close the result is: the report object, its JSON form and its table.

``rel_error`` of a layer is its *relative response error on held-out calibration samples*,
``E‖W x + b − Ŵ x̂ − b̂‖² / E‖W x − E[W x]‖²`` (x: the layer's input in the original network,
x̂: in the rewritten network), when calibration data is given; without data it is the relative
*weight* error ``‖W − Ŵ‖_F² / ‖W‖_F²``. ``error_kind`` says which. MACs are per inference at
the resolved input shapes (batch 1 unless ``--input-shape`` says otherwise).

``selection`` says for every candidate conv why it was or was not rewritten; with latency
selection it carries the median onnxruntime latencies of the regular conv and its replacement
measured in isolation (see timing/latency.py). ``folded`` lists the BatchNormalization/Mul/Add nodes
folded into convs before decomposition, ``merged`` the pointwise pairs merged after it (fold.py).

``options`` are the options as resolved (defaults filled in); ``environment`` records the
package versions, CPU, thread count and execution providers the latency decisions depend on.

``budget`` (plans: the default with calibration data, ``--max-error``, ``--target-macs``) is a
plain dict: the mode, target and price, the MACs limit and reachable range, predicted and
measured MACs, latency and output error, whether the bound was met, the rounds run, and per
layer the chosen multiplier (``"skip"`` = kept regular), its latency, predicted and held-out
error, patches and whole curve (multiplier → MACs, latency, predicted error).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .calibration.holdout import MIN_HELDOUT
from .errors import Refused
from .timing.latency import MIN_GAIN
from .verify import Verification

if TYPE_CHECKING:  # fold.py pulls in onnx-graphsurgeon; the report only needs the records
    from .fold import Fold, Merge


@dataclass(frozen=True)
class LayerResult:
    name: str
    weight_shape: tuple[int, ...]
    method: str
    multiplier: int
    macs_before: int
    macs_after: int
    rel_error: float
    error_kind: str  # "response" (held-out data) or "weight" (data-free)
    iterations: int = 0
    fallback_channels: tuple[int, ...] = ()
    rank: int | None = None  # channel decomposition only
    patches: int | None = None  # calibration patches its statistics were fitted on


@dataclass(frozen=True)
class Selection:
    """Why one candidate conv was (not) rewritten; median latencies when it was timed."""

    name: str
    rewritten: bool
    reason: str
    regular_ms: float | None = None
    separable_ms: float | None = None


@dataclass(frozen=True)
class ModelTotals:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    size_before: int  # bytes of the serialized model (weights included)
    size_after: int


@dataclass(frozen=True)
class Report:
    method: str
    layers: tuple[LayerResult, ...]
    skipped: tuple[Refused, ...]
    model: ModelTotals
    verification: Verification | None
    timing_s: dict[str, float]
    notes: tuple[str, ...] = ()
    calibration: dict | None = None
    options: dict = field(default_factory=dict)
    select: str = "all"  # "latency" or "all"
    selection: tuple[Selection, ...] = ()
    folded: tuple["Fold", ...] = ()
    merged: tuple["Merge", ...] = ()
    budget: dict | None = None
    environment: dict = field(default_factory=dict)  # versions, machine, providers (timing.environment)
    memory_estimate: dict | None = None  # resources.check_job: the estimated peak and each phase, bytes

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "options": self.options,
            "environment": self.environment,
            "layers": [asdict(layer) for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "select": self.select,
            "selection": [asdict(s) for s in self.selection],
            "folded": [asdict(f) for f in self.folded],
            "merged": [asdict(m) for m in self.merged],
            "model": asdict(self.model),
            "verification": None,
            "calibration": self.calibration,
            "timing_s": {k: round(v, 4) for k, v in self.timing_s.items()},
            "memory_estimate": self.memory_estimate,
            "job_cost": job_cost(self.timing_s),
            "notes": list(self.notes),
        }
        if self.budget is not None:
            out["budget"] = self.budget
        if self.verification is not None:
            v = self.verification
            out["verification"] = {
                "samples": v.samples,
                "inputs": v.inputs,
                "outputs": {name: asdict(o) for name, o in v.outputs.items()},
            }
            if v.nonfinite:
                out["verification"]["nonfinite"] = {name: asdict(o) for name, o in v.nonfinite.items()}
        return out

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (an infinite error) is written as the string
        ``"inf"``, ``"-inf"`` or ``"nan"`` — JSON has no such numbers."""
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def render(self, verbose: bool = True, source: str | None = None, output: str | None = None) -> str:
        """The terminal report, ending with :meth:`summary`. ``verbose=False`` (the command
        line's default) leaves out the per-conv tables — rewritten convs, latency selection,
        per-layer plan — and groups kept convs by kind of reason; the JSON has everything.
        ``source``/``output`` name the files in the summary's ``bench`` command."""
        lines = self._render_layers() if verbose else self._render_layers_briefly()
        lines += self._render_skipped(verbose)
        if verbose:
            lines += self._render_selection()
        lines += self._render_budget(verbose)
        lines += self._render_model_and_verification(verbose)
        lines += self.summary(source, output)
        while lines and not lines[0]:
            lines.pop(0)
        return "\n".join(lines)

    def _render_layers_briefly(self) -> list[str]:
        if not self.layers:
            return []
        return [f"rewrote {len(self.layers)} conv(s): "
                + _first(f"{layer.name} (r={layer.multiplier})" for layer in self.layers)
                + " — per conv: --verbose or the JSON report"]

    def _render_skipped(self, verbose: bool) -> list[str]:
        if not self.skipped:
            return []
        lines = ["", f"skipped {len(self.skipped)} conv(s):"]
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            brief = not verbose and s.reason.startswith("kept regular by the plan:")
            reason = "kept regular by the plan (each its reason: --verbose)" if brief else s.reason
            by_reason.setdefault(reason, []).append(s.name)
        for reason, names in by_reason.items():
            lines.append(f"  {len(names):3d} × {reason}: {_first(names)}")
        return lines

    def _render_layers(self) -> list[str]:
        lines = []
        rows = [("layer", "weight", "method", "r", "MMACs before → after", "rel. error")]
        for layer in self.layers:
            rows.append((
                layer.name, "×".join(map(str, layer.weight_shape)),
                layer.method + (f" d'={layer.rank}" if layer.rank else ""), str(layer.multiplier),
                f"{layer.macs_before / 1e6:.2f} → {layer.macs_after / 1e6:.2f}",
                _rms(layer.rel_error) + ("" if layer.error_kind == "response" else " (w)"),
            ))
        lines += text_table(rows)
        if self.layers:
            kinds = {layer.error_kind for layer in self.layers}
            lines.append("rel. error: relative RMS error of " + " / ".join(
                what for kind, what in (("response", "the layer's response on held-out samples"),
                                        ("weight", "its weights, (w): no data")) if kind in kinds)
                + " (the output's rel. error is in the same unit)")
        return lines

    def _render_model_and_verification(self, verbose: bool = True) -> list[str]:
        lines = []
        if self.folded:
            lines.append("")
            lines.append(f"folded {len(self.folded)} BatchNormalization/Mul/Add node(s) into their convs "
                         f"before decomposition: " + _first(f"{f.node} → {f.conv}" for f in self.folded))
        if self.merged:
            if not self.folded:
                lines.append("")
            lines.append(f"merged {len(self.merged)} pointwise pair(s) into one 1×1 conv each: "
                         + _first(f"{m.first} + {m.into}" for m in self.merged))
        m = self.model
        lines.append("")
        lines += text_table([
            ("model", "before", "after", "change"),
            ("MACs", f"{m.macs_before / 1e6:.2f} M", f"{m.macs_after / 1e6:.2f} M", _ratio(m.macs_after, m.macs_before)),
            ("params", f"{m.params_before / 1e6:.3f} M", f"{m.params_after / 1e6:.3f} M",
             _ratio(m.params_after, m.params_before)),
            ("size", f"{m.size_before / 2**20:.2f} MiB", f"{m.size_after / 2**20:.2f} MiB",
             _ratio(m.size_after, m.size_before)),
        ])
        if self.verification is not None:
            v = self.verification
            lines.append("")
            lines.append(f"verification on {v.samples} {v.inputs}:")
            rows = [("output", "rel. error", "max abs", "cosine", "top-1 agree")]
            for name, o in v.outputs.items():
                rows.append((name, f"{o.feature_rel_l2:.3e}", f"{o.max_abs:.3e}",
                             f"{o.cosine:.6f}", "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f} %"))
            lines += text_table(rows)
            if verbose:
                lines.append("rel. error: per-feature relative L2 against the calibration outputs' scale "
                             if self.calibration is not None or "calibration" in v.inputs else
                             "rel. error: per-feature relative L2 ")
                lines[-1] += "(the output error --max-error and --max-rel-error bound; verify.py)"
            for name, o in v.nonfinite.items():
                if o.reference:
                    lines.append(f"  {name}: {o.reference} of {o.values} value(s) are NaN/Inf in the input model's own "
                                 f"output; left out of the errors")
        cost = job_cost(self.timing_s)
        if verbose and cost:
            lines.append("")
            lines.append(f"job: {cost['total_s']:.1f} s = {cost['forward_passes']:.1f} forward passes of the calibration "
                         f"set ({cost['forward_pass_s']:.2f} s each, onnxruntime's time for the reference pass): "
                         + ", ".join(f"{name} {n:.1f}" for name, n in cost["phases"].items() if n >= 0.05))
        for note in self.notes:
            lines.append(f"note: {note}")
        return lines

    def summary(self, source: str | None = None, output: str | None = None) -> list[str]:
        """The closing summary: what the report promises and how to check it — the output error
        against its bound on how many held-out samples and where it is worst; the whole model's
        latency ratio with its band, threads, batch and clock, and the ``bench`` command that
        reproduces it; what came back."""
        lines = ["", "summary:"]
        b = self.budget or {}
        v = self.verification
        if v is None:
            lines.append("  output error: not verified (--no-verify)")
        else:
            name, worst = max(v.outputs.items(), key=lambda item: item[1].feature_rel_l2, default=(None, None))
            bound = ""
            if b.get("mode") == "max_error":
                bound = f" ≤ {b['target']:g} ({'default bound' if b.get('default') else '--max-error'})" \
                    if b.get("met") else f" > bound {b['target']:g}"
            elif self.options.get("max_rel_error") is not None:
                bound = f" (--max-rel-error {self.options['max_rel_error']:g})"
            where = "" if worst is None or not worst.feature_rel_l2 else f"; worst: {name!r} {worst.worst_feature()}"
            few = (f" (fewer than {MIN_HELDOUT}: give ≥ {3 * MIN_HELDOUT} calibration samples for a firmer check)"
                   if "held-out" in v.inputs and v.samples < MIN_HELDOUT else "")
            lines.append(f"  output error: {v.worst_error():.3g}{bound} on {v.samples} {v.inputs}{few}{where}")
            tolerance = b.get("tolerance")
            if b.get("mode") == "task" and tolerance:
                chosen = (b.get("rounds") or [{}])[b.get("chosen_round") or 0] if b.get("rounds") else {}
                score = chosen.get("score")
                lines.append(f"  score: {'-' if score is None else f'{score:.4g}'} (input model "
                             f"{tolerance.get('input_score', float('nan')):.4g}, allowed drop "
                             f"{tolerance.get('allowed_drop', float('nan')):.4g})")
        m = b.get("model_latency")
        threads = self.environment.get("threads")
        if m:
            lines.append(f"  latency: ×{m['ratio']:.3f} ± {m['ratio_halfwidth']:.3f} of the all-regular model as a whole "
                         f"({m['threads']} thread{'s' if m['threads'] != 1 else ''}, batch {m['batch']}; {m['how']})"
                         + ("" if m["faster"] else " — not faster, so not used"))
            threads, batch = m["threads"], m["batch"]
        else:
            batch = None
            lines.append("  latency: the whole model was not timed" + (
                " (--select all prices by MACs)" if self.select != "latency" else ""))
        if source and output and self.layers:
            lines.append("  check: " + self._bench_command(source, output, threads, batch))
        candidates = len(self.layers) + sum(1 for s in self.skipped if s.reason.startswith("kept regular"))
        if self.layers:
            m_ = self.model
            lines.append(f"  returned: {len(self.layers)} of {candidates} candidate conv(s) rewritten, MACs "
                         f"{_ratio(m_.macs_after, m_.macs_before)}" + (f", written to {output}" if output else ""))
        else:
            lines.append(f"  returned: the input model unchanged — {self._why_unchanged()}")
        return lines

    def _bench_command(self, source: str, output: str, threads: int | None, batch: int | None) -> str:
        """The ``bench`` command that times the two files as the job did: its threads, batch, input
        shapes (as resolved: dim 0 is bench's batch) and execution providers."""
        words = ["python", "-m", "onnx_dwdecomp", "bench", source, output]
        if threads:
            words += ["--threads", str(threads)]
        if batch:
            words += ["--batch-sizes", str(batch)]
        for name, dims in (self.options.get("input_shapes") or {}).items():
            if dims:
                words += ["--input-shape", f"{name}:{','.join(map(str, dims))}"]
        providers = list(self.options.get("providers") or [])
        if providers and providers != ["CPUExecutionProvider"]:
            words += ["--providers", ",".join(providers)]
        return " ".join(shlex.quote(w) for w in words + ["--runs", "1000"])

    def _why_unchanged(self) -> str:
        b = self.budget or {}
        m = b.get("model_latency")
        if m and not m["faster"]:
            return "no plan that met the bound was faster as a whole model"
        if b.get("mode") == "task":
            return "no faster plan within the score tolerance"
        stop = str(b.get("stop_reason", ""))
        if stop.endswith("not solved"):
            return "no plan that could meet the bound is predicted ≥ 2 % faster as a whole model"
        if stop.startswith("rewriting every candidate at its fastest option"):
            return "no plan can be ≥ 2 % faster: " + stop
        if not self.skipped:
            return "no candidate conv"
        if len({s.reason for s in self.skipped}) == 1:
            return "every candidate conv " + self.skipped[0].reason
        reasons = {s.reason.split(":")[0] for s in self.skipped}
        return "every candidate conv kept: " + "; ".join(sorted(reasons))


    def _render_budget(self, verbose: bool = True) -> list[str]:
        b = self.budget
        if b is None:
            return []
        if b["mode"] == "target_macs":
            head = (f"plan --target-macs {b['target']:g}: at most {b['macs_limit'] / 1e6:.3f} M MACs; "
                    f"{b['macs'] / 1e6:.3f} M reached (predicted {b['predicted_macs'] / 1e6:.3f} M)")
        elif b["mode"] == "target_latency":
            head = (f"plan --target-latency {b['target']:g}: convs' latency at most {b['latency_limit_ms']:.3f} ms; "
                    f"{b['latency_ms_after']:.3f} ms planned")
        elif b["mode"] == "task":
            t = b["tolerance"] or {}
            head = (f"plan (--eval): fastest plan whose score drops at most {t.get('max_drop', '-')} "
                    f"(input model {t.get('input_score', float('nan')):.4g}, allowed drop "
                    f"{t.get('allowed_drop', float('nan')):.4g}); {b['macs'] / 1e6:.3f} M MACs")
        else:
            flag = "default bound" if b["default"] else "--max-error"
            head = (f"plan ({flag}): held-out output error ≤ {b['target']:g}, "
                    f"{'fastest' if b['price'] == 'latency' else 'fewest MACs'}; {b['macs'] / 1e6:.3f} M MACs")
        measured = b["measured_output_rel_l2"]
        met = {True: "met", False: "NOT met", None: "not verified"}[b["met"]]
        if b["mode"] == "task" and not self.layers:
            met = "no faster plan within tolerance"
        lines = ["", f"{head} — {met}",
                 f"  output error (per-feature rel. L2 on held-out samples): predicted "
                 f"{b['predicted_output_rel_l2']:.3g}, measured " + ("-" if measured is None else f"{measured:.3g}")
                 + f"; {len(b['rounds'])} round(s)" + (f", stopped: {b['stop_reason']}" if b.get("stop_reason") else "")]
        probes = b.get("probes")
        if probes:
            seconds = self.timing_s.get("sensitivity_probes")
            took = "" if seconds is None else f", {seconds:.2f} s"
            lines.append(f"  predicted = √(α·Σ gain²·layer error²): gains from {probes['count']} single-layer probes on "
                         f"{probes['samples']} held-out samples{took}; interaction scale "
                         f"α = {b['interaction_scale']:.3g} (1 before the first verified round)")
        if b["latency_ms_before"] and b["latency_ms_after"] is not None:  # timed, and some conv was
            lines.append(f"  convs' latency (inside the model, per-node profile): {b['latency_ms_before']:.3f} ms → "
                         f"{b['latency_ms_after']:.3f} ms (×{b['latency_ms_after'] / max(b['latency_ms_before'], 1e-12):.2f})")
        m = b.get("model_latency")
        if m:
            lines.append(f"  whole model at {m['threads']} thread{'s' if m['threads'] != 1 else ''}, batch {m['batch']} "
                         f"(interleaved, {m['runs']} rounds{', cached' if m['cached'] else ''}; {m['how']}): "
                         f"all-regular {m['regular_ms']:.3f} ms → plan {m['plan_ms']:.3f} ms "
                         f"(×{m['ratio']:.3f} ± {m['ratio_halfwidth']:.3f}) — "
                         f"{'faster' if m['faster'] else 'not faster, not used'}")
        lines += self._render_rounds(b)
        if not verbose:
            return lines + self._render_frontier(b, merge_equal=True)
        rows = [("layer", "r", "MMACs", "ms (regular)", "gain", "layer error", "held-out", "output share",
                 "patches")]
        for layer in b["layers"]:
            m = layer["measured_error"]
            ms = "-" if layer["latency_ms"] is None else f"{layer['latency_ms']:.3f} ({layer['regular_ms']:.3f})"
            probe = layer.get("probe")
            rows.append((layer["name"], str(layer["multiplier"]), f"{layer['macs'] / 1e6:.3f}", ms,
                         "-" if probe is None else f"{probe['gain']:.3g}", _rms(layer["predicted_error"]),
                         "-" if m is None else _rms(m), f"{layer['predicted_output_share']:.2e}",
                         "-" if layer["patches"] is None else str(layer["patches"])))
        lines.append("  per layer: layer error = relative RMS response error (predicted by the curve; held-out = "
                     "measured in the chosen round); gain = output error per unit of layer error (probe); "
                     "output share = √α·gain·layer error")
        return lines + text_table(rows) + self._render_frontier(b)

    @staticmethod
    def _render_rounds(b: dict) -> list[str]:
        if len(b["rounds"]) < 2 and not b.get("evaluations"):
            return []
        scores = b["mode"] == "task"
        rows = [("round", "convs", "predicted", "measured", "α", "convs' ms") + (("score", "within") if scores else ())]
        for k, r in enumerate(b["rounds"]):
            convs = sum(1 for v in r["multipliers"].values() if v != "skip")
            got = r["measured_output_rel_l2"]
            row = (f"{k + 1}{' *' if k == b['chosen_round'] else ''}{' (fallback)' if r.get('fallback') else ''}",
                   str(convs), f"{r['predicted_output_rel_l2']:.3g}", "-" if got is None else f"{got:.3g}",
                   f"{r['interaction_scale']:.3g}",
                   "-" if r["predicted_latency_ms"] is None else f"{r['predicted_latency_ms']:.3f}")
            if scores:
                row += ("-" if r.get("score") is None else f"{r['score']:.4g}",
                        {True: "yes", False: "no", None: "-"}[r.get("within")])
            rows.append(row)
        return ["  rounds (* = chosen; predicted before the round, with the α shown):"] + \
            ["  " + line for line in text_table(rows)]

    @staticmethod
    def _render_frontier(b: dict, merge_equal: bool = False) -> list[str]:
        """The trade-off table; ``merge_equal``: consecutive bounds that give the same plan share
        one row ("0.07–0.3")."""
        points = b.get("frontier") or []
        if not points:
            return []
        if merge_equal:
            merged: list[dict] = []
            for p in points:
                last = merged[-1] if merged else None
                same = last is not None and not p["chosen"] and not last["chosen"] and p["bound"] is not None \
                    and last["bound"] is not None and all(p[k] == last[k] for k in (
                        "predicted_output_rel_l2", "convs_rewritten", "macs_ratio", "model_latency_ratio", "latency_ms"))
                if same:
                    merged[-1] = {**last, "bound_to": p["bound"]}
                else:
                    merged.append(dict(p))
            points = merged
        latency = any(p["model_latency_ratio"] is not None for p in points)
        rows = [("bound", "predicted error", "convs", "MACs", "model latency" if latency else "convs' latency", "")]
        before = b["latency_ms_before"]
        for p in points:
            if latency:
                lat = "-" if p["model_latency_ratio"] is None else f"×{p['model_latency_ratio']:.3f}"
            else:
                lat = "-" if p["latency_ms"] is None or not before else f"×{p['latency_ms'] / before:.3f}"
            bound = "-" if p["bound"] is None else f"{p['bound']:g}" + (f"–{p['bound_to']:g}" if "bound_to" in p else "")
            rows.append((bound, f"{p['predicted_output_rel_l2']:.3g}", str(p["convs_rewritten"]),
                         f"×{p['macs_ratio']:.3f}", lat, "◀ chosen" if p["chosen"] else ""))
        how = "the curves, gains and α"
        if latency and b.get("model_ms"):
            how += f"; latency: the all-regular model's {b['model_ms']:.3f} ms less the options' savings inside it"
        return ["", f"trade-off (predicted from {how}; other bounds: --max-error E):"] + text_table(rows)

    def _render_selection(self) -> list[str]:
        timed = [s for s in self.selection if s.regular_ms is not None]
        if self.select != "latency" or not self.selection:
            return []
        verdict = ("offered to the plan" if self.budget is not None else "rewrite")
        threads = self.environment.get("threads")
        lines = ["", f"latency selection ({len(timed)} of {len(self.selection)} candidate(s) timed alone in "
                     f"onnxruntime at {threads} thread(s), each at its input shape in this job; {verdict} when the "
                     f"separable median is ≥ {100 * MIN_GAIN:g} % lower):"]
        rows = [("layer", "regular ms", "separable ms", "speed-up", "decision")]
        for s in self.selection:
            timed_row = s.regular_ms is not None and s.separable_ms is not None
            rows.append((s.name, f"{s.regular_ms:.3f}" if timed_row else "-",
                         f"{s.separable_ms:.3f}" if timed_row else "-",
                         f"×{s.regular_ms / s.separable_ms:.2f}" if timed_row and s.separable_ms > 0 else "-",
                         ("offered" if self.budget is not None else "rewrite") if s.rewritten else "keep"))
        return lines + text_table(rows)


def _rms(error: float) -> str:
    """A squared error ratio shown as relative RMS (the unit of the output error)."""
    return f"{math.sqrt(error):.2e}" if error >= 0 and math.isfinite(error) else str(error)


def _first(items, shown: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:shown]) + (f" … (+{len(items) - shown})" if len(items) > shown else "")


def _ratio(after: int, before: int) -> str:
    return f"×{after / before:.3f}" if before else "-"


def _finite(value):
    """``value`` with every non-finite float replaced by its string (see :meth:`Report.to_json`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned plain-text lines: ``rows[0]`` is the header, underlined; the first column is
    left-aligned, the others right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


#: The job's phases for :func:`job_cost`: label → the ``timing_s`` keys it adds up (disjoint).
COST_PHASES = {
    "reference pass": ("reference_pass",), "held-out reference": ("heldout_reference",),
    "conv timings": ("pricing",), "in-model profiles": ("profiles",), "curve pass": ("curve_pass",),
    "sensitivity probes": ("sensitivity_probes",), "rounds' calibration and solve": ("calibration", "solve"),
    "verification": ("verify",), "whole-model check": ("model_check",), "your evaluate function": ("evaluate",),
}


def job_cost(timing_s: dict[str, float]) -> dict | None:
    """What each phase of the job cost in forward passes of the calibration set — the yardstick
    is the reference pass, onnxruntime's time for one plain pass of the input model over all
    calibration samples; the rest of ``total`` (loading, folding, rewriting, Python) is "other".
    None without a reference pass (no calibration data)."""
    forward = timing_s.get("reference_pass")
    total = timing_s.get("total")
    if not forward or total is None:
        return None
    phases = {label: sum(timing_s.get(k, 0.0) for k in keys) for label, keys in COST_PHASES.items()}
    phases = {label: v for label, v in phases.items() if v}
    phases["other"] = max(total - sum(phases.values()), 0.0)
    return {"forward_pass_s": round(forward, 4), "total_s": round(total, 4),
            "forward_passes": round(total / forward, 2),
            "phases": {label: round(v / forward, 2) for label, v in phases.items()}}

