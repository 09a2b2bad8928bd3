"""Hostile input: every case gives exactly one ``error: …`` line, exit code 2, no traceback,
writes nothing and leaves the input files byte-identical. Plus hypothesis fuzzing of the model
loader and of calibration parsing through the CLI (bounded: few examples, a deadline).

``CASES`` is also read by ``tools/hostile_table.py``, which prints the cases and their messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.cli import build_parser, main
from onnx_dwdecomp.errors import UserError
from onnx_dwdecomp.modelio import load_model
from onnx_dwdecomp.shapes import graph_inputs

ROOT = Path(__file__).resolve().parents[1]
# Latency-aware selection times onnxruntime: slow and machine-dependent. Rewrite all candidates.
SELECT_ALL = (["--select", "all"] if any("--select" in a.option_strings for a in build_parser()._actions)
              else [])
C, HW = 6, 12  # three_layer_net(): input x[N, 6, 12, 12]

READERS = '''
import numpy as np

class _Base:
    def __init__(self, feeds):
        self.feeds = list(feeds)
    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None

class _Raises(_Base):
    def get_next(self):
        raise RuntimeError("camera disconnected")

def raising():
    return _Raises([])

def factory_raises():
    raise IOError("dataset folder /data/imagenet missing")

def returns_list():
    return _Base([[np.zeros((2, 6, 12, 12), np.float32)]])

def not_a_reader():
    return 42

def wrong_shape():
    return _Base([{"x": np.zeros((2, 3, 12, 12), np.float32)}])
'''


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _save(folder: Path, name: str, model: onnx.ModelProto) -> Path:
    p = folder / name
    onnx.save(model, str(p))
    return p


def _npy(folder: Path, arr, name="calib.npy") -> str:
    p = folder / name
    np.save(p, arr)
    return str(p)


def _good(n=8) -> np.ndarray:
    return correlated_images(n, C, HW, HW)


def _with(value, at=(1, 2, 3, 4), dtype=np.float32) -> np.ndarray:
    a = _good().astype(dtype)
    a[at] = value
    return a


def _conv_model(wshape, x_shape=(1, 4, 8, 8), inputs=("x", "W"), inits=None, **attrs) -> onnx.ModelProto:
    node = helper.make_node("Conv", list(inputs), ["y"], name="bad_conv", **attrs)
    inits = inits if inits is not None else [numpy_helper.from_array(np.ones(wshape, np.float32), "W")]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _external_missing(t: Path) -> Path:
    p = t / "ext.onnx"
    onnx.save_model(three_layer_net(), str(p), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    os.remove(t / "ext.onnx.data")
    return p


def _reader(t: Path, factory: str) -> list[str]:
    (t / "readers.py").write_text(READERS)
    return ["--calib-reader", f"{t / 'readers.py'}:{factory}"]


def _images(t: Path) -> str:
    d = t / "imgs"
    d.mkdir()
    (d / "notes.txt").write_text("no images here")
    return str(d)


def _bad_image(t: Path) -> str:
    d = t / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return str(d)


def _truncated(t: Path) -> Path:
    full = three_layer_net().SerializeToString()
    p = t / "trunc.onnx"
    p.write_bytes(full[: len(full) // 2])
    return p


@dataclass(frozen=True)
class Case:
    """``make(tmp) -> argv`` (the model path defaults to a good model ``net.onnx``)."""

    id: str
    what: str
    make: Callable[[Path, Path], list[str]]
    needle: str  # a piece of the expected message


def _m(fn):  # a case that replaces the model: fn(tmp) -> model path
    return lambda t, model: [str(fn(t))]


def _opt(*extra):
    return lambda t, model: [str(model), *extra]


CASES: list[Case] = [
    # ---- the model file
    Case("missing_file", "model file does not exist", _m(lambda t: t / "nope.onnx"), "not found"),
    Case("directory", "model path is a folder", _m(lambda t: t), "directory"),
    Case("empty_file", "empty .onnx file", _m(lambda t: _write(t / "e.onnx", b"")), "empty"),
    Case("random_bytes", "4 KiB of random bytes",
         _m(lambda t: _write(t / "r.onnx", np.random.default_rng(0).bytes(4096))),
         "ONNX model"),
    Case("text_file", "a text file named .onnx",
         _m(lambda t: _write(t / "t.onnx", "hello, this is not a model\n")), "ONNX model"),
    Case("truncated", "the first half of a valid model", _m(_truncated), "ONNX model"),
    Case("tensor_proto", "a valid protobuf that is a TensorProto, not a model",
         _m(lambda t: _write(t / "w.onnx", numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
                             .SerializeToString())), "ONNX model"),
    Case("missing_external_data", "model whose external data file is gone", _m(_external_missing), "external data"),
    Case("kernel_shape_mismatch", "Conv kernel_shape [5, 5] but weight (8, 4, 3, 3)",
         _m(lambda t: _save(t, "k.onnx", _conv_model((8, 4, 3, 3), kernel_shape=[5, 5]))), "kernel_shape"),
    Case("group_not_dividing", "Conv group=3 with 8 output channels",
         _m(lambda t: _save(t, "g.onnx", _conv_model((8, 4, 3, 3), x_shape=(1, 12, 8, 8), group=3))), "group"),
    Case("group_channels_mismatch", "Conv group=2, weight (8, 4, 3, 3) but the input has 4 channels (needs 8)",
         _m(lambda t: _save(t, "g2.onnx", _conv_model((8, 4, 3, 3), group=2))), "channels"),
    Case("weight_channels_mismatch", "weight (8, 5, 3, 3) for a 4-channel input",
         _m(lambda t: _save(t, "c.onnx", _conv_model((8, 5, 3, 3)))), "channels"),
    Case("group_zero", "Conv group=0", _m(lambda t: _save(t, "g0.onnx", _conv_model((8, 4, 3, 3), group=0))),
         "group 0"),
    Case("weight_rank_2", "Conv weight of shape (8, 4)", _m(lambda t: _save(t, "r2.onnx", _conv_model((8, 4)))),
         "weight"),
    Case("bias_mismatch", "bias of 5 values for 8 output channels",
         _m(lambda t: _save(t, "b.onnx", _conv_model(
             (8, 4, 3, 3), inputs=("x", "W", "B"),
             inits=[numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "W"),
                    numpy_helper.from_array(np.ones(5, np.float32), "B")]))), "bias"),
    # ---- calibration data
    Case("calib_missing", "--calib path does not exist", lambda t, m: [str(m), "--calib", str(t / "none.npy")],
         "not found"),
    Case("calib_wrong_channels", "calibration (8, 3, 12, 12) for a 6-channel input",
         lambda t, m: [str(m), "--calib", _npy(t, np.zeros((8, 3, HW, HW), np.float32))], "expected shape"),
    Case("calib_wrong_rank", "calibration of rank 3", lambda t, m: [str(m), "--calib", _npy(t, np.zeros((8, C, HW),
                                                                                                      np.float32))],
         "expected rank 4"),
    Case("calib_wrong_dtype", "int32 calibration for a float input",
         lambda t, m: [str(m), "--calib", _npy(t, np.zeros((8, C, HW, HW), np.int32))], "dtype"),
    Case("calib_nan", "a NaN in sample 1", lambda t, m: [str(m), "--calib", _npy(t, _with(np.nan))], "NaN"),
    Case("calib_inf", "an Inf in sample 1", lambda t, m: [str(m), "--calib", _npy(t, _with(np.inf))], "Inf"),
    Case("calib_overflow", "float64 value 1e300 that overflows float32",
         lambda t, m: [str(m), "--calib", _npy(t, _with(1e300, dtype=np.float64))], "out of range"),
    Case("calib_zero_samples", "calibration array with 0 samples",
         lambda t, m: [str(m), "--calib", _npy(t, np.zeros((0, C, HW, HW), np.float32))], "no samples"),
    Case("calib_not_array", "--calib is a text file",
         lambda t, m: [str(m), "--calib", str(_write(t / "c.txt", "1,2,3"))], "not a .npy"),
    Case("calib_corrupt_npy", "truncated .npy",
         lambda t, m: [str(m), "--calib", str(_write(t / "c.npy", b"\x93NUMPY\x01\x00garbage"))], ".npy"),
    Case("calib_npz_wrong_key", ".npz keyed by a name that is not an input",
         lambda t, m: [str(m), "--calib", str(np.savez(t / "c.npz", x=_good(), extra=_good()) or t / "c.npz")],
         "unexpected keys"),
    Case("calib_object_npy", ".npy holding Python objects (pickle)",
         lambda t, m: [str(m), "--calib", str(np.save(t / "o.npy", np.array([{"a": 1}], dtype=object),
                                                      allow_pickle=True) or t / "o.npy")], "Python objects"),
    Case("calib_empty_folder", "image folder without images", lambda t, m: [str(m), "--calib", _images(t)],
         "no .jpg"),
    Case("calib_bad_image", "image folder with a corrupt PNG (3-channel model)",
         lambda t, m: [str(_save(t, "rgb.onnx", three_layer_net(c=3))), "--calib", _bad_image(t)],
         "cannot read image"),
    Case("calib_image_channels", "image folder for a 6-channel input",
         lambda t, m: [str(m), "--calib", _bad_image(t)], "6 channels"),
    Case("reader_raises", "reader whose get_next() raises", lambda t, m: [str(m), *_reader(t, "raising")],
         "camera disconnected"),
    Case("reader_factory_raises", "reader factory raises", lambda t, m: [str(m), *_reader(t, "factory_raises")],
         "dataset folder"),
    Case("reader_returns_list", "get_next() returns a list", lambda t, m: [str(m), *_reader(t, "returns_list")],
         "expected a dict"),
    Case("reader_not_a_reader", "factory returns an int", lambda t, m: [str(m), *_reader(t, "not_a_reader")],
         "get_next"),
    Case("reader_wrong_shape", "reader feeds 3 channels", lambda t, m: [str(m), *_reader(t, "wrong_shape")],
         "expected shape"),
    Case("reader_missing_module", "--calib-reader module not importable",
         _opt("--calib-reader", "no_such_module_xyz:make"), "not found"),
    Case("reader_bad_spec", "--calib-reader without ':'", _opt("--calib-reader", "readers.py"), "module:callable"),
    Case("calib_and_reader", "--calib and --calib-reader together",
         lambda t, m: [str(m), "--calib", _npy(t, _good()), *_reader(t, "raising")], "not both"),
    # ---- flags
    Case("multiplier_0", "--multiplier 0", _opt("--multiplier", "0"), "--multiplier"),
    Case("multiplier_neg", "--multiplier -1", _opt("--multiplier", "-1"), "--multiplier"),
    Case("multiplier_text", "--multiplier two", _opt("--multiplier", "two"), "--multiplier"),
    Case("positions_neg", "--positions -1", _opt("--positions", "-1"), "--positions"),
    Case("positions_0", "--positions 0", _opt("--positions", "0"), "--positions"),
    Case("positions_text", "--positions many", _opt("--positions", "many"), "--positions"),
    Case("batch_size_0", "--batch-size 0", _opt("--batch-size", "0"), "--batch-size"),
    Case("calib_size_0", "--calib-size 0", _opt("--calib-size", "0"), "--calib-size"),
    Case("seed_text", "--seed abc", _opt("--seed", "abc"), "--seed"),
    Case("method_unknown", "--method tucker", _opt("--method", "tucker"), "--method"),
    Case("gsvd_without_calib", "--method gsvd with no data", _opt("--method", "gsvd"), "--calib"),
    Case("symmetric_without_calib", "--symmetric with no data", _opt("--symmetric"), "--symmetric"),
    Case("input_shape_no_colon", "--input-shape x", _opt("--input-shape", "x"), "NAME:D0"),
    Case("input_shape_text_dim", "--input-shape x:1,a,12,12", _opt("--input-shape", "x:1,a,12,12"), "integers"),
    Case("input_shape_zero_dim", "--input-shape x:1,6,0,12", _opt("--input-shape", "x:1,6,0,12"), "positive"),
    Case("input_shape_wrong_rank", "--input-shape x:1,6,12", _opt("--input-shape", "x:1,6,12"), "rank"),
    Case("input_shape_fixed_dim", "--input-shape x:1,3,12,12 (model fixes 6 channels)",
         _opt("--input-shape", "x:1,3,12,12"), "fixed"),
    Case("input_shape_unknown_name", "--input-shape img:1,6,12,12", _opt("--input-shape", "img:1,6,12,12"),
         "inputs are"),
    Case("max_rel_error_neg", "--max-rel-error -1", _opt("--max-rel-error", "-1"), "--max-rel-error"),
    Case("max_rel_error_nan", "--max-rel-error nan", _opt("--max-rel-error", "nan"), "--max-rel-error"),
    Case("max_rel_error_no_verify", "--max-rel-error with --no-verify",
         _opt("--max-rel-error", "0.1", "--no-verify"), "--no-verify"),
    Case("std_zero", "--std 0,0,0", _opt("--std", "0,0,0"), "--std"),
    Case("mean_text", "--mean red", _opt("--mean", "red"), "--mean"),
    Case("include_nomatch", "--include pattern matching no conv", _opt("--include", "head.*"), "matches no Conv"),
    Case("unknown_flag", "--fast (no such flag)", _opt("--fast"), "unrecognized"),
    Case("no_model", "no model argument", lambda t, m: [], "required"),
    Case("output_is_input", "-o pointing at the input", lambda t, m: [str(m), "-o", str(m)], "input file"),
    Case("output_folder_missing", "-o into a folder that does not exist",
         lambda t, m: [str(m), "-o", str(t / "no" / "out.onnx")], "does not exist"),
    Case("output_is_folder", "-o pointing at a folder",
         lambda t, m: [str(m), "-o", str((t / "d").mkdir() or t / "d")], "directory"),
    Case("report_folder_missing", "--report into a folder that does not exist",
         lambda t, m: [str(m), "--report", str(t / "no" / "r.json")], "does not exist"),
]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` with its bytes (None for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else None
    return out


def prepare(case: Case, folder: Path) -> list[str]:
    """Write the good model and the case's files into ``folder``; return the argv."""
    model = folder / "net.onnx"
    onnx.save(three_layer_net(), str(model))
    return case.make(folder, model)


