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
