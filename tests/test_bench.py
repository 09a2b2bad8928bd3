"""Tests of onnx_dwdecomp.bench: results, flags, JSON (tiny models, few runs)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.bench import ModelBench, _make_inputs, format_table, run_bench, run_bench_command
from onnx_dwdecomp.cli import parse_args
from onnx_dwdecomp.errors import ModelError, OptionError, UserError

FAST = dict(runs=3, warmup=1, threads=1)


def bench_main(argv: list[str]) -> int:
    """``onnx-dwdecomp bench ARGV`` with its errors raised (cli.main would print them)."""
    return run_bench_command(parse_args(["bench", *argv]))


def _conv_net(separable: bool = False, batch="N", spatial=(8, 8), seed: int = 0) -> onnx.ModelProto:
    """x[batch,3,H,W] -> Conv 3->8 3x3 p1 (+bias) -> Relu -> Conv 8->4 3x3 p1 (+bias) -> y.

    ``separable``: the second conv is depthwise 3x3 (group 8, no bias) + pointwise 1x1 8->4.
    """
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1")]
    if separable:
        inits += [init("wd", 8, 1, 3, 3), init("wp", 4, 8, 1, 1), init("bp", 4)]
        nodes += [helper.make_node("Conv", ["r1", "wd"], ["d"], name="conv2_dw", pads=[1, 1, 1, 1], group=8),
                  helper.make_node("Conv", ["d", "wp", "bp"], ["y"], name="conv2_pw")]
    else:
        inits += [init("w2", 4, 8, 3, 3), init("b2", 4)]
        nodes += [helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    h, w = spatial
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, h, w])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# Per sample at 8x8: conv1 8*8*8 outputs * 3*3*3 taps; conv2 4*8*8 * 8*3*3.
REGULAR_MACS = 8 * 8 * 8 * 27 + 4 * 8 * 8 * 72          # 13824 + 18432 = 32256
SEPARABLE_MACS = 8 * 8 * 8 * 27 + 8 * 8 * 8 * 9 + 4 * 8 * 8 * 8   # 13824 + 4608 + 2048
REGULAR_PARAMS = 8 * 27 + 8 + 4 * 72 + 4                  # 516
SEPARABLE_PARAMS = 8 * 27 + 8 + 8 * 9 + 4 * 8 + 4         # 332


@pytest.fixture
def models(tmp_path):
    a, b = tmp_path / "regular.onnx", tmp_path / "separable.onnx"
    onnx.save(_conv_net(False), str(a))
    onnx.save(_conv_net(True), str(b))
    return a, b


def test_run_bench_rows_macs_params_size(models):
    a, b = models
    messages = []
    rows = run_bench([a, b], progress=messages.append, **FAST)
    assert [(r.path, r.batch_size) for r in rows] == [(a, 1), (b, 1)]
    ra, rb = rows
    assert ra.macs == REGULAR_MACS and rb.macs == SEPARABLE_MACS
    assert ra.params == REGULAR_PARAMS and rb.params == SEPARABLE_PARAMS
    assert ra.file_size == a.stat().st_size and rb.file_size == b.stat().st_size
    assert ra.speedup == 1.0
    assert rb.speedup == pytest.approx(ra.median_ms / rb.median_ms)
    for r in rows:
        assert 0 < r.median_ms <= r.p90_ms
        assert len(r.times_ms) == FAST["runs"]
    assert "bench: batch 1, round 3/3" in messages


def test_dynamic_batch_1_and_4(models):
    a, b = models
    rows = run_bench([a, b], batch_sizes=(1, 4), **FAST)
    assert [(r.path.name, r.batch_size) for r in rows] == [
        ("regular.onnx", 1), ("separable.onnx", 1), ("regular.onnx", 4), ("separable.onnx", 4)]
    assert rows[2].macs == 4 * REGULAR_MACS and rows[3].macs == 4 * SEPARABLE_MACS
    assert rows[0].speedup == 1.0 and rows[2].speedup == 1.0
    assert all(r.median_ms > 0 for r in rows)


def test_input_shape_fixes_dynamic_dims_batch_from_batch_sizes(tmp_path, models):
    path = tmp_path / "dyn.onnx"
    onnx.save(_conv_net(False, spatial=("H", "W")), str(path))
    with pytest.raises(OptionError, match="--input-shape"):
        run_bench([path], **FAST)  # H, W unknown
    (row,) = run_bench([path], batch_sizes=(2,), input_shapes={"x": (1, 3, 16, 16)}, **FAST)
    assert row.macs == 2 * 4 * REGULAR_MACS  # batch 2, four times the pixels of 8x8
    with pytest.raises(OptionError, match="no model has such an input"):
        run_bench(models, input_shapes={"nope": (1, 3, 8, 8)}, **FAST)


def test_fixed_batch_mismatch_names_model_and_batch(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(_conv_net(False, batch=1), str(path))
    (row,) = run_bench([path], **FAST)
    assert row.macs == REGULAR_MACS
    with pytest.raises(OptionError, match=r"fixed\.onnx.*fixed batch size of 1.*4"):
        run_bench([path], batch_sizes=(1, 4), **FAST)


def test_external_data_counts_in_file_size(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(_conv_net(False), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    assert data.exists()
    (row,) = run_bench([path], **FAST)
    assert row.file_size == path.stat().st_size + data.stat().st_size
    assert row.params == REGULAR_PARAMS and row.macs == REGULAR_MACS


def test_missing_model_raises_model_error(tmp_path, models):
    with pytest.raises(ModelError, match="not found"):
        run_bench([models[0], tmp_path / "missing.onnx"], **FAST)
    with pytest.raises(ModelError):
        bench_main([str(tmp_path / "missing.onnx"), "--quiet"])


def test_same_inputs_for_matching_signatures():
    cache = {}
    dtypes, shapes = (np.dtype("float32"), np.dtype("int64")), ((2, 3, 4, 4), (2, 5))
    x1 = _make_inputs(dtypes, shapes, 0, cache)
    x2 = _make_inputs(dtypes, shapes, 0, cache)
    assert x1[0] is x2[0]
    fresh = _make_inputs(dtypes, shapes, 0, {})
    np.testing.assert_array_equal(fresh[0], x1[0])
    assert x1[0].dtype == np.float32 and 0.5 < x1[0].std() < 1.5
    assert x1[1].dtype == np.int64 and not x1[1].any()


@pytest.mark.parametrize("argv, flag", [
    (["--runs", "0"], "--runs"),
    (["--runs", "x"], "--runs"),
    (["--threads", "0"], "--threads"),
    (["--warmup", "-1"], "--warmup"),
    (["--batch-sizes", "a"], "--batch-sizes"),
    (["--batch-sizes", "1,0"], "--batch-sizes"),
    (["--input-shape", "x"], "--input-shape"),
    (["--no-such-flag"], "no-such-flag"),
])
def test_bad_flags_raise_option_error(models, argv, flag):
    with pytest.raises(OptionError, match=flag):
        bench_main([str(models[0]), *argv])


def test_no_model_is_an_option_error():
    with pytest.raises(UserError):
        bench_main([])
    with pytest.raises(OptionError, match="at least one model"):
        run_bench([])


def test_bench_main_table_and_json(models, tmp_path, capsys):
    a, b = models
    out = tmp_path / "bench.json"
    code = bench_main([str(a), str(b), "--batch-sizes", "1,2", "--runs", "2", "--warmup", "0",
                       "--threads", "1", "--seed", "3", "--json", str(out), "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    for col in ("batch", "median ms", "p90 ms", "speed-up", "MMACs", "params", "size"):
        assert col in lines[header]
    table = lines[header:]
    assert len(table) == 2 + 4 and table[2].startswith("regular.onnx") and "1.00x" in table[2]
    payload = json.loads(out.read_text())
    assert set(payload) == {"header", "results"}
    for key in ("onnxruntime", "threads", "runs", "warmup", "date", "platform", "batch_sizes"):
        assert key in payload["header"]
    assert payload["header"]["threads"] == 1 and payload["header"]["runs"] == 2
    assert len(payload["results"]) == 4
    first = payload["results"][0]
    for key in ("path", "batch_size", "median_ms", "p90_ms", "macs", "params", "file_size", "speedup"):
        assert key in first
    assert first["speedup"] == 1.0 and first["macs"] == REGULAR_MACS
    assert payload["results"][3]["macs"] == 2 * SEPARABLE_MACS


def test_json_destination_is_checked_before_the_benchmark(models, tmp_path, monkeypatch):
    """--json used to be checked after the timing loop (and could name a model: it overwrote it)."""
    timed = []
    monkeypatch.setattr("onnx_dwdecomp.bench.run_bench", lambda *a, **k: timed.append(1) or [])
    with pytest.raises(UserError, match="--json .*does not exist"):
        bench_main([str(models[0]), "--json", str(tmp_path / "no" / "out.json"), "--quiet"])
    before = models[0].read_bytes()
    with pytest.raises(OptionError, match="would overwrite a model"):
        bench_main([str(models[0]), "--json", str(models[0]), "--quiet"])
    assert models[0].read_bytes() == before and not timed


def test_format_table_aligned(tmp_path):
    rows = [ModelBench(tmp_path / "a.onnx", 1, 4.5, 5.0, 146_000_000, 2_278_604, 9_300_000, 1.0),
            ModelBench(tmp_path / "a_long_name.onnx", 1, 2.25, 2.5, 41_000_000, 1_366_792, 5_500_000, 2.0)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    ends = {len(line) for line in lines}
    assert len(ends) == 1  # right-aligned last column: equal line lengths
    assert "2.00x" in lines[3] and "2,278,604" in lines[2] and "MiB" in lines[2]


def test_resource_bounds(models, monkeypatch):
    """--threads far above the CPUs, and inputs larger than the memory, stop before timing."""
    from onnx_dwdecomp.errors import ResourceError

    with pytest.raises(OptionError, match="--threads 100000: at most"):
        run_bench([models[0]], threads=100000, runs=1, warmup=0)
    monkeypatch.setenv("ONNX_DWDECOMP_MEMORY", "1M")
    with pytest.raises(ResourceError, match="bench inputs"):
        run_bench([models[0]], batch_sizes=[20000], runs=1, warmup=0)  # 20000×3×8×8 floats: 15 MiB


def _two_input_net(spatial=("H", "W")) -> onnx.ModelProto:
    """x[N,3,H,W], z[N,3,H,W] -> Add -> y."""
    h, w = spatial
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"], name="add")], "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, h, w]) for n in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, h, w])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bare_input_shape_applies_to_each_models_single_input(tmp_path, capsys):
    """Bench takes --input-shape as decompose does: bare dims go to each model's one input,
    whatever its name (bench used to refuse them)."""
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_net(False, spatial=("H", "W")), str(a))
    renamed = _conv_net(True, spatial=("H", "W"))
    renamed.graph.input[0].name = "images"  # another input name: bare dims still reach it
    renamed.graph.node[0].input[0] = "images"
    onnx.save(renamed, str(b))
    rows = run_bench([a, b], batch_sizes=(2,), input_shapes={"": (1, 3, 16, 16)}, **FAST)
    assert [r.macs for r in rows] == [2 * 4 * REGULAR_MACS, 2 * 4 * SEPARABLE_MACS]  # 16x16, batch 2
    out = tmp_path / "r.json"
    assert bench_main([str(a), str(b), "--input-shape", "1,3,16,16", "--runs", "1", "--warmup", "0",
                       "--threads", "1", "--json", str(out), "--quiet"]) == 0
    assert [r["macs"] for r in json.loads(out.read_text())["results"]] == [4 * REGULAR_MACS, 4 * SEPARABLE_MACS]
    # the named form is unchanged
    assert bench_main([str(a), "--input-shape", "x:1,3,8,8", "--runs", "1", "--warmup", "0",
                       "--threads", "1", "--quiet"]) == 0


def test_bare_input_shape_on_a_multi_input_model_names_model_and_inputs(tmp_path):
    a, two = tmp_path / "a.onnx", tmp_path / "two.onnx"
    onnx.save(_conv_net(False, spatial=("H", "W")), str(a))
    onnx.save(_two_input_net(), str(two))
    with pytest.raises(OptionError) as e:
        bench_main([str(a), str(two), "--input-shape", "1,3,8,8", "--quiet"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("two.onnx: ")
    assert "inputs x, z" in msg and "NAME:D0,D1,..." in msg
    # named dims for it work; a bare and a named shape together are refused by the shared parser
    (_, row) = run_bench([a, two], input_shapes={"x": (1, 3, 8, 8), "z": (1, 3, 8, 8)}, **FAST)
    assert row.macs == 0
    with pytest.raises(OptionError, match="bare dims are for a single-input model"):
        bench_main([str(a), "--input-shape", "1,3,8,8", "x:1,3,8,8", "--quiet"])


def test_bench_help_documents_bare_dims(capsys):
    with pytest.raises(SystemExit):
        parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[NAME:]D0,D1,..." in text and "single input" in text
