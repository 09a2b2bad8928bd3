"""report.py: the Report's JSON form (keys, values, round trip) and its terminal table, on a
report built by hand so that every number shown can be checked against the fields it came from.

No numerical tolerances are needed: every value is formatted from a number written in this file
(the expected strings were worked out by hand from the format specs in report.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import pytest

from onnx_dwdecomp.errors import Refused
from onnx_dwdecomp.fold import Fold, Merge
from onnx_dwdecomp.timing.latency import MIN_GAIN
from onnx_dwdecomp.report import LayerResult, ModelTotals, Report, Selection, _first, _ratio, text_table
from onnx_dwdecomp.verify import OutputAgreement, Verification

MiB = 2**20

LAYERS = (
    LayerResult("conv1", (16, 8, 3, 3), "gsvd", 1, macs_before=1_179_648, macs_after=262_144, rel_error=1.234e-3,
                error_kind="response", iterations=10, fallback_channels=(2, 5), patches=512),
    LayerResult("conv2", (32, 16, 3, 3), "channel", 2, macs_before=4_718_592, macs_after=1_500_000,
                rel_error=5.0e-2, error_kind="weight", rank=24),
)
SKIPPED = (
    Refused("g1", "grouped conv (group 2)"),
    Refused("p1", "1×1 kernel"),
    Refused("g2", "grouped conv (group 2)"),
    Refused("g3", "grouped conv (group 2)"),
    Refused("g4", "grouped conv (group 2)"),
    Refused("g5", "grouped conv (group 2)"),
)
TOTALS = ModelTotals(macs_before=10_000_000, macs_after=2_500_000, params_before=1_000_000, params_after=300_000,
                     size_before=4 * MiB, size_after=3 * MiB)
VERIFICATION = Verification(4, "held-out calibration samples", {
    "logits": OutputAgreement(rel_l2=1.5e-3, max_abs=2.0e-2, cosine=0.9999987, top1_agreement=0.75,
                              feature_rel_l2=2.5e-3),
    "boxes": OutputAgreement(rel_l2=3.0e-4, max_abs=1.0e-5, cosine=1.0, top1_agreement=None, feature_rel_l2=4.0e-4),
})
SELECTION = (
    Selection("conv1", True, "separable faster", regular_ms=1.0, separable_ms=0.4),
    Selection("conv3", False, "kept regular: not faster", regular_ms=0.5, separable_ms=0.6),
    Selection("conv2", True, "only configuration: not timed"),
)
NOTES = ("input 'x' has a dynamic batch dim; using batch 1 (set --input-shape to change)", "second note")


def full_report(**changes) -> Report:
    rep = Report(
        method="gsvd", layers=LAYERS, skipped=SKIPPED, model=TOTALS, verification=VERIFICATION,
        timing_s={"load": 0.123456, "solve": 2.0, "verify": 0.00004},
        notes=NOTES, calibration={"samples": 40, "held_out": 4, "patches_per_layer": {"conv1": 512}},
        options={"method": "gsvd", "input_shapes": {"x": (1, 8, 16, 16)}, "exclude": ("a*",)},
        select="latency", selection=SELECTION,
        folded=(Fold("bn1", "BatchNormalization", "conv1"), Fold("mul2", "Mul", "conv2")),
        merged=(Merge("conv1.pw", ("bn9",), "conv4"),),
        environment={"onnxruntime": "1.x", "threads": 2},
    )
    return replace(rep, **changes)


def bare_report(**changes) -> Report:
    rep = Report(method="svd", layers=(), skipped=(), model=TOTALS, verification=None, timing_s={})
    return replace(rep, **changes)


def cells(line: str) -> list[str]:
    """A table row's cells (columns are separated by at least two spaces)."""
    return re.split(r" {2,}", line.strip())


def row(text: str, first_cell: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(first_cell + " ") or ln == first_cell]
    return cells(line)


# --- JSON ---------------------------------------------------------------------------------------