def run_case(case: Case, folder: Path, capsys=None, quiet: bool = True) -> tuple[int, str, str]:
    """Run one case (in-process with ``capsys``, else in a subprocess); check nothing changed.

    ``--quiet`` hides the progress lines, so stderr holds only the error."""
    argv = prepare(case, folder) + (["--quiet"] if quiet and case.id != "no_model" else [])
    before = _snapshot(folder)
    if capsys is not None:
        rc = main(argv)
        cap = capsys.readouterr()
        out, err = cap.out, cap.err
    else:
        r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", *argv], capture_output=True, text=True,
                           cwd=folder, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, out, err = r.returncode, r.stdout, r.stderr
    assert _snapshot(folder) == before, "files were written, removed or changed"
    return rc, out, err


def _assert_one_line(case: Case, rc: int, out: str, err: str) -> str:
    assert rc == 2, (rc, err)
    assert "Traceback" not in out + err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case, tmp_path, capsys):
    rc, out, err = run_case(case, tmp_path, capsys)
    _assert_one_line(case, rc, out, err)


@pytest.mark.parametrize("case_id", ["truncated", "reader_raises"])
def test_hostile_case_in_a_real_process(case_id, tmp_path):
    """A few cases through ``python -m onnx_dwdecomp``: the process exit code and stderr."""
    case = next(c for c in CASES if c.id == case_id)
    rc, out, err = run_case(case, tmp_path)
    _assert_one_line(case, rc, out, err)


