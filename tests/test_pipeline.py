"""Tests of onnx_dwdecomp.pipeline.decompose end to end on tiny models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp import zoo
from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.pipeline import decompose


@pytest.fixture(scope="module")
def net():
    return three_layer_net()


@pytest.fixture(scope="module")
def calib():
    return correlated_images(48, 6, 12, 12, seed=0)


def _strip_timing(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d.pop("timing_s"), d.pop("job_cost")  # wall-clock seconds
    if d.get("calibration"):
        d["calibration"].pop("timing_s")
    return d


def test_gsvd_asymmetric_beats_symmetric_beats_svd(net, calib):
    errs = {}
    for label, kw in (("svd", dict(method="svd")), ("sym", dict(method="gsvd", symmetric=True)),
                      ("asym", dict(method="gsvd"))):
        _, rep = decompose(net, calib=calib, select="all", multiplier=1, **kw)
        assert rep.verification.inputs == "held-out calibration samples"
        errs[label] = rep.verification.outputs["y"].rel_l2
    # all three are verified on the same held-out samples; observed ~0.71 < 0.79 < 0.93, so a
    # 2 % margin catches a regression without being sensitive to float rounding.
    assert errs["asym"] < 0.98 * errs["sym"], errs
    assert errs["sym"] < 0.98 * errs["svd"], errs


def test_deterministic_and_input_not_mutated(net, calib):
    # select="all": latency selection times convs on this machine, so only "all" is reproducible
    before = net.SerializeToString()
    calib_copy = calib.copy()
    m1, r1 = decompose(net, calib=calib, method="gsvd", seed=3, select="all")
    m2, r2 = decompose(net, calib=calib, method="gsvd", seed=3, select="all")
    assert net.SerializeToString() == before
    np.testing.assert_array_equal(calib, calib_copy)
    assert m1.SerializeToString() == m2.SerializeToString()
    assert _strip_timing(r1.to_dict()) == _strip_timing(r2.to_dict())
    onnx.checker.check_model(m1, full_check=True)


def test_report_schema_with_calib(net, calib):
    _, rep = decompose(net, calib=calib, method="gsvd", select="all", multiplier=1)
    d = json.loads(rep.to_json())
    assert d["method"] == "gsvd"
    assert [layer["name"] for layer in d["layers"]] == ["conv0", "conv1", "conv2"]
    for layer in d["layers"]:
        assert {"name", "weight_shape", "multiplier", "macs_before", "macs_after", "rel_error"} <= set(layer)
        assert layer["macs_after"] < layer["macs_before"]
        assert layer["error_kind"] == "response" and np.isfinite(layer["rel_error"])
    assert {"macs_before", "macs_after", "params_before", "params_after"} <= set(d["model"])
    assert d["model"]["macs_after"] < d["model"]["macs_before"]
    v = d["verification"]
    assert v["samples"] == 16  # max(round(0.1 · 48), min(16, 48 // 3)) held out
    assert set(v["outputs"]) == {"y"}
    assert set(v["outputs"]["y"]) >= {"rel_l2", "max_abs", "cosine", "top1_agreement"}
    assert {"load", "solve", "rewrite", "verify", "total", "reference_pass"} <= set(d["timing_s"])
    assert d["calibration"]["samples"] == 32 and d["calibration"]["heldout_samples"] == 16


def test_report_records_versions_machine_and_resolved_options(net):
    """Latency decisions depend on the machine and the versions: the JSON says which."""
    import onnx
    import onnxruntime

    import onnx_dwdecomp
    from onnx_dwdecomp.timing.clock import cpu_model, default_threads

    d = json.loads(decompose(net, select="all")[1].to_json())
    env = d["environment"]
    assert env["onnx_dwdecomp"] == onnx_dwdecomp.__version__ and env["onnx"] == onnx.__version__
    assert env["onnxruntime"] == onnxruntime.__version__ and env["numpy"] == np.__version__
    assert env["providers"] == ["CPUExecutionProvider"] and env["cpu"] == cpu_model()
    assert env["threads"] == default_threads() == d["options"]["threads"]
    assert d["options"]["method"] == "svd" and d["options"]["providers"] == ["CPUExecutionProvider"]


def test_report_schema_zoo_svd_no_calib():
    model = zoo.shufflenet_v2(0.5, "merged", num_classes=10, image_size=32)
    before = model.SerializeToString()
    new, rep = decompose(model, select="all")
    assert model.SerializeToString() == before
    d = rep.to_dict()
    assert d["method"] == "svd" and d["layers"]
    for layer in d["layers"]:
        assert {"name", "weight_shape", "multiplier", "macs_before", "macs_after", "rel_error"} <= set(layer)
        assert layer["error_kind"] == "weight" and 0.0 <= layer["rel_error"] <= 1.0
    assert d["skipped"] and all(set(s) == {"name", "reason"} for s in d["skipped"])
    assert any("pointwise" in s["reason"] for s in d["skipped"])
    assert set(d["timing_s"]) >= {"load", "solve", "rewrite", "verify", "total"}
    assert "reference_pass" not in d["timing_s"]
    out = d["verification"]["outputs"]
    assert len(out) == 1
    o = next(iter(out.values()))
    assert set(o) == {"rel_l2", "max_abs", "cosine", "top1_agreement", "feature_rel_l2", "worst_axis", "worst_index"}
    assert o["top1_agreement"] is not None
    assert d["model"]["macs_after"] < d["model"]["macs_before"]
    assert d["model"]["params_after"] < d["model"]["params_before"]
    n_conv = sum(n.op_type == "Conv" for n in model.graph.node)
    assert sum(n.op_type == "Conv" for n in new.graph.node) == n_conv + len(d["layers"])


def test_channel_method_structure(net, calib):
    new, rep = decompose(net, calib=calib, method="channel", select="all")
    by = {n.name: n for n in new.graph.node}
    inits = {t.name: t for t in new.graph.initializer}
    for layer in rep.layers:
        first, second = by[f"{layer.name}/lowrank"], by[f"{layer.name}/lowrank_pointwise"]
        d = layer.rank
        assert d is not None and d >= 1
        assert list(inits[first.input[1]].dims) == [d, layer.weight_shape[1], 3, 3]
        assert list(inits[second.input[1]].dims) == [layer.weight_shape[0], d, 1, 1]
        group = [a.i for a in first.attribute if a.name == "group"]
        assert group in ([], [1])


def test_gsvd_without_calib_raises(net):
    with pytest.raises(OptionError, match="calib"):
        decompose(net, method="gsvd")
    with pytest.raises(OptionError):
        decompose(net, multiplier=0)
    with pytest.raises(OptionError):
        decompose(net, symmetric=True)


def test_default_method_and_no_verify(net, calib):
    _, rep = decompose(net)
    assert rep.method == "svd"
    _, rep = decompose(net, verify=False, calib=calib, multiplier=1, select="all")
    assert rep.method == "gsvd" and rep.verification is None
    with pytest.raises(OptionError, match="--no-verify: the default plan"):
        decompose(net, verify=False, calib=calib)  # the default plan is chosen by verifying


def test_unknown_option_is_an_option_error_naming_the_valid_ones(net):
    """A misspelled keyword used to raise the dataclass's TypeError."""
    with pytest.raises(OptionError, match=r"unknown option 'multipler' \(did you mean 'multiplier'\?\); "
                                          r"valid options: method, multiplier, "):
        decompose(net, multipler=2)


