"""Tests of onnx_dwdecomp.calibration: patch geometry, moment sums, segment planning, holdout split,
the driver."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.calibration.holdout import heldout_count, split_holdout
from onnx_dwdecomp.calibration.moments import MomentSums
from onnx_dwdecomp.calibration.patches import effective_pads, extract_patches, output_hw
from onnx_dwdecomp.calibration.segments import plan_segments
from onnx_dwdecomp.candidates import ConvLayer
from onnx_dwdecomp.errors import CalibrationError


def _layer(kernel=(3, 3), strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), auto_pad="NOTSET", c=3, n=4):
    w = np.zeros((n, c, *kernel), np.float32)
    return ConvLayer("L", 0, "x", "y", w, None, strides, pads, dilations, auto_pad)


def _loop_patches(x, layer, positions):
    """Reference: explicit loops over batch, positions, channels and taps (ONNX Conv semantics)."""
    b, c, h, w = x.shape
    t, l, bo, r = effective_pads(layer, (h, w))
    _, ow = output_hw(layer, (h, w))
    kh, kw = layer.kernel
    rows = []
    for i in range(b):
        for p in positions[i]:
            oy, ox = divmod(int(p), ow)
            vec = []
            for ch in range(c):
                for ky in range(kh):
                    for kx in range(kw):
                        yy = oy * layer.strides[0] + ky * layer.dilations[0] - t
                        xx = ox * layer.strides[1] + kx * layer.dilations[1] - l
                        vec.append(x[i, ch, yy, xx] if 0 <= yy < h and 0 <= xx < w else 0.0)
            rows.append(vec)
    return np.array(rows, np.float32)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(strides=(2, 2), pads=(1, 1, 1, 1)),
    dict(pads=(0, 1, 2, 0)),
    dict(dilations=(2, 1), pads=(2, 1, 2, 1)),
    dict(kernel=(1, 3), strides=(1, 2), pads=(0, 1, 0, 1)),
    dict(kernel=(2, 2), auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(kernel=(2, 2), auto_pad="SAME_LOWER"),
    dict(kernel=(3, 3), auto_pad="SAME_UPPER", strides=(2, 2)),
    dict(auto_pad="VALID", strides=(2, 1)),
])
def test_extract_patches_matches_loop(kw):
    layer = _layer(**kw)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    oh, ow = output_hw(layer, (7, 6))
    positions = np.stack([rng.permutation(oh * ow)[:5] for _ in range(2)])
    got = extract_patches(x, layer, positions)
    ref = _loop_patches(x, layer, positions)  # channel-major; extract_patches is tap-major
    k = layer.kernel[0] * layer.kernel[1]
    ref = ref.reshape(len(ref), 3, k).transpose(0, 2, 1).reshape(len(ref), -1)
    # pure gathering: must be bit-exact
    np.testing.assert_array_equal(got, ref)


def test_output_hw_matches_onnxruntime():
    import onnxruntime as ort
    for auto_pad, strides in (("SAME_UPPER", (2, 2)), ("SAME_LOWER", (3, 2)), ("VALID", (2, 1))):
        layer = _layer(kernel=(3, 2), strides=strides, auto_pad=auto_pad, c=1, n=1)
        node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 2], strides=list(strides), auto_pad=auto_pad)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 7, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.ones((1, 1, 3, 2), np.float32), "W")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": np.ones((1, 1, 7, 6), np.float32)})[0]
        assert tuple(y.shape[2:]) == output_hw(layer, (7, 6))


def test_moment_sums_match_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((300, 18)) + 2.0).astype(np.float32)
    xh = (x + 0.1 * rng.standard_normal((300, 18))).astype(np.float32)
    sums = MomentSums(w)

    def tap_major(a):  # rows as extract_patches gives them; the moments come back channel-major
        return np.ascontiguousarray(a.reshape(len(a), 2, 9).transpose(0, 2, 1)).reshape(len(a), 18)
    for lo in range(0, 300, 70):  # several batches
        sums.add(tap_major(x[lo:lo + 70]), tap_major(xh[lo:lo + 70]))
    sums.add(x[:0], xh[:0])  # empty batch is a no-op
    s = sums.stats()
    x64, xh64 = x.astype(np.float64), xh.astype(np.float64)
    y = x64 @ w.reshape(5, -1).astype(np.float64).T
    assert s.count == 300
    # float32 products per batch are accumulated in float64; 1e-4 relative covers float32 rounding
    np.testing.assert_allclose(s.mean_x, x64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.mean_xhat, xh64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s.cov_xhat, np.cov(xh64.T, bias=True), rtol=1e-4, atol=1e-4)
    full = np.cov(np.concatenate([y, xh64], 1).T, bias=True)
    np.testing.assert_allclose(s.cov_y_xhat, full[:5, 5:], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(s.response_var, np.trace(np.cov(y.T, bias=True)), rtol=1e-4)
    np.testing.assert_array_equal(s.cov_xhat, s.cov_xhat.T)


def test_plan_segments_chain_with_skip():
    init = lambda name: numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("Conv", ["a", "W1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["b"], ["c"], name="n2"),
             helper.make_node("Conv", ["c", "W2"], ["d"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["d", "a"], ["e"], name="skip"),
             helper.make_node("Conv", ["e", "W3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
                          initializer=[init("W1"), init("W2"), init("W3")])
    m = helper.make_model(g)
    segs = plan_segments(m, [1, 3, 5])
    got = [(s.start, s.stop, s.inputs, s.outputs) for s in segs]
    assert got == [(0, 1, ("x",), ("a",)),
                   (1, 3, ("a",), ("c",)),
                   (3, 5, ("a", "c"), ("e",))]
    # first cut at node 0: empty leading segment
    segs = plan_segments(m, [0, 1])
    assert (segs[0].start, segs[0].stop, segs[0].inputs, segs[0].outputs) == (0, 0, (), ())


def test_last_layer_input_from_an_earlier_segment_survives():
    """FPN-like fan-out: a and b are made before the first decomposed conv; the second one reads
    b, which no segment between them reads (PP-OCRv4 det's neck, --max-error chose two of its
    five convs: KeyError on the second conv's input)."""
    from conftest import square_net
    from onnx_dwdecomp import decompose
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), f"W{k}") for k in range(2)]
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("Conv", ["a", "W0"], ["c0"], name="conv0", pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["b", "W1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Add", ["r0", "c1"], ["y"])]
    model = square_net(nodes, inits, 4, 8, "fanout")
    x = rng.normal(size=(12, 4, 8, 8)).astype(np.float32)
    _, report = decompose(model, calib=x, multiplier=1, select="all", batch_size=4)
    assert [layer.name for layer in report.layers] == ["conv0", "conv1"]
    assert report.verification.inputs == "held-out calibration samples"


