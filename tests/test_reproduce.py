"""Tests for tools/reproduce.py and its parts in tools/repro/ (no torch; the reproduction is not run)."""

from __future__ import annotations

import ast
import sys

import numpy as np
import onnx
import pytest
from conftest import TOOLS, load_tool
from onnx import TensorProto, helper, numpy_helper

if str(TOOLS) not in sys.path:  # the tools import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

import budget_study
import provenance
from repro import (
    claims,
    config,
    discussion,
    experiments,
    formatting,
    plots,
    render,
    results,
)

# ----------------------------------------------------------------- imports

TORCH_FREE = [TOOLS / "reproduce.py", TOOLS / "onnx_torch.py", TOOLS / "provenance.py",
              *sorted((TOOLS / "repro").glob("*.py"))]


@pytest.mark.parametrize("path", TORCH_FREE, ids=lambda p: str(p.relative_to(TOOLS)))
def test_no_top_level_torch_or_matplotlib_import(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"torch", "matplotlib", "onnx2torch", "train"}


def test_entry_point_parses_its_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        load_tool("reproduce").main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out-dir", "--threads", "--finetune-epochs", "--finetune-lr", "--bench-runs", "--keep-models",
                 "--quick"):
        assert flag in out


# ----------------------------------------------------------------- formatting

@pytest.mark.parametrize("value, text", [(0.985, "98.5 %"), (1.0, "100.0 %"), (0.1, "10.0 %"),
                                         (None, "—"), (float("nan"), "—")])
def test_fmt_pct(value, text):
    assert formatting.fmt_pct(value) == text


def test_fmt_pct_digits():
    assert formatting.fmt_pct(0.98765, 2) == "98.77 %"


def test_fmt_err_and_count():
    assert formatting.fmt_err(0.012345) == "1.23e-02"
    assert formatting.fmt_err(None) == "—"
    assert formatting.fmt_count(8685568) == "8.69 M"
    assert formatting.fmt_count(347336) == "0.347 M"
    assert formatting.fmt_count(None) == "—"


@pytest.mark.parametrize("name, short", [
    ("/stage2/stage2.0/branch1/branch1.0/Conv", "stage2.0/branch1"),
    ("/stage4/stage4.3/branch2/branch2.3/Conv", "stage4.3/branch2"),
    ("/conv1/conv1.0/Conv", "/conv1/conv1.0/Conv"),
    ("conv_7", "conv_7"),
])
def test_short_layer_name(name, short):
    assert formatting.short_layer_name(name) == short


def test_markdown_table_layout():
    text = formatting.markdown_table(["a", "b"], [[1, "x"], ["y|z", 2.5]], "lr")
    assert text.splitlines() == ["| a | b |", "|---|--:|", "| 1 | x |", "| y\\|z | 2.5 |"]


def test_markdown_table_default_alignment_and_empty_rows():
    assert formatting.markdown_table(["h"], []) == "| h |\n|---|"


@pytest.mark.parametrize("headers, rows, align", [
    (["a", "b"], [[1]], None),          # short row
    (["a"], [[1]], "lr"),               # align length
    (["a"], [[1]], "x"),                # bad align character
])
def test_markdown_table_errors(headers, rows, align):
    with pytest.raises(ValueError):
        formatting.markdown_table(headers, rows, align)


def test_geometric_mean():
    assert formatting.geometric_mean([1e-2, 1e-4]) == pytest.approx(1e-3)
    assert formatting.geometric_mean([0.5, None, float("nan")]) == pytest.approx(0.5)
    assert np.isnan(formatting.geometric_mean([]))


def test_compare_uses_tie_band():
    assert formatting.compare(0.985, 0.975) == "better"
    assert formatting.compare(0.975, 0.985) == "worse"
    assert formatting.compare(0.980, 0.977) == "tie"
    assert formatting.compare(0.980, 0.977, tie=0.001) == "better"


# ----------------------------------------------------------------- decompose options