def test_to_dict_keys():
    d = full_report().to_dict()
    assert set(d) == {"method", "options", "environment", "layers", "skipped", "select", "selection", "folded",
                      "merged", "model", "verification", "calibration", "timing_s", "memory_estimate", "job_cost", "notes"}
    assert "budget" not in d  # only plans have one (no "budget": null)
    assert set(full_report(budget=budget_dict()).to_dict()) == set(d) | {"budget"}


def test_to_dict_values():
    rep = full_report()
    d = rep.to_dict()
    assert d["method"] == "gsvd" and d["select"] == "latency"
    assert d["layers"][0] == {"name": "conv1", "weight_shape": (16, 8, 3, 3), "method": "gsvd", "multiplier": 1,
                              "macs_before": 1_179_648, "macs_after": 262_144, "rel_error": 1.234e-3,
                              "error_kind": "response", "iterations": 10, "fallback_channels": (2, 5),
                              "rank": None, "patches": 512}
    assert d["layers"][1]["rank"] == 24 and d["layers"][1]["error_kind"] == "weight"
    assert d["skipped"][1] == {"name": "p1", "reason": "1×1 kernel"} and len(d["skipped"]) == 6
    assert d["selection"][2] == {"name": "conv2", "rewritten": True, "reason": "only configuration: not timed",
                                 "regular_ms": None, "separable_ms": None}
    assert d["folded"] == [{"node": "bn1", "op": "BatchNormalization", "conv": "conv1"},
                           {"node": "mul2", "op": "Mul", "conv": "conv2"}]
    assert d["merged"] == [{"first": "conv1.pw", "through": ("bn9",), "into": "conv4"}]
    assert d["model"] == {"macs_before": 10_000_000, "macs_after": 2_500_000, "params_before": 1_000_000,
                          "params_after": 300_000, "size_before": 4 * MiB, "size_after": 3 * MiB}
    assert d["timing_s"] == {"load": 0.1235, "solve": 2.0, "verify": 0.0}  # rounded to 4 decimals
    assert rep.timing_s["load"] == 0.123456  # ... in the JSON only
    assert d["notes"] == list(NOTES)
    assert d["calibration"] == rep.calibration and d["options"] == rep.options
    assert d["environment"] == {"onnxruntime": "1.x", "threads": 2}
    v = d["verification"]
    assert v["samples"] == 4 and v["inputs"] == "held-out calibration samples"
    assert list(v["outputs"]) == ["logits", "boxes"]
    boxes = v["outputs"]["boxes"]
    assert boxes == asdict(VERIFICATION.outputs["boxes"])  # every field of the record, ...
    assert {k: boxes[k] for k in ("rel_l2", "max_abs", "cosine", "top1_agreement", "feature_rel_l2")} == {
        "rel_l2": 3.0e-4, "max_abs": 1.0e-5, "cosine": 1.0, "top1_agreement": None, "feature_rel_l2": 4.0e-4}


def test_to_dict_without_verification_or_budget():
    d = bare_report().to_dict()
    assert d["verification"] is None and d["calibration"] is None and "budget" not in d
    assert d["layers"] == d["skipped"] == d["selection"] == d["folded"] == d["merged"] == d["notes"] == []
    assert d["select"] == "all" and d["options"] == {} and d["environment"] == {}


def test_to_json_round_trip():
    rep = full_report(budget=budget_dict())
    text = rep.to_json()
    assert text.endswith("}\n") and text.startswith('{\n  "method": "gsvd"')  # indented, method first
    back = json.loads(text)
    # JSON has lists for tuples; otherwise the parsed JSON is the dict exactly
    assert back == json.loads(json.dumps(rep.to_dict()))
    assert back["layers"][0]["weight_shape"] == [16, 8, 3, 3] and back["options"]["input_shapes"] == {"x": [1, 8, 16, 16]}
    # the records can be rebuilt from the JSON
    layers = tuple(LayerResult(**{**layer, "weight_shape": tuple(layer["weight_shape"]),
                                  "fallback_channels": tuple(layer["fallback_channels"])}) for layer in back["layers"])
    assert layers == rep.layers
    assert tuple(Selection(**s) for s in back["selection"]) == rep.selection
    assert tuple(Refused(**s) for s in back["skipped"]) == rep.skipped
    assert ModelTotals(**back["model"]) == rep.model
    outputs = {k: OutputAgreement(**o) for k, o in back["verification"]["outputs"].items()}
    assert outputs == rep.verification.outputs
    assert back["budget"] == json.loads(json.dumps(budget_dict()))


