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
from onnx_dwdecomp.errors import OptionError

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


def test_debug_shows_traceback_and_keeps_the_exit_code(model_path, tmp_path, capsys):
    """--debug used to re-raise, so every failure exited 1 (the code of a failed verification)."""
    assert main([str(model_path), "--multiplier", "0", "--debug"]) == 2
    assert main([str(tmp_path / "nope.onnx"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") == 2 and "OptionError" in err and "ModelError" in err


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


# ---- conventions of onnxsim / onnxslim / onnxruntime.quantization (issue 16) -----------------

def _ok(argv, capsys) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def test_output_as_second_positional(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    _ok([str(model_path), str(out), "--quiet", "--select", "all"], capsys)
    assert out.exists() and not (tmp_path / "net.dw.onnx").exists()
    onnx.checker.check_model(onnx.load(str(out)))


def test_output_given_twice_is_an_error(model_path, tmp_path, capsys):
    msg = _expect_user_error([str(model_path), str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx"), "--quiet"],
                             tmp_path, capsys, protected=model_path)
    assert "give the output once" in msg


def test_list_options_do_not_swallow_the_model(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    _ok(["--exclude", "conv0", "--exclude", "conv2", str(model_path), "--select", "all", "--quiet",
         "--report", str(report)], capsys)
    assert [layer["name"] for layer in json.loads(report.read_text())["layers"]] == ["conv1"]


@pytest.mark.parametrize("shapes", [["x:2,6,12,12"], ["2,6,12,12"]], ids=["named", "bare-dims"])
def test_input_shape_then_positionals(model_path, tmp_path, capsys, shapes):
    """Several values after one --input-shape, and the positionals that follow it."""
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    _ok(["--input-shape", *shapes, str(model_path), str(out), "--select", "all", "--quiet", "--report", str(report)],
        capsys)
    assert json.loads(report.read_text())["options"]["input_shapes"] == {"x": [2, 6, 12, 12]}
    assert out.exists()


def test_several_shapes_after_one_flag(tmp_path, capsys):
    two = tmp_path / "two.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["a", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Add", ["c", "b"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["N", 4, "H", "W"]),
         onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, "H", "W"])],
        [onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(two))
    report = tmp_path / "r.json"
    _ok([str(two), "--input-shape", "a:1,4,10,10", "b:1,8,10,10", "--select", "all", "--quiet",
         "--report", str(report)], capsys)
    assert json.loads(report.read_text())["options"]["input_shapes"] == {"a": [1, 4, 10, 10], "b": [1, 8, 10, 10]}
    msg = _expect_user_error([str(two), "--input-shape", "1,4,10,10", "--quiet"], tmp_path, capsys)
    assert "bare dims need a single-input model" in msg and "a, b" in msg


def test_version(capsys):
    import onnxruntime

    from onnx_dwdecomp import __version__
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnx-dwdecomp {__version__}") and onnxruntime.__version__ in out


def test_save_as_external_data(tmp_path, capsys):
    model_path, out = tmp_path / "wide.onnx", tmp_path / "ext.onnx"
    onnx.save(three_layer_net(c=16, width=64), str(model_path))  # tensors above the 1 KiB external threshold
    _ok([str(model_path), str(out), "--save-as-external-data", "--select", "all", "--quiet"], capsys)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    loaded = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)


def test_a_model_named_like_a_subcommand(tmp_path, capsys, monkeypatch):
    """``bench`` used to be recognised by argv[0]; the decompose word makes any path work."""
    monkeypatch.chdir(tmp_path)
    onnx.save(three_layer_net(), "bench")
    _ok(["decompose", "bench", "out1.onnx", "--select", "all", "--quiet"], capsys)
    _ok(["./bench", "out2.onnx", "--select", "all", "--quiet"], capsys)
    assert (tmp_path / "out1.onnx").exists() and (tmp_path / "out2.onnx").exists()


def test_help_is_grouped(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    headings = ["input and output:", "method:", "calibration:", "selection and budget:", "verification:", "runtime:"]
    positions = [out.index(h) for h in headings]
    assert out.index("\n  --calib-size") > positions[2] and out.index("\n  --max-rel-error") > positions[4]
    assert "(default: 32)" in out  # defaults come from DecomposeOptions


def test_every_option_has_exactly_one_flag_mapped_to_it():
    """Options are declared once (options.py): each field is reachable from the command line."""
    from dataclasses import fields

    from onnx_dwdecomp.cli import build_parser
    from onnx_dwdecomp.options import DecomposeOptions

    decompose = build_parser()._subparsers._group_actions[0].choices["decompose"]
    dests = {a.dest for a in decompose._actions}
    assert {f.name for f in fields(DecomposeOptions)} <= dests


def test_report_records_wall_time_and_environment(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    _ok([str(model_path), "--select", "all", "--quiet", "--report", str(report)], capsys)
    d = json.loads(report.read_text())
    assert d["timing_s"]["wall"] >= d["timing_s"]["total"] > 0
    assert d["environment"]["onnxruntime"] and d["environment"]["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("argv, model, output", [
    (["in.onnx", "--input-shape", "1,3,8,8", "out.onnx"], "in.onnx", "out.onnx"),  # OUTPUT after the shapes
    (["--input-shape", "a:1,3", "b:2,3", "in.onnx", "out.onnx"], "in.onnx", "out.onnx"),
    (["in.onnx", "--seed", "1", "out.onnx"], "in.onnx", "out.onnx"),  # a flag between MODEL and OUTPUT
    (["--exclude", "c*", "in.onnx", "--include", "d*", "out.onnx"], "in.onnx", "out.onnx"),
    (["in.onnx", "--input-shape=1,3,8,8", "-o", "out.onnx"], "in.onnx", "out.onnx"),
])
def test_positionals_keep_their_order_between_flags(argv, model, output):
    """MODEL and OUTPUT swapped when OUTPUT followed --input-shape: the rewrite of OUTPUT's old
    content was written over the input model."""
    from onnx_dwdecomp.cli import parse_args

    args = parse_args(argv)
    assert (args.model, args.output) == (model, output)


def test_bench_keeps_the_first_model_as_reference():
    from onnx_dwdecomp.cli import parse_args

    args = parse_args(["bench", "a.onnx", "--input-shape", "x:1,3,8,8", "b.onnx"])
    assert args.models == ["a.onnx", "b.onnx"] and args.input_shape == ["x:1,3,8,8"]


def test_version_after_other_arguments(capsys):
    assert main(["m.onnx", "--version"]) == 0 and main(["bench", "--version"]) == 0
    assert capsys.readouterr().out.startswith("onnx-dwdecomp ")


def _ext_model(path: Path, data_name: str) -> None:
    onnx.save(three_layer_net(c=16, width=64), str(path), save_as_external_data=True, location=data_name,
              size_threshold=0)


@pytest.mark.parametrize("make", [
    lambda t, m: [str(m), "--calib", str(t / "c.npy"), "--multiplier", "1", "--select", "all",
                  "--report", str(t / "c.npy")],                                     # report over the data
    lambda t, m: [str(m), str(t / "o.onnx"), "--multiplier", "1", "--timing-cache", str(m)],  # cache over the model
    lambda t, m: [str(m), str(t / "o.onnx"), "--select", "all", "--report", str(t / "o.onnx.data")],
    lambda t, m: [str(t / "ext.onnx"), str(t / "shared.onnx"), "--select", "all"],   # OUTPUT.data = input's data
], ids=["report-is-calib", "cache-is-model", "report-is-output-data", "output-data-is-input-data"])
def test_no_result_lands_on_a_file_the_job_reads(model_path, tmp_path, capsys, make):
    """Each of these used to exit 0 having overwritten the calibration data, the model, or the
    external weights of the input or the output."""
    np.save(tmp_path / "c.npy", correlated_images(12, 6, 12, 12))
    _ext_model(tmp_path / "ext.onnx", "shared.onnx.data")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    msg = _expect_user_error(make(tmp_path, model_path) + ["--quiet"], tmp_path, capsys)
    assert "would overwrite" in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_closed_stdout_is_not_an_internal_error(model_path, tmp_path):
    r = subprocess.run(f"{sys.executable} -m onnx_dwdecomp {model_path} {tmp_path / 'o.onnx'} --select all | true",
                       shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "internal error" not in r.stderr and (tmp_path / "o.onnx").exists()


def test_error_line_starts_on_a_clean_terminal_line(model_path, tmp_path, monkeypatch):
    """On a terminal the progress line is cleared before the error is printed."""
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    (tmp_path / "bad.npy").write_text("not an array")
    assert main([str(model_path), "--calib", str(tmp_path / "bad.npy")]) == 2
    assert "\r\033[Kerror: " in err.getvalue()


def test_double_dash_protects_a_model_name_starting_with_a_dash(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(three_layer_net(), "-m.onnx")
    _ok(["--quiet", "--select", "all", "--", "-m.onnx", "-out.onnx"], capsys)
    assert (tmp_path / "-out.onnx").exists()


def test_multi_value_flag_in_equals_form_and_no_abbreviations():
    """`--input-shape=A B` takes B as a shape too; an abbreviated flag is refused instead of
    letting its values become OUTPUT (a file named 'y:1,2' was written)."""
    from onnx_dwdecomp.cli import parse_args

    args = parse_args(["m.onnx", "--input-shape=x:1,6,16,16", "y:1,2", "o.onnx"])
    assert args.input_shapes == ["x:1,6,16,16", "y:1,2"] and (args.model, args.output) == ("m.onnx", "o.onnx")
    with pytest.raises(OptionError, match="unrecognized arguments: --input-shap"):
        parse_args(["m.onnx", "--input-shap", "x:1,6,16,16", "y:1,2"])


def test_closed_pipes_never_lose_the_files(model_path, tmp_path):
    """A closed stderr (progress) must not stop the job; a closed stdout must not lose bench's JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = f"{sys.executable} -m onnx_dwdecomp"
    subprocess.run(f"{py} {model_path} {tmp_path / 'o.onnx'} --select all --no-timing-cache 2>&1 | head -c 5 >/dev/null",
                   shell=True, cwd=tmp_path, timeout=120, env=env)
    assert (tmp_path / "o.onnx").exists()
    r = subprocess.run(f"{py} bench {model_path} --runs 2 --warmup 0 --json {tmp_path / 'b.json'} --quiet | true",
                       shell=True, cwd=tmp_path, timeout=120, env=env, capture_output=True, text=True)
    assert (tmp_path / "b.json").exists() and "internal error" not in r.stderr
