"""Hostile input: every case gives exactly one ``error: …`` line, exit code 2, no traceback,
writes nothing and leaves the input files byte-identical. Plus hypothesis fuzzing of the model
loader and of calibration parsing through the CLI (bounded: few examples, a deadline).

``CASES`` is also read by ``tools/hostile_table.py``, which prints the cases and their messages.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import UserError
from onnx_dwdecomp.modelio import load_model
from onnx_dwdecomp.shapes import graph_inputs

ROOT = Path(__file__).resolve().parents[1]
# Latency-aware selection times onnxruntime: slow and machine-dependent. Rewrite all candidates.
SELECT_ALL = ["--select", "all"]  # latency selection times onnxruntime: slow and machine-dependent
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
    needle: str  # a piece of the expected message ("" for exit 0)
    exit: int = 2  # 0: a checker-valid, onnxruntime-runnable model whose new weights are finite is written
    env: tuple[tuple[str, str], ...] = ()  # environment of the run (e.g. a memory cap)
    patch: tuple[str, str, Callable] | None = None  # (module, attribute, replacement) during the run
    issue_class: int | None = None  # the class of issue #15 the case reproduces


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
         lambda t, m: [str(m), "--calib", _npy(t, _good()), *_reader(t, "raising")], "not allowed with"),
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
    Case("output_is_input", "-o pointing at the input", lambda t, m: [str(m), "-o", str(m)], "overwrite the input model"),
    Case("output_folder_missing", "-o into a folder that does not exist",
         lambda t, m: [str(m), "-o", str(t / "no" / "out.onnx")], "does not exist"),
    Case("output_is_folder", "-o pointing at a folder",
         lambda t, m: [str(m), "-o", str((t / "d").mkdir() or t / "d")], "directory"),
    Case("report_folder_missing", "--report into a folder that does not exist",
         lambda t, m: [str(m), "--report", str(t / "no" / "r.json")], "does not exist"),
]


# ---- issue 15: extreme values, huge shapes, resource flags, destinations, valid models refused


def _net_with(value, tensor: str = "w1", at=(0, 0, 0, 0)) -> onnx.ModelProto:
    """three_layer_net() with one value of initializer ``tensor`` replaced."""
    m = three_layer_net()
    for t in m.graph.initializer:
        if t.name == tensor:
            a = numpy_helper.to_array(t).copy()
            a[at] = value
            t.CopyFrom(numpy_helper.from_array(a, tensor))
    return m


def _bn_zero_variance() -> onnx.ModelProto:
    """x[N, 4, 8, 8] → Conv 3×3 → BatchNormalization with var = 0 and epsilon = 0 → y."""
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")] + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
                                                 (("g", np.ones(8)), ("b", np.zeros(8)), ("mu", np.zeros(8)),
                                                  ("var", np.zeros(8)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["y"], name="bn", epsilon=0.0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ir3() -> onnx.ModelProto:
    """three_layer_net() as IR version 3 (opset 8): every initializer listed among the graph inputs."""
    m = three_layer_net()
    m.ir_version = 3
    m.opset_import[0].version = 8
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _weight_input() -> onnx.ModelProto:
    """A conv whose weight W (16, 4, 3, 3) is a graph input (fixed axis 0), x with a dynamic batch."""
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
                           helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 4, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _dynamic_hw(c: int = C) -> onnx.ModelProto:
    """three_layer_net(c) with input x[N, c, H, W]."""
    m = three_layer_net(c=c)
    for vi in list(m.graph.input) + list(m.graph.output):
        for k in (2, 3):
            vi.type.tensor_type.shape.dim[k].dim_param = "HW"[k - 2]
    return m


def _with_opset(version: int) -> onnx.ModelProto:
    m = three_layer_net()
    m.opset_import[0].version = version
    return m


def _compressed_npz(t: Path, n: int) -> str:
    """A small .npz whose compressed member declares ``n`` samples of (6, 12, 12) float32."""
    np.savez_compressed(t / "big.npz", x=np.zeros((n, C, HW, HW), np.float32))
    return str(t / "big.npz")


def _huge_values(t: Path) -> str:
    a = _good(16).astype(np.float64)
    return _npy(t, (a / np.abs(a).max() * 3e38).astype(np.float32), "huge.npy")


def _image_folder(t: Path, n: int = 8) -> str:
    """``n`` RGB PNGs of 20 × 24 pixels in ``t/imgs``."""
    from PIL import Image

    d = t / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(d)


def _image_folder_with_link(t: Path, target: str) -> list[str]:
    """A 3-channel model and an image folder: one good PNG and ``b.png`` → ``target``."""
    from PIL import Image

    d = t / "imgs"
    d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / "a.png")
    os.symlink(target, d / "b.png")
    return [str(_save(t, "rgb.onnx", three_layer_net(c=3))), "--calib", str(d)]


def _simulated_bug(*_args, **_kwargs):
    raise ZeroDivisionError("simulated bug")


def _out(t: Path) -> list[str]:
    return ["-o", str(t / "out.onnx")]


CASES += [
    # 1. non-finite weights
    Case("c1_weight_nan", "one NaN in a 3×3 conv weight, --select all",
         lambda t, m: [str(_save(t, "nan.onnx", _net_with(np.nan))), *SELECT_ALL], "'w1'", issue_class=1),
    Case("c1_weight_inf_no_verify", "one +Inf in a conv weight, --no-verify: that conv left as it is",
         lambda t, m: [str(_save(t, "inf.onnx", _net_with(np.inf))), *SELECT_ALL, "--no-verify", *_out(t)], "",
         exit=0, issue_class=1),
    Case("c1_weight_inf_gsvd", "one −Inf in a conv weight, gsvd with --calib",
         lambda t, m: [str(_save(t, "inf.onnx", _net_with(-np.inf))), "--calib", _npy(t, _good(16)),
                       "--multiplier", "1", *SELECT_ALL], "statistics", issue_class=1),
    Case("c1_weight_nan_default_plan", "one NaN in a conv weight, default plan with --calib",
         lambda t, m: [str(_save(t, "nan.onnx", _net_with(np.nan))), "--calib", _npy(t, _good(16)), *SELECT_ALL],
         "statistics", issue_class=1),
    Case("c1_bn_zero_variance", "Conv → BatchNormalization with var 0 and epsilon 0",
         lambda t, m: [str(_save(t, "bn.onnx", _bn_zero_variance())), *SELECT_ALL], "NaN/Inf in all",
         issue_class=1),
    Case("c1_bn_zero_variance_no_verify", "the same, --no-verify: the BN fold is refused with a reason",
         lambda t, m: [str(_save(t, "bn.onnx", _bn_zero_variance())), *SELECT_ALL, "--no-verify", *_out(t)], "",
         exit=0, issue_class=1),
    # 2. huge shapes
    Case("c2_pads_20000", "Conv pads 20000 (output 1×8×40006×40006), default selection",
         _m(lambda t: _save(t, "pads.onnx", _conv_model((8, 4, 3, 3), pads=[20000] * 4))), "not enough memory",
         issue_class=2),
    Case("c2_pads_1e9", "Conv pads 10⁹, --select all",
         lambda t, m: [str(_save(t, "pads.onnx", _conv_model((8, 4, 3, 3), pads=[10**9] * 4))), *SELECT_ALL],
         "not enough memory", issue_class=2),
    Case("c2_input_40000", "model input 1×3×40000×40000, default selection",
         _m(lambda t: _save(t, "big.onnx", _conv_model((8, 3, 3, 3), x_shape=(1, 3, 40000, 40000)))),
         "not enough memory", issue_class=2),
    Case("c2_input_shape_huge", "--input-shape x:1,6,60000,60000 on an input with dynamic H, W",
         lambda t, m: [str(_save(t, "hw.onnx", _dynamic_hw())), "--input-shape", "x:1,6,60000,60000", *SELECT_ALL],
         "--input-shape", issue_class=2),
    # 3. resource flags and declared sizes
    Case("c3_threads", "--threads 100000", _opt("--threads", "100000", *SELECT_ALL), "--threads", issue_class=3),
    Case("c3_npz_declares_too_much", "compressed .npz declaring (20000, 6, 12, 12) float32, all 20000 asked "
         "for, 16 MiB allowed",
         lambda t, m: [str(m), "--calib", _compressed_npz(t, 20000), "--calib-size", "20000", "--multiplier", "1",
                       *SELECT_ALL],
         "--calib-size", env=(("ONNX_DWDECOMP_MEMORY", "16M"),), issue_class=3),
    Case("c3_npz_calib_size_fits", "the same .npz with --calib-size 16: only 16 samples decompressed",
         lambda t, m: [str(m), "--calib", _compressed_npz(t, 20000), "--calib-size", "16", "--multiplier", "1",
                       *SELECT_ALL, *_out(t)], "", exit=0, env=(("ONNX_DWDECOMP_MEMORY", "16M"),), issue_class=3),
    Case("c3_memory_variable_bad", "ONNX_DWDECOMP_MEMORY=lots", _opt(*SELECT_ALL), "ONNX_DWDECOMP_MEMORY",
         env=(("ONNX_DWDECOMP_MEMORY", "lots"),), issue_class=3),
    # 4. destinations
    Case("c4_output_under_proc", "-o /proc/out.onnx", _opt("-o", "/proc/hostile_out.onnx", *SELECT_ALL),
         "cannot create files in /proc", issue_class=4),
    Case("c4_report_under_proc", "--report /proc/r.json (no model written either)",
         lambda t, m: [str(m), *SELECT_ALL, "--report", "/proc/hostile_r.json"], "cannot create files in /proc",
         issue_class=4),
    # 5. garbage in
    Case("c5_calib_huge_values", "calibration values scaled to 3e38",
         lambda t, m: [str(m), "--calib", _huge_values(t), "--multiplier", "2", *SELECT_ALL], "rescale",
         issue_class=5),
    Case("c5_solver_gives_nan", "a solver that returns NaN factors (simulated)",
         _opt(*SELECT_ALL), "NaN/Inf weights",
         patch=("onnx_dwdecomp.methods", "svd_factors",
                lambda w, b, r: _nan_factors(w, b, r)), issue_class=5),
    # 6. valid models
    Case("c6_ir3_initializers_as_inputs", "IR version 3: every initializer listed among the graph inputs",
         lambda t, m: [str(_save(t, "ir3.onnx", _ir3())), *SELECT_ALL, *_out(t)], "", exit=0, issue_class=6),
    Case("c6_weight_as_graph_input", "a conv weight (16, 4, 3, 3) fed as a graph input",
         lambda t, m: [str(_save(t, "wi.onnx", _weight_input())), *SELECT_ALL, *_out(t)], "", exit=0,
         issue_class=6),
    # 7. small ones
    Case("c7_seed_negative", "--seed -1", _opt("--seed", "-1", *SELECT_ALL), "--seed", issue_class=7),
    Case("c7_opset_99", "a model declaring opset 99", _m(lambda t: _save(t, "op99.onnx", _with_opset(99))),
         "opset 99", issue_class=7),
    Case("c7_image_link_dev_zero", "image folder entry b.png → /dev/zero",
         lambda t, m: _image_folder_with_link(t, "/dev/zero"), "character device", issue_class=7),
    Case("c7_image_dangling_link", "image folder entry b.png → a missing file",
         lambda t, m: _image_folder_with_link(t, str(t / "gone.png")), "dangling", issue_class=7),
    # 8. internal errors
    Case("c8_internal_error", "a bug inside the pipeline (simulated ZeroDivisionError)", _opt(*SELECT_ALL),
         "rerun with --debug and report it", exit=3,
         patch=("onnx_dwdecomp.pipeline", "find_candidates", _simulated_bug), issue_class=8),
]


# ---- issue 22: the models and data users have (inputs without a sample axis, quantized and
# transposed convs, image folders on dynamic sizes, declared sizes read only up to the default cap)


def _loop(t: Path) -> Path:
    """``t/loop1`` → ``loop2`` → ``loop1``: a symbolic link loop."""
    os.symlink(t / "loop2", t / "loop1")
    os.symlink(t / "loop1", t / "loop2")
    return t / "loop1"


def _declared_npz(t: Path, declared: tuple[int, ...], present: int) -> str:
    """A compressed .npz whose member declares ``declared`` float32 but holds its first
    ``present`` rows only (a few MB on disk; 80,000 × 3 × 64 × 64 declares 3.9 GB)."""
    import zipfile

    rows = np.tile(correlated_images(8, *declared[1:]), (present // 8, 1, 1, 1))
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": declared})
    with zipfile.ZipFile(t / "declared.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", head.getvalue() + rows.astype("<f4").tobytes())
    return str(t / "declared.npz")


def _scalar_input_net() -> onnx.ModelProto:
    """three_layer_net() whose output is multiplied by a rank-0 graph input ``scale``."""
    m = three_layer_net()
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = "unscaled"
    m.graph.node.append(helper.make_node("Mul", ["unscaled", "scale"], [out], name="scale_mul"))
    m.graph.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    return m


def _npz(t: Path, name="c.npz", **arrays) -> str:
    np.savez(t / name, **arrays)
    return str(t / name)


def _weight_input_calib(t: Path) -> list[str]:
    model = _save(t, "wi.onnx", _weight_input())
    rng = np.random.default_rng(0)
    return [str(model), "--calib", _npz(t, x=correlated_images(16, 4, 8, 8),
                                        W=rng.standard_normal((16, 4, 3, 3)).astype(np.float32))]


def _quantized(t: Path, fmt: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    float_model = _save(t, "float.onnx", three_layer_net())
    data = correlated_images(4, C, HW, HW)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": data[i:i + 1]} for i in range(len(data))])

        def get_next(self):
            return next(self.feeds, None)

    out = t / f"{fmt.lower()}.onnx"
    quantize_static(str(float_model), str(out), Reader(), quant_format=getattr(QuantFormat, fmt))
    float_model.unlink()
    return out


def _conv_transpose() -> onnx.ModelProto:
    m = three_layer_net()
    n = m.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    w = numpy_helper.from_array(np.full((n, 2, 2, 2), 0.1, np.float32), "wt")
    out = m.graph.output[0].name
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.append(helper.make_node("ConvTranspose", ["pre", "wt"], [out], name="up", strides=[2, 2]))
    m.graph.initializer.append(w)
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 2
    for k in (2, 3):
        m.graph.output[0].type.tensor_type.shape.dim[k].dim_value *= 2
    return m


CASES += [
    Case("i22_calib_symlink_loop", "--calib is a symbolic link loop", lambda t, m: [str(m), "--calib", str(_loop(t))],
         "symbolic link loop"),
    Case("i22_model_symlink_loop", "MODEL is a symbolic link loop", _m(_loop), "symbolic link loop"),
    Case("i22_output_symlink_loop", "-o is a symbolic link loop", lambda t, m: [str(m), "-o", str(_loop(t))],
         "symbolic link loop"),
    Case("i22_npz_declares_3_9_gb", "compressed .npz declaring 80,000 × 3 × 64 × 64 float32 (3.9 GB), default "
         "options: the first 512 rows read", lambda t, m: [
             str(_save(t, "rgb64.onnx", three_layer_net(c=3, hw=64))), "--calib",
             _declared_npz(t, (80000, 3, 64, 64), 512), "--multiplier", "1", *SELECT_ALL, *_out(t)], "", exit=0,
         env=(("ONNX_DWDECOMP_MEMORY", "2G"),)),
    Case("i22_image_folder_dynamic_hw", "image folder on a model with dynamic H, W, --input-shape x:1,3,16,16",
         lambda t, m: [str(_save(t, "hw3.onnx", _dynamic_hw(c=3))), "--calib", _image_folder(t),
                       "--input-shape", "x:1,3,16,16", "--multiplier", "1", *SELECT_ALL, *_out(t)], "", exit=0),
    Case("i22_image_folder_dynamic_hw_no_size", "the same without --input-shape",
         lambda t, m: [str(_save(t, "hw3.onnx", _dynamic_hw(c=3))), "--calib", _image_folder(t)], "--input-shape"),
    Case("i22_scalar_input_one_value", "rank-0 input 'scale', one 0-d value for all samples",
         lambda t, m: [str(_save(t, "s.onnx", _scalar_input_net())), "--calib",
                       _npz(t, x=_good(16), scale=np.float32(2.0)), "--multiplier", "1", *SELECT_ALL, *_out(t)], "",
         exit=0),
    Case("i22_scalar_input_per_sample", "rank-0 input 'scale', an (N,) array: one value per sample",
         lambda t, m: [str(_save(t, "s.onnx", _scalar_input_net())), "--calib",
                       _npz(t, x=_good(16), scale=np.linspace(1, 2, 16, dtype=np.float32)), "--multiplier", "1",
                       *SELECT_ALL, *_out(t)], "", exit=0),
    Case("i22_scalar_input_n_by_1", "rank-0 input 'scale', an (N, 1) array",
         lambda t, m: [str(_save(t, "s.onnx", _scalar_input_net())), "--calib",
                       _npz(t, x=_good(16), scale=np.ones((16, 1), np.float32))], "scalar (rank 0)"),
    Case("i22_weight_input_calibrated", "a conv weight (16, 4, 3, 3) fed as a graph input, with --calib",
         lambda t, m: [*_weight_input_calib(t), "--multiplier", "1", *SELECT_ALL, *_out(t)], "", exit=0),
    Case("i22_qdq_model", "a QDQ model (onnxruntime.quantization.quantize_static)",
         lambda t, m: [str(_quantized(t, "QDQ")), *SELECT_ALL, *_out(t)], "", exit=0),
    Case("i22_qoperator_model", "a QOperator model (QLinearConv)",
         lambda t, m: [str(_quantized(t, "QOperator")), *SELECT_ALL, *_out(t)], "", exit=0),
    Case("i22_conv_transpose", "a model ending in ConvTranspose",
         lambda t, m: [str(_save(t, "ct.onnx", _conv_transpose())), *SELECT_ALL, *_out(t)], "", exit=0),
]


def _nan_factors(weight, bias, r):
    from onnx_dwdecomp.solve import svd_factors

    f = svd_factors(weight, bias, r)
    f.pointwise[...] = np.nan
    return f


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


@contextlib.contextmanager
def case_context(case: Case):
    """The case's environment variables and patch, undone afterwards."""
    saved = {k: os.environ.get(k) for k, _ in case.env}
    os.environ.update(dict(case.env))
    undo = None
    if case.patch is not None:
        module, attr, replacement = case.patch
        target = importlib.import_module(module)
        undo = (target, attr, getattr(target, attr))
        setattr(target, attr, replacement)
    try:
        yield
    finally:
        if undo is not None:
            setattr(*undo)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(case: Case, folder: Path, capsys=None, quiet: bool = True) -> tuple[int, str, str]:
    """Run one case (in-process with ``capsys``, else in a subprocess); check that the input
    files are unchanged and — unless the case writes a model (exit 0) — nothing was written.

    ``--quiet`` hides the progress lines, so stderr holds only the error."""
    argv = prepare(case, folder) + (["--quiet"] if quiet and case.id != "no_model" else [])
    before = _snapshot(folder)
    if capsys is not None:
        with case_context(case):
            rc = main(argv)
        cap = capsys.readouterr()
        out, err = cap.out, cap.err
    else:
        assert case.patch is None, "patched cases run in-process only"
        r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", *argv], capture_output=True, text=True,
                           cwd=folder, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **dict(case.env)})
        rc, out, err = r.returncode, r.stdout, r.stderr
    after = _snapshot(folder)
    if rc == 0 and case.exit == 0:
        assert {k: after.get(k) for k in before} == before, "input files were changed or removed"
    else:
        assert after == before, "files were written, removed or changed"
    return rc, out, err