def _strict_json(text: str):
    """Parse as RFC 8259 JSON: NaN / Infinity / -Infinity (Python's extension) are rejected."""
    def reject(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=reject)


def test_to_json_is_strict_json_for_finite_values():
    _strict_json(full_report(budget=budget_dict()).to_json())


def test_to_json_is_strict_json_with_an_infinite_layer_error():
    """Was the bare token Infinity (json.dumps' default), which jq / JSON.parse reject."""
    # solve.relative_response_error returns inf for a layer whose held-out response has no
    # variance (its input is constant on the held-out samples); decompose puts that in the report
    layer = replace(LAYERS[0], rel_error=float("inf"))
    d = _strict_json(full_report(layers=(layer,)).to_json())
    assert d["layers"][0]["rel_error"] == "inf"


# --- render(): layers, skipped, model table, verification, notes ---------------------------------

def test_render_layer_rows():
    lines = full_report().render().splitlines()
    assert cells(lines[0]) == ["layer", "weight", "method", "r", "MMACs before → after", "rel. error"]
    assert set(lines[1]) == {"-", " "}
    # relative RMS (the square root of the stored squared ratio 1.23e-3), the output error's unit
    assert cells(lines[2]) == ["conv1", "16×8×3×3", "gsvd", "1", "1.18 → 0.26", "3.51e-02"]
    # channel decomposition shows its rank d'; a data-free (weight) error is marked (w)
    assert cells(lines[3]) == ["conv2", "32×16×3×3", "channel d'=24", "2", "4.72 → 1.50", "2.24e-01 (w)"]
    assert lines[4].startswith("rel. error: relative RMS error of the layer's response on held-out samples")


def test_render_skipped_grouped_by_reason_in_first_seen_order():
    lines = full_report().render().splitlines()
    k = lines.index("skipped 6 conv(s):")
    assert lines[k - 1] == ""
    assert lines[k + 1] == "    5 × grouped conv (group 2): g1, g2, g3 … (+2)"  # first 3 names, then a count
    assert lines[k + 2] == "    1 × 1×1 kernel: p1"


def test_render_without_skipped_has_no_skipped_section():
    assert "skipped" not in full_report(skipped=()).render()


def test_render_model_table():
    text = full_report().render()
    assert row(text, "model") == ["model", "before", "after", "change"]
    assert row(text, "MACs") == ["MACs", "10.00 M", "2.50 M", "×0.250"]
    assert row(text, "params") == ["params", "1.000 M", "0.300 M", "×0.300"]
    assert row(text, "size") == ["size", "4.00 MiB", "3.00 MiB", "×0.750"]


def test_render_model_table_zero_before_shows_dash():
    totals = ModelTotals(0, 0, 0, 0, 0, 0)
    text = bare_report(model=totals).render()
    assert row(text, "MACs") == ["MACs", "0.00 M", "0.00 M", "-"]


def test_render_verification():
    text = full_report().render()
    lines = text.splitlines()
    k = lines.index("verification on 4 held-out calibration samples:")
    # one measure: the per-feature relative L2 (the plain one stays in the JSON)
    assert cells(lines[k + 1]) == ["output", "rel. error", "max abs", "cosine", "top-1 agree"]
    assert cells(lines[k + 3]) == ["logits", "2.500e-03", "2.000e-02", "0.999999", "75.0 %"]
    assert cells(lines[k + 4]) == ["boxes", "4.000e-04", "1.000e-05", "1.000000", "-"]
    assert lines[k + 5].startswith("rel. error: per-feature relative L2")


def test_render_without_verification():
    assert "verification" not in full_report(verification=None).render()


