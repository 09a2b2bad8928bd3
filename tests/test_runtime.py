"""runtime.py: execution providers (checked, and used by every session of a job) and sessions
for in-memory models."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp import OptionError, decompose
from onnx_dwdecomp.bench import run_bench
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.runtime import (DEFAULT_PROVIDERS, check_providers, current_providers, make_session,
                                   using_providers)

FAKE = "FakeExecutionProvider"


def test_default_is_the_cpu_and_names_are_checked():
    assert check_providers(DEFAULT_PROVIDERS) == ("CPUExecutionProvider",)
    assert check_providers("CPUExecutionProvider") == ("CPUExecutionProvider",)  # the CLI's comma form
    assert current_providers() == DEFAULT_PROVIDERS


@pytest.mark.parametrize("given, says", [
    ("CUDAExecutionProvider", "not in this onnxruntime"),  # a real provider this (CPU) build lacks
    ("cuda", "did you mean CUDAExecutionProvider"),
    ("CPUExecutionPrvider", "did you mean CPUExecutionProvider"),
    ("", "at least one"),
    ("CPUExecutionProvider,CPUExecutionProvider", "twice"),
])
def test_bad_names_give_one_line_listing_the_available_ones(given, says):
    if given in ort.get_available_providers():
        pytest.skip(f"{given} is available here")
    with pytest.raises(OptionError) as err:
        check_providers(given)
    message = str(err.value)
    assert says in message and "\n" not in message
    if says not in ("at least one", "twice"):
        assert "available here: " + ", ".join(ort.get_available_providers()) in message


def test_cuda_on_a_cpu_machine_is_a_one_line_cli_error(tmp_path, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    path = tmp_path / "m.onnx"
    path.write_bytes(three_layer_net().SerializeToString())
    assert main([str(path), "--providers", "CUDAExecutionProvider", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --providers CUDAExecutionProvider")
    assert not (tmp_path / "m.dw.onnx").exists()
    assert main(["bench", str(path), "--providers", "CUDAExecutionProvider", "--quiet"]) == 2


@pytest.fixture
def recorded_sessions(monkeypatch):
    """Pretend this onnxruntime has a ``FakeExecutionProvider``; every session records the
    providers it was asked for and then runs on the CPU."""
    real_session, real_available = ort.InferenceSession, ort.get_available_providers
    asked: list[tuple[str, ...]] = []

    def session(*args, providers=None, **kwargs):
        asked.append(tuple(providers or ()))
        return real_session(*args, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [FAKE, *real_available()])
    return asked


def test_using_providers_reaches_make_session_and_is_restored(recorded_sessions):
    with using_providers([FAKE, "CPUExecutionProvider"]):
        make_session(three_layer_net())
    make_session(three_layer_net())
    assert recorded_sessions == [(FAKE, "CPUExecutionProvider"), DEFAULT_PROVIDERS]


@pytest.mark.parametrize("select", ["all", "latency"])
def test_every_session_of_a_job_runs_on_the_given_providers(recorded_sessions, select):
    """Calibration segments, the reference pass, shape probes, verification and (with
    --select latency) the timing probes — none may fall back to the default list."""
    providers = (FAKE, "CPUExecutionProvider")
    _, report = decompose(three_layer_net(), calib=correlated_images(12, 6, 12, 12), multiplier=1,
                          select=select, providers=providers, timing_cache=False)
    assert len(recorded_sessions) >= 3 and set(recorded_sessions) == {providers}
    assert report.to_dict()["options"]["providers"] == list(providers)


def test_bench_sessions_and_header_use_the_providers(recorded_sessions, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(three_layer_net().SerializeToString())
    run_bench([path], runs=1, warmup=0, providers=f"{FAKE},CPUExecutionProvider")
    assert recorded_sessions == [(FAKE, "CPUExecutionProvider")]


def test_decompose_refuses_an_unavailable_provider_before_any_work():
    with pytest.raises(OptionError, match="--providers NoSuchExecutionProvider"):
        decompose(three_layer_net(), providers=("NoSuchExecutionProvider",))


def test_make_session_runs_in_memory_models():
    x = np.random.default_rng(0).standard_normal((2, 6, 12, 12)).astype(np.float32)
    model = three_layer_net()
    out = make_session(model).run(None, {model.graph.input[0].name: x})[0]
    assert out.shape[0] == 2 and np.isfinite(out).all()