def test_decompose_options_per_method():
    svd = config.decompose_options(config.SVD, "c.npz", 512, 1)
    assert svd["method"] == "svd" and "symmetric" not in svd and svd["calib_size"] == 512
    sym = config.decompose_options(config.GSVD_SYM, "c.npz", 32, 2)
    assert sym["symmetric"] is True and sym["multiplier"] == 2 and sym["calib_size"] == 32
    asym = config.decompose_options(config.GSVD_ASYM, "c.npz", 32, 1)
    assert "symmetric" not in asym and asym["exclude"] == config.EXCLUDE and asym["seed"] == config.SEED
    free = config.decompose_options(config.SVD, None, None, 1)
    assert "calib" not in free and "calib_size" not in free


def test_decompose_options_select_only_when_supported():
    assert "select" not in config.decompose_options(config.GSVD_ASYM, "c.npz", 32, 1, ["method", "calib"])
    assert config.decompose_options(config.GSVD_ASYM, "c.npz", 32, 1, ["select"])["select"] == "all"
    assert config.decompose_options(config.CHANNEL, "c.npz", 32, 1, include=("/a/*",))["include"] == ("/a/*",)


def test_decompose_options_are_accepted_by_the_package():
    import dataclasses

    from onnx_dwdecomp.pipeline import DecomposeOptions

    fields = [f.name for f in dataclasses.fields(DecomposeOptions)]
    for cfg in config.METHOD_CONFIGS:
        opts = DecomposeOptions(**config.decompose_options(cfg, "c.npz", 128, 2, fields))
        opts.validate()


# ----------------------------------------------------------------- ONNX helpers

def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """input (N, 2, 5, 5) -> Conv 3x3 (3 out, bias) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    g = rng.normal(size=(3, 4)).astype(np.float32)
    shape = np.array([0, -1], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                          name="/stage2/stage2.0/branch2/branch2.3/Conv"),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
         helper.make_node("Reshape", ["pool", "shape"], ["flat"]),
         helper.make_node("Gemm", ["flat", "G"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 5, 5])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
                     numpy_helper.from_array(g, "G"), numpy_helper.from_array(shape, "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, names=None):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, {"input": x})


def test_with_outputs_exposes_intermediate_tensors():
    model = _conv_model()
    probe = experiments.with_outputs(model, ["conv", "conv", "output"])
    assert [o.name for o in probe.graph.output] == ["output", "conv"]
    assert len(model.graph.output) == 1
    x = np.random.default_rng(2).normal(size=(1, 2, 5, 5)).astype(np.float32)
    conv, relu_out = _run(probe, x, ["conv", "output"])
    assert conv.shape == (1, 3, 5, 5)


def test_isolated_errors_match_decompose_report(tmp_path, monkeypatch):
    """A model with one conv: the isolated error equals decompose's held-out rel_error."""
    import onnx_dwdecomp

    model_path = tmp_path / "tiny.onnx"
    onnx.save(_conv_model(), str(model_path))
    calib = tmp_path / "calib.npz"
    x = np.random.default_rng(3).normal(size=(20, 2, 5, 5)).astype(np.float32)
    np.savez(calib, input=x)
    monkeypatch.setattr(experiments, "EXCLUDE", ())
    layers, shapes, macs, errors = experiments.isolated_layer_errors(model_path, calib, 20, (1, 2), say=lambda m: None)
    assert layers == ["/stage2/stage2.0/branch2/branch2.3/Conv"]
    assert shapes[layers[0]] == (3, 2, 3, 3)
    assert macs[layers[0]]["regular"] == 25 * 3 * 2 * 9
    assert macs[layers[0]]["sep_r1"] == 25 * (2 * 9 + 3 * 2)
    # r = 2 on 2 channels of 3x3 must still be cheaper than the regular conv
    for r in (1, 2):
        for key in config.ISOLATED_KEYS:
            assert np.isfinite(errors[(layers[0], key, r)])
    import dataclasses

    from onnx_dwdecomp.pipeline import DecomposeOptions

    fields = [f.name for f in dataclasses.fields(DecomposeOptions)]
    opts = config.decompose_options(config.GSVD_ASYM, calib, 20, 1, fields)
    opts["exclude"] = ()
    _, report = onnx_dwdecomp.decompose(str(model_path), **opts)
    (layer,) = report.layers
    assert layer.rel_error == pytest.approx(errors[(layers[0], "gsvd", 1)], rel=1e-6)