def test_render_notes_come_last():
    lines = full_report().render().splitlines()
    lines = lines[:lines.index("summary:") - 1]  # then only the closing summary
    assert lines[-2:] == [f"note: {NOTES[0]}", "note: second note"]
    assert not any(ln.startswith("note:") for ln in full_report(notes=()).render().splitlines())


def test_render_folded_and_merged():
    lines = full_report().render().splitlines()
    k = lines.index("folded 2 BatchNormalization/Mul/Add node(s) into their convs before decomposition: "
                    "bn1 → conv1, mul2 → conv2")
    assert lines[k - 1] == ""
    assert lines[k + 1] == "merged 1 pointwise pair(s) into one 1×1 conv each: conv1.pw + conv4"  # same block
    only_merged = full_report(folded=()).render().splitlines()
    k = only_merged.index("merged 1 pointwise pair(s) into one 1×1 conv each: conv1.pw + conv4")
    assert only_merged[k - 1] == ""  # a block of its own
    assert not any(ln.startswith(("folded", "merged")) for ln in full_report(folded=(), merged=()).render().splitlines())


def test_render_section_order():
    text = full_report(budget=budget_dict()).render()
    marks = ["layer ", "skipped 6", "latency selection", "plan (default bound)", "folded 2", "merged 1",
             "model ", "verification on", "note: "]
    positions = [text.index("\n" + m) if i else text.index(m) for i, m in enumerate(marks)]
    assert positions == sorted(positions)


def test_render_empty_report():
    lines = bare_report().render().splitlines()
    assert cells(lines[0])[0] == "layer" and set(lines[1]) == {"-", " "} and lines[2] == ""  # header, no rows
    assert len(lines) == 13 and cells(lines[3])[0] == "model" and set(lines[4]) == {"-", " "}
    assert [cells(ln)[0] for ln in lines[5:8]] == ["MACs", "params", "size"]  # no other section
    assert lines[8:] == ["", "summary:", "  output error: not verified (--no-verify)",
                         "  latency: the whole model was not timed (--select all prices by MACs)",
                         "  returned: the input model unchanged — no candidate conv"]


# --- render(): latency selection ------------------------------------------------------------------

def test_render_selection_rewrite():
    text = full_report().render()
    lines = text.splitlines()
    header = (f"latency selection (2 of 3 candidate(s) timed alone in onnxruntime at 2 thread(s), each at its "
              f"input shape in this job; rewrite when the separable median is ≥ {100 * MIN_GAIN:g} % lower):")
    k = lines.index(header)
    assert lines[k - 1] == ""
    assert cells(lines[k + 1]) == ["layer", "regular ms", "separable ms", "speed-up", "decision"]
    assert cells(lines[k + 3]) == ["conv1", "1.000", "0.400", "×2.50", "rewrite"]
    assert cells(lines[k + 4]) == ["conv3", "0.500", "0.600", "×0.83", "keep"]
    assert cells(lines[k + 5]) == ["conv2", "-", "-", "-", "rewrite"]  # not timed


def test_render_selection_with_a_plan_says_offered():
    text = full_report(budget=budget_dict()).render()
    assert "; offered to the plan when the separable median" in text
    sel = [cells(ln) for ln in text.splitlines() if ln.startswith(("conv1 ", "conv3 "))]
    assert ["conv1", "1.000", "0.400", "×2.50", "offered"] in sel and ["conv3", "0.500", "0.600", "×0.83", "keep"] in sel


def test_render_selection_hidden_when_not_latency_or_empty():
    assert "latency selection" not in full_report(select="all").render()
    assert "latency selection" not in full_report(selection=()).render()


def test_render_selection_zero_separable_has_no_speed_up():
    rep = full_report(selection=(Selection("conv1", True, "r", regular_ms=1.0, separable_ms=0.0),))
    lines = rep.render().splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith("latency selection"))
    assert "1 of 1 candidate(s) timed" in lines[k]
    assert cells(lines[k + 3]) == ["conv1", "1.000", "0.000", "-", "rewrite"]


# --- render(): budget ------------------------------------------------------------------------------