def test_debug_shows_the_traceback(tmp_path):
    case = next(c for c in CASES if c.id == "calib_nan")
    argv = prepare(case, tmp_path) + ["--debug"]
    r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "Traceback" in r.stderr and "CalibrationError" in r.stderr


def test_every_case_id_is_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- fuzzing

_VALID = three_layer_net().SerializeToString()


def _mutations():
    """Bytes near a valid model: truncations, byte flips, splices, and plain random bytes."""
    cut = st.integers(0, len(_VALID)).map(lambda k: _VALID[:k])
    flips = st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8)

    def flip(changes):
        b = bytearray(_VALID)
        for i, v in changes:
            b[i] = v
        return bytes(b)
    splice = st.tuples(st.integers(0, len(_VALID)), st.binary(max_size=64)).map(
        lambda t: _VALID[:t[0]] + t[1] + _VALID[t[0]:])
    return st.one_of(st.binary(max_size=512), cut, flips.map(flip), splice)


@settings(max_examples=60, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutations())
def test_fuzz_model_loader(data):
    """Loading (and classifying the convs of) mangled bytes raises only UserError subclasses."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        p.write_bytes(data)
        try:
            loaded = load_model(p)
            graph_inputs(loaded.model)
            find_candidates(loaded.model)
        except UserError as e:
            assert "\n" not in str(e)
        assert p.read_bytes() == data


@settings(max_examples=12, deadline=10_000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutations())
def test_fuzz_model_through_cli(data):
    """The whole CLI on mangled model bytes: exit 0 (it still is a fine model) or one error line."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        p.write_bytes(data)
        rc, err = _main_captured([str(p), "--quiet", "-o", str(Path(d) / "o.onnx"), *SELECT_ALL])
        assert rc in (0, 2), err
        if rc:
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
            assert sorted(os.listdir(d)) == ["m.onnx"]
        assert p.read_bytes() == data