# ----------------------------------------------------------------- results, claims, rendering

LAYERS = ["/stage2/stage2.0/branch1/branch1.0/Conv", "/stage3/stage3.1/branch2/branch2.3/Conv"]


def _results(asym=(0.970, 0.975, 0.978, 0.980), sym=(0.950, 0.960, 0.961, 0.962), chan=(0.90, 0.93, 0.94, 0.95),
             svd=0.10, finetune=None, **kw) -> results.Results:
    runs = [results.RunResult("svd", None, 1, svd, {LAYERS[0]: 0.5, LAYERS[1]: 0.9}, 3_230_848, 347_336, 5.0)]
    for key, vals in (("gsvd_asym", asym), ("gsvd_sym", sym), ("channel", chan)):
        assert len(vals) == len(config.CALIB_SIZES)
        for n, v in zip(config.CALIB_SIZES, vals):
            err = {"gsvd_asym": 0.02, "gsvd_sym": 0.03, "channel": 0.2}[key]
            runs.append(results.RunResult(key, n, 1, v, {LAYERS[0]: err, LAYERS[1]: 2 * err}, 3_230_848,
                                     347_336, 30.0))
    for key in ("svd", "gsvd_asym", "gsvd_sym", "channel"):
        runs.append(results.RunResult(key, None if key == "svd" else 512, 2, 0.98, {LAYERS[0]: 0.01, LAYERS[1]: 0.02},
                                 3_700_000, 400_000, 40.0))
    isolated = {}
    for ly in LAYERS:
        for r in (1, 2):
            isolated[(ly, "svd", r)] = 0.5 / r
            isolated[(ly, "gsvd", r)] = 0.02 / r
            isolated[(ly, "channel", r)] = 0.1 / r
            isolated[(ly, "svd_weight", r)] = 0.7 / r
    base = dict(
        command="python tools/reproduce.py", date="2026-11-26 00:00 UTC",
        machine={"cpus": "2", "onnxruntime": "1.32.0", "torch": "2.13.0+cpu", "cpu_seconds": "600"},
        seconds=600.0, regular_top1=0.990, standard_top1=0.985, layers=list(LAYERS),
        layer_shapes={ly: (24, 24, 3, 3) for ly in LAYERS},
        layer_macs={ly: {"regular": 331776, "sep_r1": 50688, "chan_r1": 50000, "sep_r2": 101376,
                         "chan_r2": 100000} for ly in LAYERS},
        isolated=isolated, runs=runs,
        finetune=finetune if finetune is not None else {"gsvd_asym": 0.983, "svd": 0.95},
        finetune_info={"epochs": 5, "lr": 0.01, "batch_size": 64, "weight_decay": 5e-5,
                       "label_smoothing": 0.1, "shift": 4, "seed": 0, "threads": 2, "seconds_per_model": 30.0},
        bench=[results.BenchRow("regular (original)", 8_685_568, 895_616, 3.0, 3.5),
               results.BenchRow("decomposed, separable", 3_230_848, 347_336, 1.8, 2.0),
               results.BenchRow("standard ShuffleNet V2", 3_230_848, 348_066, 1.7, 1.9),
               results.BenchRow("regular (original)", 32 * 8_685_568, 895_616, 40.0, 41.0, 32),
               results.BenchRow("decomposed, separable", 32 * 3_230_848, 347_336, 20.0, 21.0, 32),
               results.BenchRow("standard ShuffleNet V2", 32 * 3_230_848, 348_066, 16.0, 17.0, 32)],
        bench_info={"threads": 2, "runs": 300, "warmup": 20, "batch_size": 1, "loadavg": "1.0",
                    "onnxruntime": "1.32.0", "regular_macs": 8_685_568, "standard_macs": 3_230_848},
    )
    base.update(kw)
    return results.Results(**base)