def _round(convs: int, predicted: float, measured: float | None, scale: float, **extra) -> dict:
    return {"multipliers": {f"conv{k}": 1 for k in range(convs)} | {"conv9": "skip"}, "predicted_macs": 1,
            "predicted_latency_ms": 2.5, "predicted_error_sum": 1e-4, "interaction_scale": scale,
            "predicted_output_rel_l2": predicted, "measured_output_rel_l2": measured, **extra}


def budget_dict(**changes) -> dict:
    """The keys search.plan_record / planner.Planner.to_dict give that the renderer reads
    (max-error plan, latency price)."""
    b = {
        "mode": "max_error", "default": True, "target": 0.02, "price": "latency",
        "macs_limit": None, "latency_limit_ms": None,
        "original_macs": 10_000_000, "reachable_macs": [2_000_000, 10_000_000], "predicted_macs": 2_400_000,
        "macs": 2_500_000, "latency_ms_before": 3.0, "latency_ms_after": 2.5,
        "predicted_error_sum": 1.0e-4, "interaction_scale": 1.5, "predicted_output_rel_l2": 0.0122474,
        "measured_output_rel_l2": 0.011, "met": True, "stop_reason": "measured 0.011 is near",
        "tolerance": None, "rounds": [_round(2, 0.03, 0.025, 1.0), _round(1, 0.0122, 0.011, 1.5)],
        "chosen_round": 1, "probes": {"count": 2, "samples": 4},
        "layers": [
            {"name": "conv1", "multiplier": 1, "sensitivity": 1.44, "predicted_error": 1.0e-4, "measured_error": 1.21e-4,
             "predicted_output_share": 0.0122, "probe": {"multiplier": 1, "layer_error": 1e-4, "output_error": 0.012,
                                                         "gain": 1.2},
             "macs": 262_144, "latency_ms": 0.5, "regular_ms": 1.0, "patches": 512, "curve": []},
            {"name": "conv3", "multiplier": "skip", "sensitivity": 0.25, "predicted_error": 0.0, "measured_error": None,
             "predicted_output_share": 0.0, "macs": 1_000_000, "latency_ms": None, "regular_ms": None,
             "patches": None, "curve": []},
        ],
        "model_latency": {"regular_ms": 4.0, "plan_ms": 3.4, "ratio": 0.85, "ratio_halfwidth": 0.01, "runs": 50,
                          "retimes": 0, "cached": False, "faster": True, "reason": "faster", "threads": 1,
                          "batch": 1, "clock": "cpu", "loaded": False, "contention": 1.0, "load_average": 0.5,
                          "how": "CPU time of the calling thread"},
        "frontier": [
            {"bound": 0.01, "predicted_output_rel_l2": 0.009, "macs": 9_000_000, "macs_ratio": 0.9,
             "convs_rewritten": 1, "latency_ms": 2.8, "model_latency_ratio": 0.95, "multipliers": {}, "chosen": False},
            {"bound": 0.02, "predicted_output_rel_l2": 0.0122, "macs": 2_500_000, "macs_ratio": 0.25,
             "convs_rewritten": 2, "latency_ms": 2.5, "model_latency_ratio": 0.875, "multipliers": {}, "chosen": True},
        ],
        "evaluations": None,
    }
    b.update(changes)
    return b


def budget_lines(**changes) -> list[str]:
    lines = full_report(budget=budget_dict(**changes)).render().splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.startswith("plan"))
    assert lines[k - 1] == ""
    return lines[k:]


