"""Tests of onnx_dwdecomp.resources: the job's memory estimate."""

from __future__ import annotations

import pytest

from conftest import three_layer_net
from onnx_dwdecomp import memory, resources
from onnx_dwdecomp.errors import ResourceError


def _job(monkeypatch, cap: str, **overrides):
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info

    model = three_layer_net()
    specs = graph_inputs(model)
    shapes = overrides.pop("shapes", {"x": (1, 6, 12, 12)})
    infos = infer_tensor_info(model, shapes)
    kwargs = dict(model=model, infos=infos, specs=specs, shapes=shapes, fixed_batch=None, samples=None,
                  batch_size=32, positions=64, verify=True, random_samples=8,
                  layers=list(find_candidates(model).layers), latency=False, threads=1, multiplier=None,
                  model_bytes=model.ByteSize())
    kwargs.update(overrides)
    monkeypatch.setenv(memory.ENV_VAR, cap)
    return kwargs


def test_estimate_of_a_small_job_passes_and_names_the_flag_when_too_big(monkeypatch):
    resources.check_job(**_job(monkeypatch, "64M"))
    parts = {p.phase: p for p in resources.job_parts(**_job(monkeypatch, "64M", samples=100, latency=True))}
    assert set(parts) == {"the model's copies", "verification", "calibration", "latency timing"}
    # forward(b) scales with the batch: 100 samples at batch 32 need more than at batch 1
    small = {p.phase: p for p in resources.job_parts(**_job(monkeypatch, "64M", samples=100, batch_size=1))}
    assert small["calibration"].nbytes < parts["calibration"].nbytes
    with pytest.raises(ResourceError, match="--batch-size"):
        resources.check_job(**_job(monkeypatch, "200K", samples=1000, batch_size=1000, positions=None))


def test_estimate_counts_the_verification_outputs(monkeypatch):
    """8 random samples at 12×12 take a few hundred KiB: refused under 100 KiB with the flags
    that shrink them."""
    with pytest.raises(ResourceError, match="verification needs about .* KiB .*--no-verify"):
        resources.check_job(**_job(monkeypatch, "100K"))
    resources.check_job(**_job(monkeypatch, "100K", verify=False))


def test_estimate_is_returned_and_counts_the_heldout_reference(monkeypatch):
    """The estimate goes into the report (peak = the model's copies + the largest phase), and the
    calibration phase counts the input model's outputs on the held-out samples, kept for the
    probes and the rounds' verification: 40 of 400 samples × 6·12·12·4 bytes each."""
    from onnx_dwdecomp.calibration.holdout import heldout_count

    kwargs = _job(monkeypatch, "64M", samples=400, batch_size=8, positions=8)
    estimate = resources.check_job(**kwargs)
    phases = estimate["phases"]
    assert estimate["peak_bytes"] == phases["the model's copies"] + max(
        v for k, v in phases.items() if k != "the model's copies")
    parts = resources.job_parts(**kwargs)
    calibration = next(p for p in parts if p.phase == "calibration")
    assert heldout_count(400) == 40
    kept = 40 * 6 * 12 * 12 * 4
    monkeypatch.setattr(resources, "heldout_count", lambda n, *a: 0)
    without = next(p for p in resources.job_parts(**kwargs) if p.phase == "calibration")
    assert calibration.nbytes - without.nbytes == kept
