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


# ---- real exports whose nodes are not in topological order (onnxruntime runs them)


def _chain_with_subgraph():
    """x → Conv 3×3 → Relu → If(cond: branch reads Relu's output from the outer scope) → Add → y.
    Every node's position matters: the If waits for the value its branches read."""
    from onnx import TensorProto, helper, numpy_helper

    from conftest import separable_weight

    weight = separable_weight(6, 4, 3, 3, rank=1)
    then_g = helper.make_graph([helper.make_node("Neg", ["r"], ["t_out"], name="then_neg")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["r"], ["e_out"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["branch", "c"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        initializer=[numpy_helper.from_array(weight, "W")],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 6, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="origin", value="test")
    return model


def _reordered(model, order):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = [onnx.NodeProto() for _ in order]
    for node, i in zip(nodes, order):
        node.CopyFrom(model.graph.node[i])
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def test_unsorted_nodes_are_sorted_on_load_and_compute_the_same(tmp_path):
    from conftest import run_model

    from onnx_dwdecomp.pipeline import decompose

    model = _chain_with_subgraph()
    onnx.checker.check_model(model, full_check=True)
    shuffled = _reordered(model, [3, 2, 1, 0])  # Add, If, Relu, Conv: every edge backwards
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(shuffled, full_check=True)
    src = tmp_path / "shuffled.onnx"
    onnx.save(shuffled, str(src))
    before = src.read_bytes()

    loaded = load_model(src)
    assert [n.name for n in loaded.model.graph.node] == ["conv", "relu", "if", "add"]  # If after relu
    onnx.checker.check_model(loaded.model, full_check=True)
    assert len(loaded.notes) == 1 and "not in topological order" in loaded.notes[0]
    assert "4 of 6 node(s) moved" in loaded.notes[0]  # 4 main-graph nodes, 2 in the branches
    # nothing but the node order changed
    assert loaded.model.graph.initializer[0] == model.graph.initializer[0]
    assert list(loaded.model.graph.value_info) == list(model.graph.value_info)
    assert list(loaded.model.metadata_props) == list(model.metadata_props)
    assert loaded.model.opset_import == model.opset_import and loaded.model.ir_version == 8
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        ref, got = run_model(model, feeds)[0], run_model(loaded.model, feeds)[0]
        np.testing.assert_array_equal(got, ref)  # same ops, same order of evaluation per value
        assert np.abs(ref).max() > 0

    out, report = decompose(src, multiplier=1, select="all")
    onnx.checker.check_model(out, full_check=True)
    assert [layer.name for layer in report.layers] == ["conv"]
    feeds = {"x": x, "cond": np.array(False)}
    np.testing.assert_allclose(run_model(out, feeds)[0], run_model(model, feeds)[0], rtol=1e-4, atol=1e-4)
    assert src.read_bytes() == before  # the input file is never modified


def test_sorted_graph_loads_unchanged_and_the_sort_is_stable():
    from onnx_dwdecomp.modelio import toposort_graph

    model = _chain_with_subgraph()
    loaded = load_model(model)
    assert loaded.notes == () and loaded.model.SerializeToString() == model.SerializeToString()
    # two independent chains interleaved, one node out of place: only the nodes that must move do;
    # the rest keep the file's order
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Neg", ["a1"], ["a2"], name="a2"),   # needs a1, listed first
             helper.make_node("Relu", ["x"], ["b1"], name="b1"),
             helper.make_node("Relu", ["x"], ["a1"], name="a1"),
             helper.make_node("Neg", ["b1"], ["b2"], name="b2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a2", "b2")])
    assert toposort_graph(graph) == 3
    assert [n.name for n in graph.node] == ["b1", "a1", "a2", "b2"]
    assert toposort_graph(graph) == 0  # already sorted: untouched


def test_a_cycle_is_left_to_the_checker(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), str(tmp_path / "cycle.onnx"))
    with pytest.raises(ModelError, match="fails the ONNX checker: Nodes in a graph must be topologically sorted"):
        load_model(tmp_path / "cycle.onnx")


def test_checker_message_keeps_its_sentence_whole(tmp_path, capsys):
    """The checker's message runs over lines ("…however input 'x' of node:", the node, "is not
    output of any previous nodes."); the error shows the sentence whole, on one line."""
    from onnx import TensorProto, helper

    name = "/backbone/stage4/block17/attention/" + "very_long_exporter_generated_segment/" * 3 + "Relu"
    nodes = [helper.make_node("Relu", ["never_produced"], ["y"], name=name)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    src = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph), str(src))
    with pytest.raises(ModelError) as e:
        load_model(src)
    text = str(e.value)
    assert "\n" not in text and len(text) <= 400
    assert text.endswith(f"input 'never_produced' of node: name: {name} OpType: Relu is not output of any "
                         f"previous nodes.")
    assert main([str(src), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {text}"  # one line, not cut again by the CLI


def test_whole_sentences_cuts_only_between_sentences():
    from onnx_dwdecomp.modelio import whole_sentences

    first = "The first sentence names input 'a' of node: name: n OpType: Conv and says why."
    second = "The second one adds detail, more detail, and still more detail."
    text = f"{first}\n{second} " + "Third sentence. " * 20
    cut = whole_sentences(text, len(first) + len(second) + 10)
    assert cut == f"{first} {second} …"
    assert whole_sentences(text, len(first) + 5) == f"{first} …"
    assert whole_sentences(first, 200) == first  # fits: as it is
    # a first sentence that cannot fit is cut after a clause, never mid-word
    long_one = "Input " + ", ".join(f"tensor_{i}" for i in range(60)) + " are missing."
    short = whole_sentences(long_one, 80)
    assert short == "Input tensor_0, tensor_1, tensor_2, tensor_3, tensor_4, tensor_5, tensor_6, …"
    assert whole_sentences("x" * 100 + " yy", 60) == "x" * 58 + " …"  # no boundary at all: cut at the limit


def test_cli_runs_a_shuffled_real_export(tmp_path, capsys):
    """The MNIST ShuffleNet with its 883 nodes reversed (every edge backwards) goes through the CLI."""
    from pathlib import Path

    model = onnx.load(str(Path(__file__).parent.parent / "models/mnist/shufflenetv2_x0.5_regular.onnx"))
    shuffled = _reordered(model, list(range(len(model.graph.node)))[::-1])
    src = tmp_path / "shuffled.onnx"
    onnx.save(shuffled, str(src))
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    assert main([str(src), "-o", str(out), "--multiplier", "1", "--select", "all", "--quiet"]) == 0
    assert src.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, np.float32)
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()
