"""Tests of onnx_dwdecomp.resources: available memory, the job estimate, the --threads bound."""

from __future__ import annotations

import pytest

from conftest import three_layer_net
from onnx_dwdecomp import resources
from onnx_dwdecomp.errors import OptionError, ResourceError


@pytest.mark.parametrize("text, value", [("1000", 1000), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29),
                                         ("64k", 64 << 10), ("1T", 1 << 40)])
def test_parse_size(text, value):
    assert resources.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(OptionError, match="ONNX_DWDECOMP_MEMORY"):
        resources.parse_size("lots")


def test_environment_caps_the_available_memory(monkeypatch):
    monkeypatch.setenv(resources.ENV_VAR, "3M")
    assert resources.available_memory() == (3 << 20, f"allowed by ${resources.ENV_VAR}")
    resources.require(1 << 20, "a test", "no flag")
    with pytest.raises(ResourceError, match=r"not enough memory: a test needs about 4.0 MiB, 3.0 MiB allowed by "
                                            r"\$ONNX_DWDECOMP_MEMORY; --some-flag"):
        resources.require(4 << 20, "a test", "--some-flag")


def test_machine_memory_is_read():
    available, source = resources.available_memory()
    assert available is None or (available > 0 and source)


def test_threads_bound():
    from onnx_dwdecomp.timing import default_threads

    resources.check_threads(None)
    resources.check_threads(4 * default_threads())
    with pytest.raises(OptionError, match="--threads 100000: at most"):
        resources.check_threads(100000)


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
    monkeypatch.setenv(resources.ENV_VAR, cap)
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