def test_public_signature_names_only_public_types():
    import inspect

    assert "LoadedModel" not in str(inspect.signature(decompose))


def test_nothing_rewritten_gives_the_input_bytes():
    """'the output equals the input' must hold byte for byte (a graph round trip used to name
    the tensors of the 302 Constant nodes of the MNIST export)."""
    from pathlib import Path

    src = onnx.load(str(Path(__file__).resolve().parents[1] / "models/mnist/shufflenetv2_x0.5_regular.onnx"))
    model, report = decompose(src, select="all", exclude=("*",))
    assert not report.layers and model.SerializeToString() == src.SerializeToString()


def test_solver_tunables_are_public_options(net, calib):
    """The L-BFGS rounds and the ridge are options (tools/accuracy_study.py varies them), not
    module globals: 0 rounds is the GSVD sweep alone; another ridge gives other weights."""
    _, sweep = decompose(net, calib=calib, select="all", multiplier=1, verify=False, solver_rounds=0)
    _, default = decompose(net, calib=calib, select="all", multiplier=1, verify=False)
    assert {layer.iterations for layer in sweep.layers} == {1}
    assert max(layer.iterations for layer in default.layers) > 1
    m1, _ = decompose(net, calib=calib, select="all", multiplier=1, verify=False, ridge=0.5)
    m2, _ = decompose(net, calib=calib, select="all", multiplier=1, verify=False)
    assert m1.SerializeToString() != m2.SerializeToString()
    with pytest.raises(OptionError, match="--ridge -1"):
        decompose(net, calib=calib, ridge=-1.0)
    with pytest.raises(OptionError, match="--solver-rounds 1.5: expected an integer"):
        decompose(net, calib=calib, solver_rounds=1.5)


def test_progress_lines_reach_the_jobs_reporter_only(net, calib):
    """Every stage reports through the job's one reporter (progress.py), the calibration
    driver's worker thread included; nothing is reported after the job or to another job."""
    from onnx_dwdecomp.progress import say

    lines: list[str] = []
    decompose(net, calib=calib, select="all", max_error=0.45, progress=lines.append)
    assert any(ln.startswith("calibrate: layer") for ln in lines)
    assert any(ln.startswith("plan: sensitivity probe") for ln in lines) and "verify" in lines
    count = len(lines)
    say("after the job")
    assert len(lines) == count



def test_nothing_is_planned_when_no_plan_can_pay(monkeypatch):
    """With the pricing saying no plan can pay (planning/pricing.cannot_pay_reason), the job runs
    no curve pass and no probe, keeps every candidate regular with that reason (in graph order),
    lists none of them as offered, and says why in the stop reason and the returned line."""
    import onnx_dwdecomp.pipeline as pipeline

    why = ("rewriting every candidate at its fastest option would save 0.001 ms of the model's 1.000 ms (0.1 %), "
           "less than the 2 % a plan must gain as a whole model")
    monkeypatch.setattr(pipeline, "cannot_pay_reason", lambda priced, mode: why)
    _, rep = decompose(three_layer_net(), calib=correlated_images(40, 6, 12, 12), threads=1, select="all")
    d = rep.to_dict()
    assert d["layers"] == [] and "curve_pass" not in d["timing_s"] and "sensitivity_probes" not in d["timing_s"]
    assert [s["name"] for s in d["skipped"]] == ["conv0", "conv1", "conv2"]
    assert all(s["reason"] == "kept regular: " + why for s in d["skipped"])
    assert not any(s["rewritten"] for s in d["selection"])
    assert d["budget"]["stop_reason"] == why
    assert rep.render(verbose=False).splitlines()[-1] == ("  returned: the input model unchanged — no plan can be "
                                                         "≥ 2 % faster: " + why)
