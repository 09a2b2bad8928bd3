"""Tests for tools/make_resnet.py (a tiny ResNet, skipped without torch / scikit-image) and the
pure parts of tools/bench_plan_cost.py (command line, RSS measurement, report summary)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from conftest import load_tool

mr = load_tool("make_resnet")
bpc = load_tool("bench_plan_cost")

TINY = ["--width", "4", "--image-size", "48", "--calib-count", "6", "--test-count", "3", "--num-classes", "10"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("skimage")
    out = tmp_path_factory.mktemp("resnet")
    assert mr.main(["--out-dir", str(out), "--seed", "3", *TINY]) == 0
    return out


def test_tiny_resnet_files_shapes_and_graph(tiny):
    model = onnx.load(str(tiny / "resnet18.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 20 and ops.count("Add") == 8  # 1 stem + 16 block convs + 3 projections
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "input" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 48, 48]
    calib, test = np.load(tiny / "calib.npz"), np.load(tiny / "test.npz")
    assert list(calib.keys()) == ["input"] and calib["input"].shape == (6, 3, 48, 48)
    assert test["input"].shape == (3, 3, 48, 48) and test["input"].dtype == np.float32
    # ImageNet-normalised photos: roughly zero-mean, unit-scale, not constant
    assert abs(float(calib["input"].mean())) < 1.5 and 0.2 < float(calib["input"].std()) < 3


def test_calib_and_test_crops_come_from_disjoint_photos(tiny):
    meta = json.loads((tiny / "meta.json").read_text())
    photo = lambda s: s.split("[")[0]
    assert {photo(c) for c in meta["calib_crops"]}.isdisjoint({photo(c) for c in meta["test_crops"]})
    assert set(mr.PHOTOS_CALIB).isdisjoint(mr.PHOTOS_TEST)


def test_bn_calibration_keeps_activations_sane(tiny):
    """Each BN normalises its calibration input: stage outputs near unit scale, ReLUs half alive."""
    meta = json.loads((tiny / "meta.json").read_text())
    for row in meta["activations"]["calib"]:
        if "std" in row and row["tensor"] != "fc":
            assert 0.3 < row["std"] < 3, row
            assert row["zero_fraction"] < 0.7, row


def test_deterministic_given_the_seed(tiny, tmp_path):
    assert mr.main(["--out-dir", str(tmp_path), "--seed", "3", *TINY]) == 0
    for name in ("resnet18.onnx", "calib.npz", "test.npz"):
        assert (tmp_path / name).read_bytes() == (tiny / name).read_bytes(), name


def test_bench_command_lines():
    common = ["m.onnx", "--calib", "c.npz", "-o", "o.onnx", "--report", "r.json", "--timing-cache", "tc.json"]
    assert bpc.command("default", "m.onnx", "c.npz", "o.onnx", "r.json", "tc.json", ["--threads", "1"])[1:] == \
        ["-m", "onnx_dwdecomp", *common, "--threads", "1"]
    assert bpc.command("uniform", "m.onnx", "c.npz", "o.onnx", "r.json", "tc.json", [])[3:] == \
        [*common, "--multiplier", "1", "--select", "all"]


def test_run_job_measures_the_childs_own_peak_rss(tmp_path):
    code = "import numpy as np; a = np.ones(200 * 2**20, dtype=np.uint8); print(a.sum())"
    res = bpc.run_job([sys.executable, "-c", code], tmp_path / "log")
    assert res["rc"] == 0 and res["wall_s"] > 0
    assert res["peak_rss"] > 200 * 2**20
    small = bpc.run_job([sys.executable, "-c", "pass"], tmp_path / "log2")
    if res["rss_by"] == "gnu-time":  # os.wait4 alone counts this (pytest) process's RSS as a floor
        assert small["peak_rss"] < res["peak_rss"] - 150 * 2**20
    assert bpc.run_job([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log3")["rc"] == 3


def test_plan_summary_reads_what_exists():
    report = {
        "layers": [{}, {}],
        "model": {"macs_before": 100, "macs_after": 80},
        "timing_s": {"plan": 1.0, "wall": 2.0},
        "budget": {"mode": "max_error", "target": 0.02, "chosen_round": 1, "interaction_scale": 0.04,
                   "rounds": [
                       {"multipliers": {"a": 1, "b": "skip"}, "interaction_scale": 1.0, "predicted_error_sum": 0.01,
                        "predicted_output_rel_l2": 0.1, "measured_output_rel_l2": 0.05},
                       {"multipliers": {"a": 1, "b": 2}, "predicted_output_rel_l2": 0.01,
                        "measured_output_rel_l2": 0.02, "new_key": 7},
                   ]},
    }
    s = bpc.plan_summary(report)
    assert s["convs_rewritten"] == 2 and s["macs_ratio"] == pytest.approx(0.8)
    r0, r1 = s["rounds"]
    assert r0["rewritten"] == 1 and r0["predicted"] == pytest.approx(0.1)
    assert r0["ratio"] == pytest.approx(0.1 / 0.05) and s["interaction_scale"] == 0.04
    assert r1["predicted"] == 0.01 and r1["extra"] == {"new_key": 7}
    empty = bpc.plan_summary({})
    assert empty["rounds"] == [] and empty["convs_rewritten"] is None
    bpc.print_plan(s)  # prints without raising
    bpc.print_plan(empty)