def _assert_one_line(case: Case, rc: int, out: str, err: str) -> str:
    assert rc == case.exit, (rc, err)
    assert "Traceback" not in out + err
    lines = err.strip("\n").splitlines()
    prefix = "internal error: " if case.exit == 3 else "error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert case.needle in lines[0], lines[0]
    assert len(lines[0]) <= 420 and "::" not in lines[0], lines[0]  # one readable line, no C++ signatures
    return lines[0]


def assert_valid_output(out: Path, inputs: list[Path]) -> None:
    """``out`` passes the full checker, runs in onnxruntime on random inputs, and holds no
    NaN/Inf weight that none of the ``inputs`` models held under that name."""
    from onnx_dwdecomp.verify import nonfinite_tensors

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    allowed = set().union(*(nonfinite_tensors(onnx.load(str(p))) for p in inputs if _is_model(p)))
    assert set(nonfinite_tensors(model)) <= allowed
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in i.shape]
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sess.run(None, feeds)


def _is_model(p: Path) -> bool:
    try:
        onnx.load(str(p), load_external_data=False)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case, tmp_path, capsys):
    if case.id.startswith(("c4_", "c7_image")) and not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc and /dev")
    rc, out, err = run_case(case, tmp_path, capsys)
    if case.exit == 0:
        assert rc == 0 and "Traceback" not in out + err and err == "", (rc, err)
        out = tmp_path / "out.onnx"
        assert_valid_output(out, [p for p in tmp_path.glob("*.onnx") if p != out])
        return
    _assert_one_line(case, rc, out, err)