def test_results_lookup():
    res = _results()
    assert res.top1("gsvd_asym", 128) == pytest.approx(0.975)
    assert res.top1("svd", None) == pytest.approx(0.10)
    assert res.top1("svd", 512) == pytest.approx(0.10)  # data-free: any N
    assert res.top1("gsvd_asym", 64) is None
    assert res.run("channel", 512, 2).top1 == pytest.approx(0.98)


def _verdicts(res):
    return {c.claim.split(" ")[0] + ":" + c.claim.split(" ")[-1]: c.verdict for c in claims.claims(res)}


def test_claims_when_everything_holds():
    res = _results(asym=(0.985, 0.988, 0.988, 0.989), finetune={"gsvd_asym": 0.995})
    by_claim = {c.claim: c.verdict for c in claims.claims(res)}
    assert all(v == "holds" for v in by_claim.values()), by_claim
    assert len(by_claim) == 5


def test_claims_failures_and_ties():
    # asymmetric equal to symmetric, channel better than gsvd, loss of 2 points, svd equal
    res = _results(asym=(0.96, 0.965, 0.967, 0.97), sym=(0.96, 0.965, 0.967, 0.97), chan=(0.99,) * 4, svd=0.97,
                   finetune={})
    by_claim = {c.claim: c.verdict for c in claims.claims(res)}
    keeps = next(v for k, v in by_claim.items() if k.startswith("decomposed regular net keeps"))
    beats = next(v for k, v in by_claim.items() if k.startswith("decomposed regular net beats"))
    chan = next(v for k, v in by_claim.items() if k.startswith("depth-wise"))
    data = next(v for k, v in by_claim.items() if k.startswith("data-driven"))
    asym = next(v for k, v in by_claim.items() if k.startswith("asymmetric"))
    assert (keeps, beats, chan, data, asym) == (
        "does not hold", "does not hold", "does not hold", "inconclusive", "inconclusive")


def test_claims_partly():
    res = _results(asym=(0.95, 0.975, 0.978, 0.980), chan=(0.90, 0.975, 0.98, 0.99))
    chan = next(c for c in claims.claims(res) if c.claim.startswith("depth-wise"))
    assert chan.verdict == "partly"
    assert "1/2 (r=1)" not in chan.evidence and "2/2 (r=1)" in chan.evidence


def test_render_results_has_every_section():
    res = _results()
    text = render.render_results(res, ["closing words"])
    for needle in ["# Results", "Command: `python tools/reproduce.py`", "2 CPUs", "onnxruntime 1.32.0",
                   "## 1. Single-layer study", "### Multiplier 1", "### Multiplier 2",
                   "## 2. Whole network", "N = 32", "N = 512", "fine-tuned (5 epochs, from N = 512)",
                   "## 3. Cost", "## 4. Per-layer multiplier budgets", "BUDGET_CONFIGS", "## 5. Discussion",
                   "single_layer.png", "top1_vs_calib.png", "closing words", "stage2.0/branch1",
                   "98.3 %", "×1.67"]:
        assert needle in text, needle
    assert text.endswith("\n") and not text.endswith("\n\n")
    # every markdown table row of a table has the same number of cells as its header
    for block in text.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            counts = {ln.replace("\\|", "").count("|") for ln in rows}
            assert len(counts) == 1, block