def test_symmetric_errors_do_not_depend_on_the_other_layers():
    """With symmetric statistics (plan curves) a layer's held-out error is measured on its input
    in the original network: the same whether earlier layers are in the pass or not."""
    from conftest import correlated_images, three_layer_net
    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info
    from onnx_dwdecomp.solve import gsvd_factors

    model = three_layer_net()
    data = load_calibration(correlated_images(20, 6, 12, 12), graph_inputs(model))
    infos = infer_tensor_info(model, {"x": (1, 6, 12, 12)})
    layers = find_candidates(model, (), ()).layers
    solve = lambda layer, stats, _err: gsvd_factors(layer.weight, layer.bias, stats, 1, max_iter=0)  # noqa: E731
    opts = CalibrationOptions(batch_size=4, positions=None, symmetric=True)
    together = calibrate_and_solve(model, layers, data, infos, solve, opts).layers
    alone = calibrate_and_solve(model, [layers[1]], data, infos, solve, opts).layers
    assert together[layers[1].name].heldout_error == alone[layers[1].name].heldout_error


def test_split_holdout():
    m1, m2 = split_holdout(24, 0.1, 0), split_holdout(24, 0.1, 0)
    np.testing.assert_array_equal(m1, m2)  # seeded
    assert m1.dtype == bool and m1.sum() == 8  # max(round(2.4), min(MIN_HELDOUT, 24 // 3))
    assert split_holdout(512, 0.1, 0).sum() == 51 and split_holdout(8, 0.1, 0).sum() == 2
    # the bound is checked on at least 16 samples wherever the data has 48
    assert [heldout_count(n) for n in (47, 48, 64, 160, 256)] == [15, 16, 16, 16, 26]
    assert len({split_holdout(24, 0.1, seed).tobytes() for seed in range(5)}) > 1  # the seed matters
    assert split_holdout(2, 0.0, 0).sum() == 1  # at least one held out
    assert split_holdout(3, 0.99, 0).sum() == 2  # at least one left to fit
    with pytest.raises(CalibrationError, match="at least 2"):
        split_holdout(1, 0.1, 0)
    # spread over the energy ranks: 12 samples, 4 held out (a third), one from each quarter of the ranks
    energy = np.random.default_rng(1).random(12)
    for seed in range(5):
        ranks = np.argsort(np.argsort(energy))[split_holdout(12, 0.25, seed, energy)]
        assert sorted(r // 3 for r in ranks) == [0, 1, 2, 3]
    with pytest.raises(CalibrationError):
        split_holdout(0, 0.1, 0)


def _two_conv_net(as_constants: bool):
    """Conv → Relu → Conv whose weights are initializers, or Constant nodes first (Paddle2ONNX)."""
    rng = np.random.default_rng(0)
    wa = numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "WA")
    wb = numpy_helper.from_array(rng.normal(size=(8, 8, 3, 3)).astype(np.float32), "WB")
    convs = [helper.make_node("Conv", ["x", "WA"], ["a"], name="convA", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "WB"], ["y"], name="convB", pads=[1, 1, 1, 1])]
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in (wa, wb)] if as_constants else []
    graph = helper.make_graph(consts + convs, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])],
                              initializer=[] if as_constants else [wa, wb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_constant_node_weights_are_not_cut_tensors():
    """Constant outputs cross every cut but are not per-sample data: segments recompute them."""
    model = _two_conv_net(as_constants=True)
    segments = plan_segments(model, [2, 4])
    assert all("WA" not in s.outputs + s.inputs and "WB" not in s.outputs + s.inputs for s in segments)
    assert segments[1].static_nodes == (0,)  # [convA, Relu] brings the Constant producing WA
    from onnx_dwdecomp import decompose
    x = np.random.default_rng(1).normal(size=(20, 4, 16, 16)).astype(np.float32)
    reports = [decompose(_two_conv_net(c), calib=x, batch_size=4, select="all", multiplier=1)[1]
               for c in (True, False)]
    # the same statistics and solves whatever holds the weights: identical per-layer errors
    assert [r.rel_error for r in reports[0].layers] == [r.rel_error for r in reports[1].layers]
    assert len(reports[0].layers) == 2


def test_onnxruntime_failure_in_a_segment_is_a_calibration_error():
    """A model that only runs at batch 1 (Reshape to a fixed [1, …]) fails with one clear error."""
    from onnx_dwdecomp import decompose
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "s")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", pads=[1] * 4),
             helper.make_node("Reshape", ["a", "s"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(6, 4, 8, 8)).astype(np.float32)
    with pytest.raises(CalibrationError, match=r"onnxruntime cannot run .* batches of 3: .*--batch-size 1"):
        decompose(model, calib=x, batch_size=3, select="all", multiplier=1)
    _, report = decompose(model, calib=x, batch_size=1, select="all", multiplier=1)  # the advice works
    assert len(report.layers) == 2


def test_spilling_to_disk_gives_the_same_statistics(tmp_path, monkeypatch):
    """A 1-byte memory budget puts every cut tensor in a memory-mapped file: same errors, nothing left on disk."""
    import tempfile

    from conftest import correlated_images, three_layer_net
    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info
    from onnx_dwdecomp.solve import gsvd_factors

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the private folder goes here
    model = three_layer_net()
    specs = graph_inputs(model)
    data = load_calibration(correlated_images(20, 6, 12, 12), specs)
    infos = infer_tensor_info(model, {"x": (1, 6, 12, 12)})
    layers = find_candidates(model, (), ()).layers
    outcomes = [calibrate_and_solve(model, layers, data, infos,
                                    lambda layer, stats, _err: gsvd_factors(layer.weight, layer.bias, stats, 1),
                                    CalibrationOptions(batch_size=4, memory_budget=budget))
                for budget in (1 << 30, 1)]
    assert outcomes[0].spilled_bytes == 0 and outcomes[1].spilled_bytes > 0
    # the same float32 values either way, so the same statistics and solves
    assert ([r.heldout_error for r in outcomes[0].layers.values()]
            == [r.heldout_error for r in outcomes[1].layers.values()])
    assert list(tmp_path.iterdir()) == []  # the private folder and its files are gone


def test_heldout_error_equals_the_moment_formula():
    """Direct held-out error on patches == relative_response_error on the same patches' moments."""
    from conftest import correlated_images
    from onnx_dwdecomp.calibration.holdout import heldout_response_error
    from onnx_dwdecomp.solve import relative_response_error, svd_factors
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    layer = ConvLayer("L", 0, "x", "y", weight, rng.standard_normal(5).astype(np.float32), (1, 1), (1, 1, 1, 1),
                      (1, 1), "NOTSET")
    x_all = correlated_images(12, 4, 7, 7, seed=1)
    xhat_all = x_all + 0.1 * correlated_images(12, 4, 7, 7, seed=2)
    heldout = np.zeros(12, bool)
    heldout[[1, 5, 8]] = True
    positions = np.stack([rng.permutation(49)[:20] for _ in range(12)])
    factors = svd_factors(weight, layer.bias, 1)
    direct = heldout_response_error(layer, factors, x_all, xhat_all, heldout, positions, batch=2)
    sums = MomentSums(weight)
    idx = np.flatnonzero(heldout)
    sums.add(extract_patches(x_all[idx], layer, positions[idx]), extract_patches(xhat_all[idx], layer, positions[idx]))
    # float64 algebra either way on float32 patches; the moment form subtracts large terms (1e-5)
    assert direct == pytest.approx(relative_response_error(weight, layer.bias, factors, sums.stats()), rel=1e-5)
    assert 0 < direct < 10


# ------------------------------------------------------------------ symmetric moments (issue #14)

def _tap_major_rows(a, c, k):
    return np.ascontiguousarray(a.reshape(len(a), c, k).transpose(0, 2, 1)).reshape(len(a), c * k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_moments_equal_plain_products(dtype):
    """The symmetric pass's moments (x̂x̂ᵀ by BLAS syrk per batch, Σ(Wx)xᵀ = W·Σxxᵀ derived once)
    equal the plain float64 products XᵀX, Σ(Wx)xᵀ, Σ‖Wx‖² of the same rows, and the row-by-row
    sums of the general path.

    Tolerances: float64 rows give float64 products, so only the summation order differs
    (≲ m·u₆₄ ≈ 1e-13 relative; 1e-10 is loose). float32 rows give float32 products per batch of
    ≤ 70 rows, each entry a sum of 70 terms with relative error ≲ 70·u₃₂ ≈ 4e-6 of the raw second
    moment; the rows have mean 2 and unit spread, so centring divides the raw moment (~5) into
    a covariance of ~1 and the error grows about 5× — 1e-4 covers it with room. The derived
    response moments differ from the row-by-row float32 ones by the same kind of round-off."""
    rng = np.random.default_rng(4)
    c, k, n, m = 3, 9, 5, 300
    w = rng.standard_normal((n, c, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((m, c * k)) + 2.0).astype(dtype)
    tm = _tap_major_rows(x, c, k)
    sym, general = MomentSums(w, symmetric=True), MomentSums(w)
    for lo in range(0, m, 70):
        rows = tm[lo:lo + 70]
        sym.add(rows, rows)
        general.add(rows, rows.copy())
    assert sym.symmetric and not general.symmetric
    s, g = sym.stats(), general.stats()
    x64 = x.astype(np.float64)
    y = x64 @ w.reshape(n, -1).astype(np.float64).T
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_array_equal(s.cov_xhat, s.cov_xhat.T)  # exactly symmetric, never averaged
    np.testing.assert_allclose(s.cov_xhat, np.cov(x64.T, bias=True), rtol=tol, atol=tol)
    np.testing.assert_allclose(s.mean_x, x64.mean(0), rtol=1e-12)
    np.testing.assert_array_equal(s.mean_x, s.mean_xhat)
    full = np.cov(np.concatenate([y, x64], 1).T, bias=True)
    np.testing.assert_allclose(s.cov_y_xhat, full[:n, n:], rtol=tol, atol=10 * tol)
    assert s.response_var == pytest.approx(np.trace(np.cov(y.T, bias=True)), rel=tol)
    # the derived response moments against the row-by-row ones: round-off apart
    np.testing.assert_array_equal(s.cov_xhat, g.cov_xhat)  # the same syrk sums either way
    np.testing.assert_allclose(s.cov_y_xhat, g.cov_y_xhat, rtol=tol, atol=10 * tol)
    assert s.response_var == pytest.approx(g.response_var, rel=tol)


def test_symmetric_moments_switch_to_rows_on_an_asymmetric_batch():
    """A batch with x̂ ≠ x after symmetric ones turns the derived sums into running sums: the
    result is the general path's (round-off apart)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((200, 18)) + 1.0).astype(np.float32)
    xh = (x + 0.1 * rng.standard_normal((200, 18))).astype(np.float32)
    mixed, general = MomentSums(w, symmetric=True), MomentSums(w)
    mixed.add(x[:100], x[:100])
    mixed.add(x[100:], xh[100:])
    general.add(x[:100], x[:100].copy())
    general.add(x[100:], xh[100:])
    assert not mixed.symmetric
    a, b = mixed.stats(), general.stats()
    np.testing.assert_array_equal(a.cov_xhat, b.cov_xhat)
    np.testing.assert_array_equal(a.mean_xhat, b.mean_xhat)
    np.testing.assert_allclose(a.cov_y_xhat, b.cov_y_xhat, rtol=1e-5, atol=1e-5)
    assert a.response_var == pytest.approx(b.response_var, rel=1e-5)


def test_heldout_patches_measure_many_candidates_like_single_calls():
    """HeldoutPatches gathers the held-out patches once; each candidate's error is bit for bit
    heldout_response_error's, and the driver's measure remembers the last factors' error."""
    from conftest import correlated_images
    from onnx_dwdecomp.calibration.holdout import HeldoutPatches, heldout_measure, heldout_response_error
    from onnx_dwdecomp.solve import svd_factors
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    layer = ConvLayer("L", 0, "x", "y", weight, rng.standard_normal(5).astype(np.float32), (1, 1), (1, 1, 1, 1),
                      (1, 1), "NOTSET")
    x_all = correlated_images(10, 4, 7, 7, seed=1)
    xhat_all = x_all + 0.1 * correlated_images(10, 4, 7, 7, seed=2)
    heldout = np.zeros(10, bool)
    heldout[[0, 3, 4, 9]] = True
    positions = np.stack([rng.permutation(49)[:15] for _ in range(10)])
    patches = HeldoutPatches(layer, x_all, xhat_all, heldout, positions, batch=3)
    measure = heldout_measure(patches)
    for r in (1, 2, 9):
        f = svd_factors(weight, layer.bias, r)
        direct = heldout_response_error(layer, f, x_all, xhat_all, heldout, positions, batch=3)
        assert patches.error(f) == direct == measure(f) == measure(f)


def test_symmetric_pass_solves_on_a_worker_thread_deterministically():
    """Symmetric: layer k is solved on a worker thread while layer k+1's statistics are gathered.
    The results equal solving in the calling thread after each layer (each solve sees the same
    statistics), come back in graph order, and BLAS gets its thread count back afterwards."""
    import threading

    from conftest import correlated_images, three_layer_net
    from threadpoolctl import threadpool_info

    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info
    from onnx_dwdecomp.solve import gsvd_factors

    model = three_layer_net()
    data = load_calibration(correlated_images(20, 6, 12, 12), graph_inputs(model))
    infos = infer_tensor_info(model, {"x": (1, 6, 12, 12)})
    layers = find_candidates(model, (), ()).layers
    threads, seen = set(), {}

    def solve(layer, stats, err):
        threads.add(threading.current_thread().name)
        seen[layer.name] = stats
        return gsvd_factors(layer.weight, layer.bias, stats, 2)

    before = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    opts = CalibrationOptions(batch_size=4, symmetric=True)
    runs = [calibrate_and_solve(model, layers, data, infos, solve, opts) for _ in range(2)]
    assert [(i["internal_api"], i["num_threads"]) for i in threadpool_info()] == before
    assert threading.current_thread().name not in threads
    assert list(runs[0].layers) == [layer.name for layer in sorted(layers, key=lambda ly: ly.node_index)]
    by_name = {layer.name: layer for layer in layers}
    for name, result in runs[0].layers.items():
        other = runs[1].layers[name]
        np.testing.assert_array_equal(result.factors.depthwise, other.factors.depthwise)
        np.testing.assert_array_equal(result.factors.pointwise, other.factors.pointwise)
        assert result.heldout_error == other.heldout_error
        again = gsvd_factors(by_name[name].weight, by_name[name].bias, seen[name], 2)  # in this thread
        np.testing.assert_array_equal(result.factors.pointwise, again.pointwise)


def test_known_layers_are_reused_with_the_same_results():
    """A plan round reuses the layers solved in an earlier round against the same earlier
    factors: their statistics and solves are skipped, the network still runs through them, and
    every later layer comes out exactly as when all were solved afresh (same arrays, same sums)."""
    from conftest import correlated_images, three_layer_net
    from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
    from onnx_dwdecomp.candidates import find_candidates
    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info
    from onnx_dwdecomp.solve import gsvd_factors

    model = three_layer_net()
    data = load_calibration(correlated_images(20, 6, 12, 12), graph_inputs(model))
    infos = infer_tensor_info(model, {"x": (1, 6, 12, 12)})
    layers = find_candidates(model, (), ()).layers
    solved: list[str] = []

    def solve(layer, stats, _err):
        solved.append(layer.name)
        return gsvd_factors(layer.weight, layer.bias, stats, 1, max_iter=3)

    opts = CalibrationOptions(batch_size=4, positions=None)
    fresh = calibrate_and_solve(model, layers, data, infos, solve, opts).layers
    assert solved == ["conv0", "conv1", "conv2"]
    solved.clear()
    again = calibrate_and_solve(model, layers, data, infos, solve, opts,
                                known={name: fresh[name] for name in ("conv0", "conv1")}).layers
    assert solved == ["conv2"]
    assert np.array_equal(again["conv2"].factors.dense_weight(), fresh["conv2"].factors.dense_weight())
    assert again["conv2"].heldout_error == fresh["conv2"].heldout_error
    assert again["conv0"] is fresh["conv0"]