def test_render_budget_max_error_default():
    lines = budget_lines()
    assert lines[0] == "plan (default bound): held-out output error ≤ 0.02, fastest; 2.500 M MACs — met"
    assert lines[1] == ("  output error (per-feature rel. L2 on held-out samples): predicted 0.0122, measured 0.011; "
                        "2 round(s), stopped: measured 0.011 is near")
    assert lines[2].startswith("  predicted = √(α·Σ gain²·layer error²): gains from 2 single-layer probes on "
                               "4 held-out samples")
    assert lines[2].endswith("interaction scale α = 1.5 (1 before the first verified round)")
    assert lines[3] == "  convs' latency (inside the model, per-node profile): 3.000 ms → 2.500 ms (×0.83)"
    assert lines[4] == ("  whole model at 1 thread, batch 1 (interleaved, 50 rounds; CPU time of the calling thread): "
                        "all-regular 4.000 ms → plan 3.400 ms (×0.850 ± 0.010) — faster")
    k = lines.index("  rounds (* = chosen; predicted before the round, with the α shown):")
    assert cells(lines[k + 1]) == ["round", "convs", "predicted", "measured", "α", "convs' ms"]
    assert cells(lines[k + 4]) == ["2 *", "1", "0.0122", "0.011", "1.5", "2.500"]
    k = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    assert cells(lines[k]) == ["layer", "r", "MMACs", "ms (regular)", "gain", "layer error", "held-out",
                               "output share", "patches"]
    # layer errors as relative RMS (√ of the squared ratios 1e-4 and 1.21e-4), like the output error
    assert cells(lines[k + 2]) == ["conv1", "1", "0.262", "0.500 (1.000)", "1.2", "1.00e-02", "1.10e-02",
                                   "1.22e-02", "512"]
    assert cells(lines[k + 3]) == ["conv3", "skip", "1.000", "-", "-", "0.00e+00", "-", "0.00e+00", "-"]
    k = next(i for i, ln in enumerate(lines) if ln.startswith("trade-off (predicted from the curves, gains and α"))
    assert cells(lines[k + 3]) == ["0.01", "0.009", "1", "×0.900", "×0.950"]
    assert cells(lines[k + 4]) == ["0.02", "0.0122", "2", "×0.250", "×0.875", "◀ chosen"]


def test_render_budget_task_mode_shows_scores():
    rounds = [_round(3, 0.05, 0.06, 1.0, score=0.90, within=False), _round(1, 0.01, 0.012, 1.44, score=0.995,
                                                                          within=True)]
    lines = budget_lines(mode="task", tolerance={"input_score": 1.0, "allowed_drop": 0.01, "max_drop": "1 %"},
                         rounds=rounds, evaluations=[{"model": "input", "score": 1.0}])
    assert lines[0] == ("plan (--eval): fastest plan whose score drops at most 1 % (input model 1, allowed drop "
                        "0.01); 2.500 M MACs — met")
    k = next(i for i, ln in enumerate(lines) if ln.startswith("  rounds"))
    assert cells(lines[k + 1])[-2:] == ["score", "within"]
    assert cells(lines[k + 3])[-2:] == ["0.9", "no"] and cells(lines[k + 4])[-2:] == ["0.995", "yes"]


def test_render_budget_explicit_max_error_fewest_macs_not_verified():
    lines = budget_lines(default=False, price="macs", met=None, measured_output_rel_l2=None,
                         latency_ms_before=None, latency_ms_after=None)
    assert lines[0] == "plan (--max-error): held-out output error ≤ 0.02, fewest MACs; 2.500 M MACs — not verified"
    assert "measured -; 2 round(s)" in lines[1]
    assert not any("convs' latency" in ln for ln in lines)  # untimed: no latency line


def test_render_budget_target_macs_not_met():
    lines = budget_lines(mode="target_macs", target=0.5, macs_limit=5_000_000, macs=4_900_000,
                         predicted_macs=4_800_000, met=False)
    assert lines[0] == "plan --target-macs 0.5: at most 5.000 M MACs; 4.900 M reached (predicted 4.800 M) — NOT met"


def test_render_budget_target_latency():
    lines = budget_lines(mode="target_latency", target=0.85, latency_limit_ms=2.55, latency_ms_after=2.5)
    assert lines[0] == "plan --target-latency 0.85: convs' latency at most 2.550 ms; 2.500 ms planned — met"


def test_render_budget_latency_line_needs_a_timed_regular_latency():
    assert not any("convs' latency" in ln for ln in budget_lines(latency_ms_before=0.0))