def _study_rows(met_error=True):
    """Rows shaped like tools/budget_study.py's ``run`` output (uniform r=2, target_macs, max_error)."""
    uniform = {"label": "uniform_r2", "options": {"multiplier": 2}, "top1": 0.985, "macs": 3_700_000,
               "macs_before": 8_685_568, "rel_l2": 0.06, "seconds": 4.0, "budget": None,
               "layer_multipliers": {LAYERS[0]: 2, LAYERS[1]: 2},
               "layer_errors": {LAYERS[0]: 0.01, LAYERS[1]: 0.02}}

    def budgeted(label, mode, target, macs, rel_l2, met, mults):
        return {"label": label, "options": {mode: target}, "top1": 0.987, "macs": macs, "macs_before": 8_685_568,
                "rel_l2": rel_l2, "seconds": 9.0,
                "layer_errors": {ly: 0.015 for ly, m in zip(LAYERS, mults) if m != "skip"},
                "budget": {"mode": mode, "target": target, "met": met, "predicted_output_rel_l2": 0.045,
                           "rounds": [{}] * (2 if mode == "max_error" else 1),
                           "layers": [{"name": ly, "multiplier": m} for ly, m in zip(LAYERS, mults)]}}

    return [uniform,
            budgeted("target_macs", "target_macs", 3_700_000 / 8_685_568, 3_690_000, 0.05, True, (3, 1)),
            budgeted("max_error_0.05", "max_error", 0.05, 3_000_000, 0.049 if met_error else 0.061, met_error,
                     (1, "skip"))]


def test_budget_configs_are_the_study_labels(monkeypatch, tmp_path):
    """budget_study.study runs uniform -> target_macs at its fraction -> max_error, labelled as
    BUDGET_CONFIGS; the option sets it passes are valid DecomposeOptions."""
    import dataclasses

    from onnx_dwdecomp.pipeline import DecomposeOptions

    calls = []

    def fake_run(label, out_dir, calib, **options):
        calls.append((label, options))
        return next(r for r in _study_rows() if r["label"] == label)

    monkeypatch.setattr(budget_study, "run", fake_run)
    rows = budget_study.study("c.npz", tmp_path, config.BUDGET_MULTIPLIER, (config.BUDGET_MAX_ERROR,), calib_size=512, seed=0)
    assert [r["label"] for r in rows] == [c.key for c in config.BUDGET_CONFIGS]
    assert calls[0][1] == {"multiplier": 2, "calib_size": 512, "seed": 0}
    assert calls[1][1]["target_macs"] == pytest.approx(3_700_000 / 8_685_568)
    assert calls[2][1]["max_error"] == config.BUDGET_MAX_ERROR
    fields = {f.name for f in dataclasses.fields(DecomposeOptions)}
    for _, options in calls:
        opts = {k: v for k, v in options.items() if k in fields}
        DecomposeOptions(calib="c.npz", exclude=config.EXCLUDE, select="all", **opts).validate()


def test_budget_row_conversion():
    uniform, target, error = (results.budget_row(r, 512) for r in _study_rows())
    assert uniform.met is None and uniform.multipliers == {LAYERS[0]: 2, LAYERS[1]: 2}
    assert uniform.fraction == pytest.approx(3_700_000 / 8_685_568) and uniform.rounds is None
    assert target.met is True and target.multipliers == {LAYERS[0]: 3, LAYERS[1]: 1}
    assert error.multipliers[LAYERS[1]] == "skip" and error.rounds == 2 and error.target == 0.05
    assert error.predicted_rel_l2 == pytest.approx(0.045) and error.calib_size == 512


def test_multiplier_histogram():
    """The per-layer r column: budget_study's counts, formatted."""
    def histogram(multipliers):
        return budget_study.format_counts(budget_study.multiplier_counts(multipliers))

    assert histogram([2, 1, "skip", 10, 2, 1, 1]) == "r=1: 3, r=2: 2, r=10: 1, regular: 1"
    assert histogram([]) == "—"


