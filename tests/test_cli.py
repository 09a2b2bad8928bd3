"""Tests of the command line (in-process via cli.main, plus one real subprocess for --help)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "net.onnx"
    onnx.save(three_layer_net(), str(p))
    return p


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_success_writes_default_output_and_report(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    report = tmp_path / "r.json"
    assert main([str(model_path), "--report", str(report), "--quiet", "--select", "all"]) == 0
    out = tmp_path / "net.dw.onnx"
    assert out.exists() and model_path.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    d = json.loads(report.read_text())
    assert d["method"] == "svd" and len(d["layers"]) == 3
    assert _listing(tmp_path) == ["net.dw.onnx", "net.onnx", "r.json"]  # no temp leftovers
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""  # --quiet


def test_success_with_calib_prints_table(model_path, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, correlated_images(12, 6, 12, 12))
    out = tmp_path / "o.onnx"
    assert main([str(model_path), "--calib", str(calib), "-o", str(out), "--select", "all"]) == 0
    cap = capsys.readouterr()
    assert "conv0" in cap.out and f"wrote {out}" in cap.out
    assert out.exists()


def _expect_user_error(argv, folder: Path, capsys, protected: Path | None = None, code: int = 2):
    before_files = _listing(folder)
    before_bytes = protected.read_bytes() if protected is not None and protected.exists() else None
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == code, cap.err
    lines = cap.err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), cap.err
    assert "Traceback" not in cap.err + cap.out
    assert _listing(folder) == before_files  # nothing written (no output, no temp files)
    if before_bytes is not None:
        assert protected.read_bytes() == before_bytes
    return lines[0]


def test_missing_file(tmp_path, capsys):
    msg = _expect_user_error([str(tmp_path / "nope.onnx"), "--quiet"], tmp_path, capsys)
    assert "not found" in msg


@pytest.mark.parametrize("content", [b"", b"random", "half"], ids=["empty", "random", "truncated"])
def test_bad_model_files(tmp_path, capsys, content):
    p = tmp_path / "bad.onnx"
    if content == "random":
        content = np.random.default_rng(0).bytes(4096)
    elif content == "half":
        full = three_layer_net().SerializeToString()
        content = full[: len(full) // 2]
    p.write_bytes(content)
    _expect_user_error([str(p), "--quiet"], tmp_path, capsys, protected=p)


@pytest.mark.parametrize("extra", [["--multiplier", "0"], ["--include", "nomatch"], ["--method", "bogus"],
                                   ["--method", "gsvd"], ["--positions", "x"]])
def test_bad_options(model_path, tmp_path, capsys, extra):
    _expect_user_error([str(model_path), "--quiet", *extra], tmp_path, capsys, protected=model_path)


def test_calib_wrong_shape(model_path, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((8, 3, 12, 12), np.float32))  # model wants 6 channels
    _expect_user_error([str(model_path), "--calib", str(calib), "--quiet"], tmp_path, capsys, protected=model_path)


def test_max_rel_error_gate(model_path, tmp_path, capsys):
    msg = _expect_user_error([str(model_path), "--max-rel-error", "1e-12", "--quiet", "--select", "all", "--report",
                              str(tmp_path / "r.json")], tmp_path, capsys, protected=model_path, code=1)
    assert "max-rel-error" in msg


def test_debug_shows_traceback(model_path):
    from onnx_dwdecomp.errors import OptionError
    with pytest.raises(OptionError):
        main([str(model_path), "--multiplier", "0", "--debug"])


def test_bench_two_models(model_path, tmp_path, capsys):
    assert main([str(model_path), "--quiet", "--select", "all"]) == 0
    out = tmp_path / "net.dw.onnx"
    js = tmp_path / "bench.json"
    rc = main(["bench", str(model_path), str(out), "--runs", "2", "--warmup", "1", "--threads", "1",
               "--quiet", "--json", str(js)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "net" in cap.out
    assert js.exists() and json.loads(js.read_text())


def test_bench_missing_model(tmp_path, capsys):
    rc = main(["bench", str(tmp_path / "a.onnx"), "--runs", "2", "--quiet"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.err.startswith("error:") and "Traceback" not in cap.err


def test_module_help_subprocess():
    r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--multiplier" in r.stdout and "--calib" in r.stdout