@pytest.mark.parametrize("case_id", ["truncated", "reader_raises", "c2_pads_20000"])
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
    assert r.returncode == 2 and "Traceback" in r.stderr and "CalibrationError" in r.stderr


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


# --------------------------------------------------------------------------- issue 15: the promise, property-based


@st.composite
def _conv_graphs(draw):
    """A random small conv graph (1–3 convs, optional bias/Relu/BatchNormalization, dynamic batch)
    and its input channels and size; weights sometimes outside the valid domain (NaN, ±Inf, 1e30)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(5, 10))
    nodes, inits = [], []
    cur, cin, size = "x", c, h
    for k in range(draw(st.integers(1, 3))):
        kh, kw = draw(st.sampled_from([(3, 3), (1, 1), (3, 1), (2, 2)]))
        pad = draw(st.integers(0, 1))
        stride = draw(st.sampled_from([1, 1, 2]))
        if (size + 2 * pad - max(kh, kw)) // stride + 1 < 2:
            stride, pad = 1, 1
        cout = draw(st.integers(1, 6))
        w = (rng.standard_normal((cout, cin, kh, kw)) / np.sqrt(cin * kh * kw)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        inputs = [cur, f"w{k}"]
        if draw(st.booleans()):
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(cout)).astype(np.float32), f"b{k}"))
            inputs.append(f"b{k}")
        nodes.append(helper.make_node("Conv", inputs, [f"c{k}"], name=f"conv{k}", kernel_shape=[kh, kw],
                                      pads=[pad, pad, pad, pad], strides=[stride, stride]))
        cur = f"c{k}"
        if draw(st.booleans()):
            params = [rng.uniform(0.5, 2, cout), rng.standard_normal(cout), rng.standard_normal(cout),
                      rng.uniform(0.5, 2, cout)]
            names = [f"bn{k}_{p}" for p in "gbmv"]
            inits += [numpy_helper.from_array(p.astype(np.float32), n) for p, n in zip(params, names, strict=True)]
            nodes.append(helper.make_node("BatchNormalization", [cur, *names], [f"n{k}"], name=f"bn{k}"))
            cur = f"n{k}"
        nodes.append(helper.make_node("Relu", [cur], [f"r{k}"], name=f"relu{k}"))
        cur, cin = f"r{k}", cout
        size = (size + 2 * pad - max(kh, kw)) // stride + 1
    nodes[-1].output[0] = "y"
    bad = draw(st.sampled_from([None] * 4 + [np.nan, np.inf, -np.inf, 1e30]))
    if bad is not None:
        t = inits[0]
        a = numpy_helper.to_array(t).copy()
        a.flat[0] = bad
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    g = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, h, h])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cin, None, None])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, c, h


@st.composite
def _calibration(draw, c: int, h: int):
    """None, or calibration samples within the valid domain or outside it (wrong shape or
    dtype, NaN/Inf, values too large for float32 statistics, too few samples)."""
    kind = draw(st.sampled_from(["none", "good", "good", "good", "nan", "inf", "huge", "big_ok", "channels", "int",
                                 "one"]))
    if kind == "none":
        return None
    n = 1 if kind == "one" else draw(st.integers(2, 12))
    a = correlated_images(n, c, h, h, seed=draw(st.integers(0, 99)))
    if kind == "nan":
        a[n // 2, 0, 0, 0] = np.nan
    elif kind == "inf":
        a[0, -1, -1, -1] = -np.inf
    elif kind == "huge":
        a = (a.astype(np.float64) / np.abs(a).max() * 3e38).astype(np.float32)
    elif kind == "big_ok":
        a = a * np.float32(1e6)
    elif kind == "channels":
        a = correlated_images(n, c + 1, h, h)
    elif kind == "int":
        a = a.astype(np.int32)
    return a


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_promise_on_random_conv_graphs_and_calibration(data):
    """The promise of issue 15 on random small conv graphs and calibration arrays in and out of
    the valid domain: exit 0 with a checker-valid, onnxruntime-runnable output without new NaN/Inf
    weights whose (held-out or random-input) error is reported and finite; or exit 1/2 with one
    ``error:`` line; never a traceback, never a file written on failure, inputs byte-identical."""
    model, c, h = data.draw(_conv_graphs(), label="graph")
    calib = data.draw(_calibration(c, h), label="calibration")
    flags = data.draw(st.sampled_from([["--multiplier", "1"], ["--multiplier", "2"], []]), label="flags")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        onnx.save(model, str(d / "m.onnx"))
        argv = [str(d / "m.onnx"), "-o", str(d / "out.onnx"), "--report", str(d / "r.json"), "--quiet",
                "--positions", "8", *SELECT_ALL, *flags]
        if calib is not None:
            np.save(d / "c.npy", calib)
            argv += ["--calib", str(d / "c.npy")]
        before = _snapshot(d)
        rc, err = _main_captured(argv)
        assert "Traceback" not in err
        after = _snapshot(d)
        assert {k: after.get(k) for k in before} == before, "input files changed"
        if rc == 0:
            assert err == "", err
            assert_valid_output(d / "out.onnx", [d / "m.onnx"])
            import json
            report = json.loads((d / "r.json").read_text())
            errors = [o["feature_rel_l2"] for o in report["verification"]["outputs"].values()]
            assert errors and all(np.isfinite(e) for e in errors), report["verification"]
        else:
            assert rc in (1, 2), (rc, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert after == before, "files were written on failure"


# --------------------------------------------------------------------------- issue 15: exit codes and writes


def _net(tmp_path: Path) -> Path:
    p = tmp_path / "net.onnx"
    onnx.save(three_layer_net(), str(p))
    return p


def test_internal_error_is_one_line_exit_3_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    model = _net(tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr("onnx_dwdecomp.pipeline.find_candidates", _simulated_bug)
    assert main([str(model), "--quiet", *SELECT_ALL]) == 3
    err = capsys.readouterr().err
    assert err.startswith("internal error: ZeroDivisionError: simulated bug at ") and err.count("\n") == 1
    assert err.rstrip().endswith("(rerun with --debug and report it)")
    assert _snapshot(tmp_path) == before
    assert main([str(model), "--quiet", "--debug", *SELECT_ALL]) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code, needle", [(KeyboardInterrupt(), 130, "interrupted"),
                                               (MemoryError("Unable to allocate 95.4 GiB"), 2, "out of memory")])
def test_interrupt_and_memory_error_are_one_line(tmp_path, capsys, monkeypatch, exc, code, needle):
    model = _net(tmp_path)
    before = _snapshot(tmp_path)

    def boom(*_a, **_k):
        raise exc
    monkeypatch.setattr("onnx_dwdecomp.pipeline.find_candidates", boom)
    assert main([str(model), "--quiet", *SELECT_ALL]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_numpy_warnings_do_not_reach_stderr_without_debug(tmp_path):
    """A RuntimeWarning raised inside the job (numpy's overflow notes) is not printed: the
    non-finite checks report what matters. A real process, as pytest would catch the warning."""
    model = _net(tmp_path)
    code = ("import sys, warnings\n"
            "import onnx_dwdecomp.pipeline as p\n"
            "real = p.find_candidates\n"
            "def noisy(*a, **k):\n"
            "    warnings.warn('overflow encountered in matmul', RuntimeWarning)\n"
            "    return real(*a, **k)\n"
            "p.find_candidates = noisy\n"
            "from onnx_dwdecomp.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(model), "--quiet", *SELECT_ALL], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_report_that_cannot_be_moved_into_place_leaves_no_model(tmp_path, capsys, monkeypatch):
    """Model and report are written together or not at all: a failure moving the report puts
    the previous model back."""
    from onnx_dwdecomp import modelio

    model = _net(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    out.write_bytes(b"an older output")
    before = _snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(report):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(modelio.os, "replace", replace)
    assert main([str(model), "-o", str(out), "--report", str(report), "--quiet", *SELECT_ALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "nothing written" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_read_only_destination_folder_is_refused_before_any_work(tmp_path, capsys, flag):
    model = _net(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        before = _snapshot(tmp_path)
        assert main([str(model), flag, str(ro / "x"), "--quiet", *SELECT_ALL]) == 2
        err = capsys.readouterr().err
        assert "cannot create files in" in err and "Permission denied" in err
        assert _snapshot(tmp_path) == before
    finally:
        ro.chmod(0o700)


def test_model_and_report_follow_the_umask(tmp_path, capsys):
    model = _net(tmp_path)
    old = os.umask(0o022)
    try:
        assert main([str(model), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"), "--quiet",
                     *SELECT_ALL]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp)


def test_onnxruntime_messages_become_one_readable_line():
    from onnx_dwdecomp.errors import first_line, one_line

    ort_msg = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model_load_utils.h:46 void "
               "onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map<std::__cxx11::"
               "basic_string<char>, int>&, const onnxruntime::logging::Logger&, bool, const std::string&, int) "
               "ONNX Runtime only *guarantees* support for models stamped with opset version 7 or above.")
    assert one_line(ort_msg) == ("ONNX Runtime only *guarantees* support for models stamped with opset version 7 "
                                 "or above.")
    assert first_line(RuntimeError("a\nb")) == "a"
    assert len(one_line("x" * 1000)) == 400
