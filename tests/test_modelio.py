"""Model I/O: external data in and out, atomic writes, input never modified."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import ModelError
from onnx_dwdecomp.modelio import load_model, save_model_atomic
from onnx_dwdecomp.zoo import shufflenet_v2


def _save_external(model, path):
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def test_external_data_input_gives_external_data_output(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    _save_external(shufflenet_v2(0.5, "merged", num_classes=10, image_size=32), src)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "out.onnx"
    for _ in range(2):  # the second run overwrites an existing output and data file
        assert main([str(src), "-o", str(out), "--quiet"]) == 0
    assert (tmp_path / "out.onnx.data").stat().st_size > out.stat().st_size
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data", "out.onnx",
                                                          "out.onnx.data"]  # no temp leftovers
    onnx.checker.check_model(str(out), full_check=True)
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (1, 10)


def test_missing_external_data_is_a_model_error(tmp_path):
    src = tmp_path / "net.onnx"
    _save_external(shufflenet_v2(0.5, "merged", num_classes=10, image_size=32), src)
    os.remove(tmp_path / "net.onnx.data")
    with pytest.raises(ModelError, match="external data"):
        load_model(src)


def test_save_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "net.onnx"
    onnx.save(shufflenet_v2(0.5, "merged", num_classes=10, image_size=32), str(src))
    loaded = load_model(src)
    with pytest.raises(Exception, match="input file"):
        save_model_atomic(loaded.model, src, external_data=False, input_path=src)


def test_large_data_stash_round_trip(monkeypatch):
    """Initializers of ≥ limit/2 bytes become stubs and come back byte-identical; the input is untouched."""
    from onnx_dwdecomp import modelio
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 1 << 12)  # stub tensors of ≥ 2 KiB
    rng = np.random.default_rng(0)
    big = onnx.numpy_helper.from_array(rng.standard_normal(1024).astype(np.float32), "big")  # 4 KiB
    small = onnx.numpy_helper.from_array(np.ones(4, np.float32), "small")
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[big, small])
    model = onnx.helper.make_model(graph)
    before = model.SerializeToString()
    light, stash = modelio.without_large_data(model)
    assert set(stash) == {"big"} and model.SerializeToString() == before
    stubs = {t.name: t for t in light.graph.initializer}
    assert not stubs["big"].raw_data and stubs["big"].data_location == onnx.TensorProto.EXTERNAL
    assert stubs["small"].raw_data == small.raw_data
    restored = modelio.restore_large_data(light, stash)
    assert restored.SerializeToString() == before
    small_only = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[small]))
    assert modelio.without_large_data(small_only) == (small_only, {})  # nothing to stash: no copy


# ---- issue 15: destinations tried up front, model and report together or not at all, umask modes


def _small():
    return shufflenet_v2(0.5, "merged", num_classes=10, image_size=32)


def test_destination_that_takes_no_file_is_refused_up_front(tmp_path):
    from onnx_dwdecomp.errors import OutputError
    from onnx_dwdecomp.modelio import check_writable

    check_writable(tmp_path / "out.onnx", "OUTPUT")
    assert os.listdir(tmp_path) == []  # the probe file is gone
    if os.path.isdir("/proc/self"):
        with pytest.raises(OutputError, match="cannot create files in /proc"):
            check_writable(__import__("pathlib").Path("/proc/out.onnx"), "OUTPUT")
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="Permission denied"):
                check_writable(ro / "out.onnx", "--report")
        finally:
            ro.chmod(0o700)


def test_commit_together_puts_everything_back_when_one_move_fails(tmp_path, monkeypatch):
    from onnx_dwdecomp import modelio
    from onnx_dwdecomp.errors import OutputError

    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    out.write_bytes(b"previous model")
    staged = [modelio.stage_model(_small(), out, external_data=False), modelio.stage_text(report, "{}")]
    real_replace = os.replace

    def failing(src, dst):
        if str(dst) == str(report):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(modelio.os, "replace", failing)
    with pytest.raises(OutputError, match="No space left on device; nothing written"):
        modelio.commit_together(staged)
    assert out.read_bytes() == b"previous model" and not report.exists()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no staging folder left


def test_written_files_follow_the_umask(tmp_path):
    from onnx_dwdecomp import modelio

    old = os.umask(0o027)
    try:
        modelio.commit_together([modelio.stage_model(_small(), tmp_path / "m.onnx", external_data=True),
                                 modelio.stage_text(tmp_path / "r.json", "{}")])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"m.onnx": 0o640, "m.onnx.data": 0o640, "r.json": 0o640}


def test_unknown_opset_is_one_readable_line(tmp_path):
    model = _small()
    model.opset_import[0].version = 99
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match="imports opset 99") as e:
        load_model(tmp_path / "m.onnx")
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_external_data_only_when_a_tensor_reaches_the_threshold(tmp_path):
    """No empty OUTPUT.data beside a model whose tensors are all small (inline is enough)."""
    from conftest import conv_model

    out = tmp_path / "small.onnx"
    save_model_atomic(conv_model(np.ones((4, 2, 3, 3), np.float32)), out, external_data=True)  # 288 bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]
    assert onnx.load(str(out)).graph.initializer  # weights inline


def test_write_text_atomic_keeps_a_given_mode(tmp_path):
    from onnx_dwdecomp.modelio import write_text_atomic

    path = tmp_path / "t.json"
    write_text_atomic(path, "{}", mode=0o640)
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no staging leftovers


def test_an_old_data_file_the_new_output_no_longer_reads_is_removed(tmp_path):
    """Rewriting OUTPUT without external data used to leave the previous run's OUTPUT.data
    beside it (stale weights for anyone shipping both); a .data file another model reads stays."""
    from conftest import conv_model

    out, data = tmp_path / "o.onnx", tmp_path / "o.onnx.data"
    save_model_atomic(_small(), out, external_data=True)
    assert data.stat().st_size > 0
    save_model_atomic(conv_model(np.ones((4, 2, 3, 3), np.float32)), out, external_data=True)
    assert not data.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    data.write_bytes(b"someone else's")  # not read by the current o.onnx: left alone
    save_model_atomic(conv_model(np.ones((4, 2, 3, 3), np.float32)), out, external_data=False)
    assert data.read_bytes() == b"someone else's"
