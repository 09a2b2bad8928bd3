"""Tests for onnx_dwdecomp.data: every source kind, batching, validation and error paths."""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_dwdecomp.data import sources
from onnx_dwdecomp.data.dataset import Batch, load_calibration
from onnx_dwdecomp.data.readers import load_reader
from onnx_dwdecomp.data.specs import InputSpec
from onnx_dwdecomp.errors import CalibrationError, OptionError

Image = pytest.importorskip("PIL.Image")

SPEC = [InputSpec("input", np.float32, (None, 3, 8, 8))]


def _data(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


class ListReader:
    """CalibrationDataReader over a list of feeds; optional rewind()."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.pos = 0
        self.calls = 0

    def get_next(self):
        self.calls += 1
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]


class RewindReader(ListReader):
    def __init__(self, feeds):
        super().__init__(feeds)
        self.rewinds = 0

    def rewind(self):
        self.rewinds += 1
        self.pos = 0


def _chunks(x: np.ndarray, sizes=(3, 1, 4, 2)) -> list[dict[str, np.ndarray]]:
    out, s = [], 0
    for k in sizes:
        out.append({"input": x[s : s + k]})
        s += k
    assert s == len(x)
    return out


def _all(cd, batch_size=4, **kw) -> np.ndarray:
    return np.concatenate([b.feeds["input"][: b.count] for b in cd.iter_batches(batch_size, **kw)])


# --------------------------------------------------------------------------- sources agree


def test_every_source_kind_gives_the_same_arrays(tmp_path):
    x = _data(10)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "a.npz", input=x)
    np.savez_compressed(tmp_path / "c.npz", whatever=x)  # single array, any key
    sources = {
        "npy": tmp_path / "a.npy",
        "npy-str": str(tmp_path / "a.npy"),
        "npz": tmp_path / "a.npz",
        "npz-compressed": tmp_path / "c.npz",
        "reader": ListReader(_chunks(x)),
        "reader-rewind": RewindReader(_chunks(x)),
        "ndarray": x,
        "dict": {"input": x},
    }
    for kind, src in sources.items():
        cd = load_calibration(src, SPEC)
        assert cd.num_samples == 10, kind
        assert cd.input_names == ("input",)
        assert cd.sample_shapes == {"input": (3, 8, 8)}
        for _ in range(2):  # every pass starts again from sample 0
            got = _all(cd, 4)
            np.testing.assert_array_equal(got, x, err_msg=kind)
            assert got.dtype == np.float32


def test_npy_is_memory_mapped(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", _data(4))
    seen = []
    real = np.load

    def spy(*a, **kw):
        seen.append(kw.get("mmap_mode"))
        return real(*a, **kw)

    monkeypatch.setattr(np, "load", spy)
    cd = load_calibration(tmp_path / "a.npy", SPEC)
    assert seen == ["r"]
    b = next(cd.iter_batches(2))
    assert type(b.feeds["input"]) is np.ndarray and b.feeds["input"].flags.writeable


def test_batches_are_fresh_copies():
    x = _data(4)
    cd = load_calibration({"input": x}, SPEC)
    next(cd.iter_batches(4)).feeds["input"][:] = 0
    np.testing.assert_array_equal(_all(cd), x)


def test_multi_input_npz(tmp_path):
    specs = [InputSpec("a", np.float32, (None, 2)), InputSpec("ids", np.int64, (None, 3))]
    a = np.arange(10, dtype=np.float32).reshape(5, 2)
    ids = np.arange(15, dtype=np.int64).reshape(5, 3)
    np.savez(tmp_path / "m.npz", ids=ids, a=a)
    cd = load_calibration(tmp_path / "m.npz", specs)
    assert cd.input_names == ("a", "ids") and cd.sample_shapes == {"a": (2,), "ids": (3,)}
    b = list(cd.iter_batches(3))
    np.testing.assert_array_equal(np.concatenate([x.feeds["ids"] for x in b]), ids)
    assert b[0].feeds["ids"].dtype == np.int64


# --------------------------------------------------------------------------- batching


def test_iter_batches_sizes_starts_and_counts():
    cd = load_calibration(_data(10), SPEC)
    bs = list(cd.iter_batches(4))
    assert [(b.start, b.count, len(b.feeds["input"])) for b in bs] == [(0, 4, 4), (4, 4, 4), (8, 2, 2)]
    assert all(isinstance(b, Batch) for b in bs)
    assert [b.count for b in cd.iter_batches(20)] == [10]


def test_pad_to_repeats_last_sample():
    x = _data(10)
    cd = load_calibration(x, SPEC)
    bs = list(cd.iter_batches(4, pad_to=4))
    assert [(b.start, b.count) for b in bs] == [(0, 4), (4, 4), (8, 2)]
    assert all(len(b.feeds["input"]) == 4 for b in bs)
    last = bs[-1].feeds["input"]
    np.testing.assert_array_equal(last[:2], x[8:])
    np.testing.assert_array_equal(last[2], x[9])
    np.testing.assert_array_equal(last[3], x[9])
    # pad_to larger than batch_size: every batch padded
    bs = list(cd.iter_batches(3, pad_to=5))
    assert [len(b.feeds["input"]) for b in bs] == [5] * 4 and [b.count for b in bs] == [3, 3, 3, 1]


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(batch_size=-1), dict(batch_size=2.5),
                                dict(batch_size=True), dict(batch_size=4, pad_to=2), dict(batch_size=1, pad_to=0)])
def test_iter_batches_bad_arguments(kw):
    cd = load_calibration(_data(3), SPEC)
    with pytest.raises(OptionError):
        cd.iter_batches(**kw)  # raised at the call, not on first next()


def test_reader_rebatching_across_feeds():
    x = _data(10)
    cd = load_calibration(RewindReader(_chunks(x, (1, 5, 1, 3))), SPEC)
    bs = list(cd.iter_batches(3, pad_to=3))
    assert [(b.start, b.count) for b in bs] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    np.testing.assert_array_equal(np.concatenate([b.feeds["input"][: b.count] for b in bs]), x)


# --------------------------------------------------------------------------- calib_size


def test_calib_size_caps_every_source(tmp_path):
    x = _data(10)
    np.save(tmp_path / "a.npy", x)
    for src in (tmp_path / "a.npy", ListReader(_chunks(x)), RewindReader(_chunks(x))):
        cd = load_calibration(src, SPEC, calib_size=5)
        assert cd.num_samples == 5
        np.testing.assert_array_equal(_all(cd, 2), x[:5])
    assert load_calibration(x, SPEC, calib_size=100).num_samples == 10


def test_calib_size_stops_reading_and_ignores_bad_data_after_it():
    x = _data(10)
    x[7, 0, 0, 0] = np.nan  # beyond the cap: never looked at
    r = RewindReader(_chunks(x, (3, 3, 4)))
    cd = load_calibration(r, SPEC, calib_size=4)
    assert r.calls == 2  # 3 + 3 >= 4: no third get_next
    _all(cd)
    assert r.rewinds == 2  # before the validation pass and before the pass above
    assert load_calibration(x, SPEC, calib_size=7).num_samples == 7


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_calib_size_invalid(bad):
    with pytest.raises(OptionError, match="calib_size"):
        load_calibration(_data(3), SPEC, calib_size=bad)


# --------------------------------------------------------------------------- validation


def test_wrong_dim_message_names_input_expected_and_received(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 3, 64, 64), np.float32))
    spec = [InputSpec("input", np.float32, (None, 3, 224, 224))]
    with pytest.raises(CalibrationError) as e:
        load_calibration(tmp_path / "a.npy", spec)
    msg = str(e.value)
    assert "calibration input 'input': expected shape (N, 3, 224, 224), got (10, 3, 64, 64)" in msg
    assert "a.npy" in msg and "\n" not in msg


def test_dynamic_dims_accept_any_size_and_batch_dim_is_not_compared():
    spec = [InputSpec("input", np.float32, (1, 3, None, None))]
    cd = load_calibration(np.zeros((4, 3, 5, 7), np.float32), spec)
    assert cd.sample_shapes == {"input": (3, 5, 7)}


@pytest.mark.parametrize("shape", [(10, 3, 8), (10, 3, 8, 8, 1), (10,)])
def test_wrong_rank(shape):
    with pytest.raises(CalibrationError, match=r"'input': expected rank 4"):
        load_calibration(np.zeros(shape, np.float32), SPEC)


def test_scalar_array_rejected():
    with pytest.raises(CalibrationError, match="scalar"):
        load_calibration(np.array(1.0, np.float32), SPEC)


def test_dtype_rules():
    # other float widths are cast to the model's float dtype
    cd = load_calibration(_data(3).astype(np.float64), SPEC)
    assert next(cd.iter_batches(3)).feeds["input"].dtype == np.float32
    cd = load_calibration(_data(3), [InputSpec("input", np.float16, (None, 3, 8, 8))])
    assert next(cd.iter_batches(3)).feeds["input"].dtype == np.float16
    # ints / bools / strings / objects into a float input
    for bad in (np.int64, np.bool_, np.uint8, np.complex64):
        with pytest.raises(CalibrationError, match=r"'input': expected dtype float32.*got"):
            load_calibration(np.zeros((3, 3, 8, 8), bad), SPEC)
    with pytest.raises(CalibrationError, match="expected dtype float32"):
        load_calibration({"input": np.full((3, 3, 8, 8), "a")}, SPEC)
    with pytest.raises(CalibrationError, match="expected dtype float32"):
        load_calibration({"input": np.empty((3, 3, 8, 8), object)}, SPEC)
    # non-float inputs need the exact dtype
    ispec = [InputSpec("ids", np.int64, (None, 4))]
    load_calibration(np.zeros((2, 4), np.int64), ispec)
    load_calibration(np.zeros((2, 4), ">i8"), ispec)  # byte order is not a mismatch
    for bad in (np.int32, np.float32):
        with pytest.raises(CalibrationError, match=r"'ids': expected dtype int64, got"):
            load_calibration(np.zeros((2, 4), bad), ispec)


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_inf_named_with_sample_index(value, word):
    x = _data(10)
    x[6, 1, 2, 3] = value
    with pytest.raises(CalibrationError, match=rf"'input': sample 6 contains {word}"):
        load_calibration(x, SPEC)
    with pytest.raises(CalibrationError, match=rf"'input': sample 6 contains {word}.*get_next\(\) call 3"):
        load_calibration(ListReader(_chunks(x, (3, 3, 4))), SPEC)


def test_nan_found_in_a_later_chunk_of_a_memory_mapped_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 3 * 8 * 8 * 4 * 2)  # 2 samples per chunk
    x = _data(9)
    x[7, 0, 0, 0] = np.nan
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(CalibrationError, match="sample 7 contains NaN"):
        load_calibration(tmp_path / "a.npy", SPEC)


def test_overflow_on_cast_reported_as_inf():
    x = np.zeros((2, 3, 8, 8))
    x[1, 0, 0, 0] = 1e300
    with pytest.raises(CalibrationError, match=r"sample 1 contains Inf after conversion from float64 to float32"):
        load_calibration(x, SPEC)


def test_zero_samples(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="no samples"):
        load_calibration(tmp_path / "e.npy", SPEC)
    with pytest.raises(CalibrationError, match="no samples"):
        load_calibration(ListReader([]), SPEC)
    with pytest.raises(CalibrationError, match="no samples"):
        load_calibration(ListReader([{"input": np.zeros((0, 3, 8, 8), np.float32)}]), SPEC)


def test_npz_missing_and_extra_keys(tmp_path):
    specs = [InputSpec("a", np.float32, (None, 2)), InputSpec("b", np.float32, (None, 2))]
    z = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "m.npz", a=z)
    with pytest.raises(CalibrationError, match=r"missing arrays for inputs 'b'; the model's inputs are 'a', 'b' "
                                               r"\(expected exactly those keys"):
        load_calibration(tmp_path / "m.npz", specs)
    np.savez(tmp_path / "x.npz", a=z, b=z, c=z)
    with pytest.raises(CalibrationError, match=r"unexpected keys 'c'; the model's inputs are 'a', 'b'"):
        load_calibration(tmp_path / "x.npz", specs)
    np.savez(tmp_path / "s.npz", input=_data(2), other=_data(2))  # single input, two arrays
    with pytest.raises(CalibrationError, match=r"unexpected keys 'other'; the model's input is 'input' "
                                               r"\(expected that key, or one array under any key\)"):
        load_calibration(tmp_path / "s.npz", SPEC)
    np.savez(tmp_path / "n.npz", a=z, b=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationError, match=r"different numbers of samples: 'a' has 3, 'b' has 4"):
        load_calibration(tmp_path / "n.npz", specs)


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2), np.float32))
    specs = [InputSpec("a", np.float32, (None, 2)), InputSpec("b", np.float32, (None, 2))]
    with pytest.raises(CalibrationError, match=r"model has 2 inputs \('a', 'b'\)"):
        load_calibration(tmp_path / "a.npy", specs)


def test_bad_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found: .*nope.npy"):
        load_calibration(tmp_path / "nope.npy", SPEC)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(CalibrationError, match=r"t.txt is not a .npy file, a .npz file or a folder"):
        load_calibration(tmp_path / "t.txt", SPEC)
    (tmp_path / "r.npy").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(CalibrationError, match=r"r.npy is not a valid .npy file"):
        load_calibration(tmp_path / "r.npy", SPEC)
    # valid header, truncated body
    np.save(tmp_path / "cut.npy", _data(4))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CalibrationError, match=r"cannot read .npy file .*cut.npy"):
        load_calibration(tmp_path / "cut.npy", SPEC)
    for compress in (np.savez, np.savez_compressed):
        compress(tmp_path / "z.npz", input=_data(4))
        raw = (tmp_path / "z.npz").read_bytes()
        (tmp_path / "z.npz").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(CalibrationError, match=r"cannot read .npz file .*z.npz"):
            load_calibration(tmp_path / "z.npz", SPEC)
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as zf:
        zf.writestr("notes.txt", "hi")
    with pytest.raises(CalibrationError, match=r"cannot read .npz file .*'notes.txt' is not a .npy"):
        load_calibration(tmp_path / "o.npz", SPEC)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(CalibrationError, match="holds no arrays"):
        load_calibration(tmp_path / "empty.npz", SPEC)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError, match="cannot read .npy file"):
        load_calibration(tmp_path / "obj.npy", SPEC)


def test_bad_arguments():
    with pytest.raises(OptionError):
        load_calibration(42, SPEC)
    with pytest.raises(OptionError):
        load_calibration(_data(2), [])
    with pytest.raises(OptionError, match="duplicate"):
        load_calibration(_data(2), SPEC + SPEC)
    with pytest.raises(OptionError):
        InputSpec("x", np.float32, (None, -1))
    with pytest.raises(OptionError):
        InputSpec("x", "not-a-dtype", (None,))
    assert InputSpec("x", "float32", [None, np.int64(3)]) == InputSpec("x", np.dtype(np.float32), (None, 3))


# --------------------------------------------------------------------------- readers


def test_reader_exception_is_wrapped_and_chained():
    class Boom:
        def get_next(self):
            raise RuntimeError("disk\ngone")

    with pytest.raises(CalibrationError) as e:
        load_calibration(Boom(), SPEC)
    assert str(e.value) == "calibration reader raised RuntimeError: disk gone"
    assert isinstance(e.value.__cause__, RuntimeError)

    class BadRewind(ListReader):
        def rewind(self):
            raise RuntimeError("no")

    with pytest.raises(CalibrationError, match="calibration reader raised RuntimeError: no"):
        load_calibration(BadRewind([{"input": _data(1)}]), SPEC)


def test_reader_returning_non_dict_or_missing_inputs():
    with pytest.raises(CalibrationError, match=r"returned a list, expected a dict .*'input'"):
        load_calibration(ListReader([[_data(2)]]), SPEC)
    with pytest.raises(CalibrationError, match=r"missing inputs 'input'"):
        load_calibration(ListReader([{"x": _data(2)}]), SPEC)


def test_reader_without_rewind_is_cached_and_read_once():
    x = _data(10)
    r = ListReader(_chunks(x))
    cd = load_calibration(r, SPEC)
    calls = r.calls
    for _ in range(3):
        np.testing.assert_array_equal(_all(cd, 3), x)
    assert r.calls == calls


def test_reader_copies_feeds_it_is_given():
    buf = _data(2)
    r = ListReader([{"input": buf}])
    cd = load_calibration(r, SPEC)
    buf[:] = 0  # a reader reusing its buffer must not change cached data
    assert np.abs(_all(cd)).sum() > 0


def test_reader_that_shrinks_on_a_later_pass():
    x = _data(6)
    r = RewindReader(_chunks(x, (3, 3)))
    cd = load_calibration(r, SPEC)
    r.feeds = r.feeds[:1]
    with pytest.raises(CalibrationError, match="returned 3 samples on this pass but 6 on the first"):
        list(cd.iter_batches(2))


def test_reader_changing_sample_shape_between_feeds():
    spec = [InputSpec("input", np.float32, (None, 3, None, None))]
    feeds = [{"input": np.zeros((2, 3, 4, 4), np.float32)}, {"input": np.zeros((2, 3, 5, 5), np.float32)}]
    with pytest.raises(CalibrationError, match=r"per-sample shape \(3, 5, 5\) differs .* \(3, 4, 4\)"):
        load_calibration(ListReader(feeds), spec)


def test_reader_wrong_shape_and_counts():
    with pytest.raises(CalibrationError, match=r"expected shape \(N, 3, 8, 8\), got \(2, 3, 4, 4\)"):
        load_calibration(ListReader([{"input": np.zeros((2, 3, 4, 4), np.float32)}]), SPEC)
    specs = [InputSpec("a", np.float32, (None, 2)), InputSpec("b", np.float32, (None, 2))]
    feed = {"a": np.zeros((2, 2), np.float32), "b": np.zeros((3, 2), np.float32)}
    with pytest.raises(CalibrationError, match="different numbers of samples"):
        load_calibration(ListReader([feed]), specs)


# --------------------------------------------------------------------------- load_reader

READER_SRC = """
import numpy as np

class Reader:
    def __init__(self):
        self.i = 0
    def get_next(self):
        self.i += 1
        return {"input": np.ones((2, 3, 8, 8), np.float32)} if self.i <= 2 else None

def make():
    return Reader()

def broken():
    raise ValueError("bad config")

def nothing():
    return 3

NOT_CALLABLE = 5
"""


def test_load_reader_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_calib_reader_mod.py").write_text(READER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_reader("my_calib_reader_mod:make")
    assert load_calibration(r, SPEC).num_samples == 4
    r = load_reader(f"{tmp_path / 'my_calib_reader_mod.py'}:Reader")
    assert load_calibration(r, SPEC).num_samples == 4
    monkeypatch.delitem(sys.modules, "my_calib_reader_mod", raising=False)


def test_load_reader_errors(tmp_path, monkeypatch):
    path = tmp_path / "rdr.py"
    path.write_text(READER_SRC)
    (tmp_path / "crash.py").write_text("raise ImportError('needs torch')\n")
    for spec in ("no_colon", ":make", f"{path}:", "surely_not_a_module_xyz:make", f"{tmp_path}/nope.py:make",
                 f"{path}:missing", f"{path}:NOT_CALLABLE"):
        with pytest.raises(OptionError):
            load_reader(spec)
    with pytest.raises(CalibrationError, match="calibration reader raised ValueError: bad config"):
        load_reader(f"{path}:broken")
    with pytest.raises(CalibrationError, match="no get_next"):
        load_reader(f"{path}:nothing")
    with pytest.raises(CalibrationError, match="ImportError: needs torch"):
        load_reader(f"{tmp_path / 'crash.py'}:make")


# --------------------------------------------------------------------------- image folders

ISPEC = [InputSpec("input", np.float32, (1, 3, 20, 20))]
NO_NORM = dict(mean=(0, 0, 0), std=(1, 1, 1))


def _stripes(path: Path, w: int, h: int) -> None:
    """Red | green | blue vertical stripes, green in the middle half."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4, 0] = 255
    a[:, w // 4 : w - w // 4, 1] = 255
    a[:, w - w // 4 :, 2] = 255
    Image.fromarray(a).save(path)


def test_image_folder_shape_range_and_determinism(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(32, 24), (20, 40), (50, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "z.JPG", quality=90)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    cd = load_calibration(tmp_path, ISPEC)
    assert cd.num_samples == 4 and cd.sample_shapes == {"input": (3, 20, 20)}
    b = list(cd.iter_batches(3))
    assert [x.feeds["input"].shape for x in b] == [(3, 3, 20, 20), (1, 3, 20, 20)]
    assert b[0].feeds["input"].dtype == np.float32
    x = _all(cd, 3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    lo, hi = (-mean / std)[None, :, None, None], ((1 - mean) / std)[None, :, None, None]
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()
    np.testing.assert_array_equal(_all(load_calibration(tmp_path, ISPEC), 1), x)  # deterministic
    raw = _all(load_calibration(tmp_path, ISPEC, **NO_NORM))
    assert raw.min() >= 0 and raw.max() <= 1 and raw.max() > 0.9
    assert load_calibration(tmp_path, ISPEC, calib_size=2).num_samples == 2


def test_image_folder_sorted_by_name(tmp_path):
    for name, v in (("b.png", 200), ("a.png", 100), ("c.jpeg", 50)):
        Image.fromarray(np.full((20, 20, 3), v, np.uint8)).save(tmp_path / name)
    x = _all(load_calibration(tmp_path, ISPEC, **NO_NORM))
    np.testing.assert_allclose(x[:, 0, 10, 10], [100 / 255, 200 / 255, 50 / 255], atol=2 / 255)


@pytest.mark.parametrize("w,h", [(60, 20), (80, 40), (40, 80)])
def test_center_crop_picks_the_center(tmp_path, w, h):
    if h > w:
        a = np.zeros((h, w, 3), np.uint8)  # horizontal stripes: green in the middle half
        a[: h // 4, :, 0] = 255
        a[h // 4 : h - h // 4, :, 1] = 255
        a[h - h // 4 :, :, 2] = 255
        Image.fromarray(a).save(tmp_path / "s.png")
    else:
        _stripes(tmp_path / "s.png", w, h)
    x = _all(load_calibration(tmp_path, ISPEC, **NO_NORM))[0]
    inner = x[:, 2:-2, 2:-2] if h > w else x[:, :, 2:-2]
    np.testing.assert_allclose(inner[1], 1.0, atol=1e-6)
    np.testing.assert_allclose(inner[[0, 2]], 0.0, atol=1e-6)


def test_image_folder_grayscale_and_float16(tmp_path):
    Image.fromarray(np.full((25, 30, 3), 51, np.uint8)).save(tmp_path / "a.png")
    spec = [InputSpec("input", np.float32, (None, 1, 20, 20))]
    x = _all(load_calibration(tmp_path, spec, mean=(0.1,), std=(0.5,)))
    assert x.shape == (1, 1, 20, 20)
    np.testing.assert_allclose(x, (0.2 - 0.1) / 0.5, atol=1e-5)
    with pytest.raises(OptionError, match="mean must have 1 value"):
        load_calibration(tmp_path, spec)  # default 3-value mean
    spec16 = [InputSpec("input", np.float16, (None, 3, 20, 20))]
    assert next(load_calibration(tmp_path, spec16).iter_batches(1)).feeds["input"].dtype == np.float16


def test_image_folder_errors(tmp_path, monkeypatch):
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(CalibrationError, match="contains no .jpg/.jpeg/.png"):
        load_calibration(tmp_path, ISPEC)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(CalibrationError, match="--input-shape"):
        load_calibration(tmp_path, [InputSpec("input", np.float32, (None, 3, None, None))])
    with pytest.raises(CalibrationError, match="single-input"):
        load_calibration(tmp_path, ISPEC + [InputSpec("b", np.float32, (None, 2))])
    with pytest.raises(CalibrationError, match="rank 4"):
        load_calibration(tmp_path, [InputSpec("input", np.float32, (None, 3, 20))])
    with pytest.raises(CalibrationError, match="float input"):
        load_calibration(tmp_path, [InputSpec("input", np.uint8, (None, 3, 20, 20))])
    with pytest.raises(CalibrationError, match="4 channels"):
        load_calibration(tmp_path, [InputSpec("input", np.float32, (None, 4, 20, 20))])
    with pytest.raises(OptionError, match="mean must have 3"):
        load_calibration(tmp_path, ISPEC, mean=(0.5, 0.5))
    with pytest.raises(OptionError, match="std must not contain 0"):
        load_calibration(tmp_path, ISPEC, std=(1, 0, 1))
    with pytest.raises(OptionError, match="mean must be a list of numbers"):
        load_calibration(tmp_path, ISPEC, mean=("a", "b", "c"))
    (tmp_path / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    with pytest.raises(CalibrationError, match=r"cannot read image .*zz_bad.jpg"):
        load_calibration(tmp_path, ISPEC)
    (tmp_path / "zz_bad.jpg").unlink()
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(CalibrationError) as e:
        load_calibration(tmp_path, ISPEC)
    assert str(e.value) == "reading an image folder needs Pillow: pip install 'onnx-dwdecomp[images]'"


def test_truncated_image_detected_before_iteration(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "a.jpg")
    raw = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CalibrationError, match=r"cannot read image .*a.jpg"):
        load_calibration(tmp_path, ISPEC)


# --------------------------------------------------------------------------- fuzz

_DTYPES = [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["bytes", "npy", "npz", "reader", "image"]),
    payload=st.binary(max_size=300),
    data_shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    spec_shape=st.lists(st.one_of(st.none(), st.integers(0, 4)), min_size=1, max_size=4),
    data_dtype=st.sampled_from(_DTYPES),
    spec_dtype=st.sampled_from(_DTYPES),
    suffix=st.sampled_from([".npy", ".npz", ".bin", ".png"]),
    specials=st.sampled_from([None, np.nan, np.inf, 1e300]),
    calib_size=st.one_of(st.none(), st.integers(-1, 5)),
    batch_size=st.integers(1, 4),
    match=st.booleans(),
)
def test_fuzz_only_user_errors_or_success(
    kind, payload, data_shape, spec_shape, data_dtype, spec_dtype, suffix, specials, calib_size, batch_size, match
):
    rng = np.random.default_rng(len(payload))
    if match:  # make success likely: the spec follows the data, some dims dynamic
        data_shape = [max(d, 1) for d in data_shape] or [3]
        spec_shape = [None if i == 0 or d % 2 else d for i, d in enumerate(data_shape)]
        spec_dtype = data_dtype
        if kind == "image":
            spec_shape, spec_dtype = [None, 3, 4, 4], np.float32
    arr = (rng.standard_normal(data_shape) * 3).astype(data_dtype)
    if specials is not None and arr.size and arr.dtype.kind == "f":
        with np.errstate(over="ignore"):
            arr.flat[rng.integers(arr.size)] = specials
    spec = [InputSpec("x", spec_dtype, tuple(spec_shape))]
    ok_image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if kind == "bytes":
            (d / f"f{suffix}").write_bytes(payload)
            source = d / f"f{suffix}"
        elif kind == "npy":
            np.save(d / "f.npy", arr)
            source = d / "f.npy"
        elif kind == "npz":
            np.savez(d / "f.npz", **{"x" if payload[:1] != b"a" else "y": arr})
            source = d / "f.npz"
        elif kind == "image":
            if not match:
                (d / "a.png").write_bytes(payload)
            Image.fromarray(ok_image).save(d / "b.png")
            source = d
        else:
            source = ListReader([{"x": arr}, {"x": arr}] if len(payload) % 2 else [arr, None])
        try:
            cd = load_calibration(source, spec, calib_size=calib_size)
        except (CalibrationError, OptionError) as e:
            assert "\n" not in str(e)
            return
        rows = 0
        for b in cd.iter_batches(batch_size, pad_to=batch_size):
            assert b.start == rows and 1 <= b.count <= batch_size
            feed = b.feeds["x"]
            assert feed.shape == (batch_size, *cd.sample_shapes["x"]) and feed.dtype == spec[0].dtype
            if feed.dtype.kind == "f":
                assert np.isfinite(feed).all()
            rows += b.count
        assert rows == cd.num_samples >= 1


# ---- issue 15: declared sizes checked before allocating, values within float32 statistics, odd folder entries


def test_compressed_npz_reads_only_the_rows_it_needs(tmp_path, monkeypatch):
    x = _data(4000)  # 3 MiB once decompressed
    np.savez_compressed(tmp_path / "c.npz", input=x)
    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "1M")
    from onnx_dwdecomp.errors import ResourceError
    with pytest.raises(ResourceError, match=r"decompressing 4000 sample\(s\) of 'input' \(4000, 3, 8, 8\)"
                                            r".*--calib-size"):
        load_calibration(tmp_path / "c.npz", SPEC, calib_size=4000)
    data = load_calibration(tmp_path / "c.npz", SPEC, calib_size=10)  # 7.5 KiB
    assert data.num_samples == 10
    np.testing.assert_array_equal(next(data.iter_batches(10)).feeds["input"], x[:10])


def test_compressed_npz_layout_is_checked_before_its_size(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "c.npz", input=np.zeros((4000, 5, 8, 8), np.float32))
    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "1M")
    with pytest.raises(CalibrationError, match="expected shape"):
        load_calibration(tmp_path / "c.npz", SPEC)


def test_values_beyond_float32_statistics_are_refused():
    x = _data(6)
    x[4, 0, 0, 0] = 1e20
    with pytest.raises(CalibrationError, match="sample 4 holds values up to 1e\\+20.*rescale"):
        load_calibration(x, SPEC)
    x[4, 0, 0, 0] = 1e18  # squares still fit float32
    assert load_calibration(x, SPEC).num_samples == 6


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero and symlinks")
@pytest.mark.parametrize("target, needle", [("/dev/zero", "character device"), ("missing.png", "dangling")])
def test_image_folder_entry_that_is_not_an_image_file_is_an_error(tmp_path, target, needle):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (d / "sub.png").mkdir()  # a folder is not searched, as before
    (d / "b.png").symlink_to(target if target.startswith("/") else d / target)
    with pytest.raises(CalibrationError, match=f"b.png is .*{needle}"):
        load_calibration(d, SPEC)
    (d / "b.png").unlink()
    assert load_calibration(d, SPEC).num_samples == 1


def test_reader_without_rewind_is_cached_within_the_memory(monkeypatch):
    from onnx_dwdecomp.errors import ResourceError
    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "64K")
    feeds = [{"input": _data(8, seed=k)} for k in range(8)]  # 6 KiB each
    with pytest.raises(ResourceError, match="--calib-size"):
        load_calibration(ListReader(feeds), SPEC)
    assert load_calibration(ListReader(feeds), SPEC, calib_size=16).num_samples == 16


# ---- .npz keys are the model's input names; one stated exception, with a note


def test_npz_keys_that_name_no_input_are_an_error_naming_inputs_and_keys(tmp_path):
    """Keys matching no input name are not fed to some input by position: one line naming the
    model's inputs and the keys that match none."""
    specs = [InputSpec("images", np.float32, (None, 2)), InputSpec("scale", np.float32, (None, 2))]
    z = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "c.npz", image=z, scales=z)  # near misses of both names
    with pytest.raises(CalibrationError) as e:
        load_calibration(tmp_path / "c.npz", specs)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "c.npz") in msg
    assert "missing arrays for inputs 'images', 'scale'" in msg and "unexpected keys 'image', 'scales'" in msg
    assert "the model's inputs are 'images', 'scale'" in msg
    with pytest.raises(CalibrationError, match=r"unexpected keys 'extra'"):  # dicts follow the same rule
        load_calibration({"images": z, "scale": z, "extra": z}, specs)
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(CalibrationError, match=r"holds no arrays; the model's input is 'input'"):
        load_calibration(tmp_path / "empty.npz", SPEC)


def test_single_array_npz_feeds_a_single_input_model_with_a_note(tmp_path):
    x = _data(4)
    np.savez(tmp_path / "any.npz", whatever=x)
    cd = load_calibration(tmp_path / "any.npz", SPEC)
    np.testing.assert_array_equal(_all(cd), x)
    assert [n for n in cd.notes if "'whatever'" in n] == [
        f"calibration data in {tmp_path / 'any.npz'}: its only array, 'whatever', feeds the model's only input "
        f"'input' (a single array feeds a single-input model whatever its key)"]
    np.savez(tmp_path / "named.npz", input=x)
    assert not [n for n in load_calibration(tmp_path / "named.npz", SPEC).notes if "only array" in n]


def test_shipped_calibration_sets_match_their_models_input_names():
    """models/mnist/calib.npz is keyed by its models' input name (no reliance on the single-array rule)."""
    import onnx

    from onnx_dwdecomp.shapes import graph_inputs

    root = Path(__file__).parent.parent / "models"
    for calib, model in [(root / "mnist/calib.npz", root / "mnist/shufflenetv2_x0.5_regular.onnx"),
                         (root / "mnist/calib.npz", root / "mnist/shufflenetv2_x0.5.onnx")]:
        names = [s.name for s in graph_inputs(onnx.load(str(model), load_external_data=False))]
        with np.load(calib) as z:
            assert sorted(z.files) == sorted(names), (calib, model)
        cd = load_calibration(calib, graph_inputs(onnx.load(str(model))), calib_size=2)
        assert cd.num_samples == 2 and not [n for n in cd.notes if "only array" in n]