def test_render_budget_section_lists_rows_when_present():
    rows = [results.budget_row(r, 256) for r in _study_rows(met_error=False)]
    rows += [results.budget_row(r, 512) for r in _study_rows()]
    res = _results(budget_rows=rows, budget_option=True)
    text = "\n".join(render.render_budget_section(res))
    assert "Not measured" not in text
    for needle in ["uniform multiplier 2", "`target_macs` = uniform r=2's MACs fraction", "`max_error` = 0.05",
                   "98.5 %", "98.7 %", "3.70 M (0.4260)", "r=2: 2", "r=1: 1, r=3: 1", "r=1: 1, regular: 1",
                   "— (no budget)", "yes (0.4248 ≤ 0.4260)", "yes (0.0490 ≤ 0.05, 2 rounds)",
                   "**no** (0.0610 > 0.05, 2 rounds)", "Per layer at N = 512", "- N = 256:", "- N = 512:",
                   "a tie with uniform", "is not met", "fewer than uniform r=2"]:
        assert needle in text, needle
    for block in text.split("\n\n"):
        table = [ln for ln in block.splitlines() if ln.startswith("|")]
        if table:
            assert len({ln.replace("\\|", "").count("|") for ln in table}) == 1, block
    layers = render.render_budget_layers(res, 512).splitlines()
    assert len(layers) == 2 + len(LAYERS) + 1  # header, rule, layers, geometric mean
    assert "| regular | — |" in layers[3]  # max_error kept the second layer regular


def test_budget_placeholder_depends_on_the_package():
    assert "no per-layer multipliers" in "\n".join(render.render_budget_section(_results()))
    text = "\n".join(render.render_budget_section(_results(budget_option=True)))
    assert "no budget rows" in text and "BUDGET_CONFIGS" in text


def test_render_notes_and_missing_values():
    res = _results(finetune={}, notes=["QUICK DEBUG RUN"])
    text = render.render_results(res)
    assert "> QUICK DEBUG RUN" in text
    assert "—" in text  # missing fine-tune values


def test_discussion_uses_the_numbers():
    res = _results()
    text = "\n".join(discussion.discussion(res))
    assert "98.0 %" in text and "10.0 %" in text and "2/2 (r=1)" in text
    assert "{" not in text and "}" not in text  # no f-string left unformatted
    assert "{" not in render.render_results(res, discussion.discussion(res))


def test_machine_info_keys():
    info = provenance.machine_info()
    for key in ("cpus", "python", "onnxruntime", "onnx", "numpy", "torch", "loadavg"):
        assert key in info


def test_plots_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    res = _results()
    plots.plot_single_layer(res, tmp_path / "a.png")
    plots.plot_top1(res, tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000


def test_cost_table_groups_batch_sizes():
    text = render.render_cost_table(_results())
    lines = text.splitlines()
    assert "batch 1: median (ms)" in lines[0] and "batch 32: median (ms)" in lines[0]
    assert len(lines) == 2 + 3  # header, rule, one row per model
    dec = next(ln for ln in lines if ln.startswith("| decomposed"))
    assert "3.23 M" in dec and "×1.67" in dec and "×2.00" in dec  # MACs per image, both speed-ups


def test_rank_examples_and_deepest_layer_text():
    res = _results(layer_shapes={LAYERS[0]: (24, 24, 3, 3), LAYERS[1]: (96, 96, 3, 3)},
                   layer_macs={LAYERS[0]: {"regular": 64 * 24 * 24 * 9},
                               LAYERS[1]: {"regular": 4 * 96 * 96 * 9}})
    assert discussion._rank_examples(res) == "3 for 24→24, 10 for 96→96"
    text = discussion._deepest_layer_samples(res)
    assert "4 output positions" in text and "864-long" in text and "4·461 = 1,844" in text


def test_stage_gaps_and_rank2_text():
    res = _results()
    gaps = discussion._stage_gaps(res, 512)
    assert gaps == "stage2 3.00e-02 vs 2.00e-02, stage3 6.00e-02 vs 4.00e-02"
    # r=2 top-1 equal for every method in _results -> a tie; fine-tune gsvd 0.983 vs channel missing
    text = discussion._rank2_and_finetune_text(res)
    assert "a tie" in text and "After the short fine-tune" not in text
    res = _results(finetune={"gsvd_asym": 0.98, "channel": 0.97})
    assert "gsvd still ahead" in discussion._rank2_and_finetune_text(res)