def _main_captured(argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, buf.getvalue()


_DTYPES = [np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_]


@settings(max_examples=15, deadline=10_000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["npy", "npz", "bytes"]),
       shape=st.lists(st.integers(0, 13), min_size=0, max_size=5),
       dtype=st.sampled_from(_DTYPES),
       special=st.sampled_from([None, np.nan, -np.inf, 1e39]),
       key=st.sampled_from(["x", "y"]),
       payload=st.binary(max_size=200))
def test_fuzz_calibration_through_cli(kind, shape, dtype, special, key, payload):
    """Calibration files of any shape/dtype/content: exit 0 or one error line; nothing written on error."""
    rng = np.random.default_rng(len(shape) + len(payload))
    if len(payload) % 3 == 0:  # bias towards data that fits, so success paths run too
        shape = [max(shape[0] if shape else 4, 1), C, HW, HW]
    arr = (rng.standard_normal(shape) * 2).astype(dtype)
    if special is not None and arr.size and arr.dtype.kind == "f":
        with np.errstate(over="ignore"):
            arr.flat[rng.integers(arr.size)] = special
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        onnx.save(three_layer_net(), str(d / "net.onnx"))
        if kind == "npy":
            np.save(d / "c.npy", arr)
            calib = d / "c.npy"
        elif kind == "npz":
            np.savez(d / "c.npz", **{key: arr})
            calib = d / "c.npz"
        else:
            calib = d / "c.npy"
            calib.write_bytes(payload)
        before = _snapshot(d)
        rc, err = _main_captured([str(d / "net.onnx"), "--calib", str(calib), "--quiet", "--positions", "8",
                                  "-o", str(d / "o.onnx"), *SELECT_ALL])
        assert rc in (0, 2), err
        if rc:
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
            assert _snapshot(d) == before
        else:
            assert (d / "o.onnx").exists()


# --------------------------------------------------------------------------- the --max-rel-error gate


def test_gate_exceeded_exits_1_and_writes_nothing(tmp_path, capsys):
    model = tmp_path / "net.onnx"
    onnx.save(three_layer_net(), str(model))
    before = _snapshot(tmp_path)
    rc = main([str(model), "--max-rel-error", "1e-9", "--report", str(tmp_path / "r.json"), "--quiet", *SELECT_ALL])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: verification failed") and "nothing written" in lines[0]
    assert _snapshot(tmp_path) == before  # no model, no data file, no report, no temp files


def test_gate_met_writes_the_model(tmp_path, capsys):
    """The other side of the gate: a generous bound passes and writes (so the test above can fail)."""
    model = tmp_path / "net.onnx"
    onnx.save(three_layer_net(), str(model))
    assert main([str(model), "--max-rel-error", "10", "--quiet", *SELECT_ALL]) == 0
    assert (tmp_path / "net.dw.onnx").exists()