def test_no_budget_section_without_budget():
    assert not any(ln.startswith("plan") for ln in full_report().render().splitlines())


# --- helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("after, before, expected", [
    (1, 4, "×0.250"), (3, 2, "×1.500"), (2, 3, "×0.667"), (5, 5, "×1.000"), (0, 7, "×0.000"), (3, 0, "-"),
])
def test_ratio(after, before, expected):
    assert _ratio(after, before) == expected


@pytest.mark.parametrize("items, expected", [
    ([], ""), (["a"], "a"), (["a", "b", "c"], "a, b, c"), (["a", "b", "c", "d"], "a, b, c … (+1)"),
    ((s for s in "abcdef"), "a, b, c … (+3)"),  # any iterable
])
def test_first(items, expected):
    assert _first(items) == expected


def test_first_shown():
    assert _first(["a", "b", "c"], shown=1) == "a … (+2)"


def test_text_table_alignment():
    lines = text_table([("name", "n", "value"), ("a", "100", "x"), ("longer", "2", "")])
    assert lines == [
        "name      n  value",
        "------  ---  -----",
        "a       100      x",
        "longer    2",  # first column left-aligned, the others right-aligned, trailing blanks stripped
    ]


def test_nonfinite_reference_values_are_shown_and_recorded():
    """Values where the input model's own output is NaN/Inf are left out of the errors: the
    report says how many, so an error of 0 on such an output is not taken at face value."""
    from onnx_dwdecomp.verify import NonFinite

    v = full_report().verification
    rep = full_report(verification=replace(v, nonfinite={"boxes": NonFinite(0, 3, 40)}))
    assert "  boxes: 3 of 40 value(s) are NaN/Inf in the input model's own output; left out of the errors" in \
        rep.render().splitlines()
    assert json.loads(rep.to_json())["verification"]["nonfinite"] == {"boxes": {"candidate": 0, "reference": 3,
                                                                                "values": 40}}
    assert "nonfinite" not in json.loads(full_report().to_json())["verification"]


# ---- the closing summary: the report ends with its promises


def test_summary_states_every_promise_and_how_to_check_it():
    lines = full_report(budget=budget_dict()).render(source="in.onnx", output="out.onnx").splitlines()
    k = lines.index("summary:")
    summary = lines[k + 1:]
    assert lines[-len(summary):] == summary  # last in the report
    assert summary[0].startswith("  output error: 0.0025 ≤ 0.02 (default bound) on 4 held-out calibration samples")
    assert "fewer than 16" in summary[0]  # 4 samples: the note that the check is thin
    assert summary[0].endswith("worst: 'logits' whole output")  # no feature axis recorded
    assert summary[1] == ("  latency: ×0.850 ± 0.010 of the all-regular model as a whole (1 thread, batch 1; "
                          "CPU time of the calling thread)")
    assert summary[2] == ("  check: python -m onnx_dwdecomp bench in.onnx out.onnx --threads 1 --batch-sizes 1 "
                          "--input-shape x:1,8,16,16 --runs 1000")  # the job's shapes: dynamic dims resolved alike
    assert summary[3] == "  returned: 2 of 2 candidate conv(s) rewritten, MACs ×0.250, written to out.onnx"


def test_summary_of_an_unchanged_model_says_why():
    slow = budget_dict(model_latency=budget_dict()["model_latency"] | {"faster": False, "ratio": 1.008})
    text = full_report(layers=(), budget=slow).render()
    assert "— not faster, so not used" in text
    assert text.splitlines()[-1] == ("  returned: the input model unchanged — no plan that met the bound was "
                                     "faster as a whole model")
    task = budget_dict(mode="task", tolerance={"max_drop": "0.5%", "input_score": 0.99, "allowed_drop": 0.005},
                       model_latency=None, rounds=[_round(10, 0.03, 0.02, 1.0, score=0.99, within=True)],
                       chosen_round=0)
    lines = full_report(layers=(), budget=task).render().splitlines()
    assert any(ln.startswith("plan (--eval)") and ln.endswith("— no faster plan within tolerance") for ln in lines)
    assert "  score: 0.99 (input model 0.99, allowed drop 0.005)" in lines
    assert lines[-1] == "  returned: the input model unchanged — no faster plan within the score tolerance"
    gated = budget_dict(model_latency=None, stop_reason="the fastest plan predicted within the bound saves 0.196 ms "
                        "of the model's 15.585 ms (1.26 %), less than the 2 % a plan must gain as a whole model: "
                        "not solved")
    assert full_report(layers=(), budget=gated).render().splitlines()[-1] == (
        "  returned: the input model unchanged — no plan that could meet the bound is predicted ≥ 2 % faster as a "
        "whole model")
    why = ("rewriting every candidate at its fastest option would save 0.077 ms of the model's 18.604 ms (0.415 %), "
           "less than the 2 % a plan must gain as a whole model")
    mixed = (Refused("a", "kept regular: " + why), Refused("stem", "kept regular: not ≥ 5 % faster inside the model"))
    unplanned = budget_dict(model_latency=None, stop_reason=why)
    assert full_report(layers=(), skipped=mixed, budget=unplanned).render().splitlines()[-1] == (
        "  returned: the input model unchanged — no plan can be ≥ 2 % faster: " + why)
    one = (Refused("a", "kept regular: rewriting every candidate at its fastest option would save 0.1 ms"),
           Refused("b", "kept regular: rewriting every candidate at its fastest option would save 0.1 ms"))
    assert full_report(layers=(), skipped=one, budget=None).render().splitlines()[-1] == (
        "  returned: the input model unchanged — every candidate conv kept regular: rewriting every candidate at "
        "its fastest option would save 0.1 ms")


def test_brief_render_leaves_the_per_conv_tables_to_verbose():
    kept = SKIPPED + (Refused("conv7", "kept regular by the plan: r=1 alone adds ~0.03 predicted output error"),
                      Refused("conv8", "kept regular by the plan: r=1 alone adds ~0.01 predicted output error"))
    rep = full_report(budget=budget_dict(), skipped=kept)
    brief, verbose = rep.render(verbose=False), rep.render(verbose=True)
    assert "rewrote 2 conv(s): conv1 (r=1), conv2 (r=2)" in brief and "MMACs before → after" not in brief
    assert "latency selection" not in brief and "per layer:" not in brief
    assert "2 × kept regular by the plan (each its reason: --verbose): conv7, conv8" in brief
    assert "r=1 alone adds ~0.03 predicted output error" in verbose and "MMACs before → after" in verbose
    assert len(brief.splitlines()) < len(verbose.splitlines())


def test_job_cost_in_forward_passes():
    """Each phase in units of the reference pass (one plain forward of the calibration set); the
    phases are disjoint and "other" is the rest of the total, so they add up to the total."""
    from onnx_dwdecomp.report import job_cost

    timing = {"load": 0.5, "reference_pass": 2.0, "heldout_reference": 0.25, "pricing": 1.0, "profiles": 0.5,
              "curve_pass": 6.0, "sensitivity_probes": 1.5, "plan": 9.5, "calibration": 3.0, "solve": 1.0,
              "verify": 0.5, "model_check": 1.0, "total": 20.0}
    cost = job_cost(timing)
    assert cost["forward_passes"] == 10.0 and cost["forward_pass_s"] == 2.0
    assert cost["phases"]["curve pass"] == 3.0 and cost["phases"]["rounds' calibration and solve"] == 2.0
    # other: 20 − 16.75 s in the phases = 3.25 s (load and what no phase counts; "plan" nests phases), / 2
    assert cost["phases"]["other"] == pytest.approx(1.625, abs=0.01)
    assert sum(cost["phases"].values()) == pytest.approx(cost["forward_passes"], abs=0.05)
    assert job_cost({"total": 3.0}) is None  # no data, no reference pass
    text = full_report(timing_s=timing).render(verbose=True)
    assert "job: 20.0 s = 10.0 forward passes of the calibration set" in text
    assert "job:" not in full_report(timing_s=timing).render(verbose=False)
