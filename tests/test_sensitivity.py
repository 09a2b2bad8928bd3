"""sensitivity.py: per-layer probes that turn a layer's error into the output error it causes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import correlated_images, square_net
from onnx_dwdecomp import decompose
from onnx_dwdecomp.candidates import find_candidates
from onnx_dwdecomp.rewrite import Replacement, apply_replacements
from onnx_dwdecomp.planning.sensitivity import measure_sensitivities, probe_model, sensitivity
from onnx_dwdecomp.solve import svd_factors
from onnx_dwdecomp.verify import compare_models


def loud_and_quiet_net(c: int = 6, hw: int = 10, quiet: float = 0.01) -> onnx.ModelProto:
    """``y = conv_loud(x) + quiet · conv_quiet(x)``: the same kind of random conv on both
    branches, one reaching the output 1/quiet times weaker — so it dominates the output error."""
    rng = np.random.default_rng(5)
    w = {k: (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32) for k in ("wl", "wq")}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array(quiet, np.float32), "scale"))
    nodes = [helper.make_node("Conv", ["x", "wl"], ["a"], name="loud", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wq"], ["b0"], name="quiet", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["b0", "scale"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return square_net(nodes, inits, c, hw, "loud_and_quiet")


def test_one_layer_dominates_the_output_error():
    """Both branches' convs lose about as much (random weights, r = 1), but the quiet one reaches
    the output 100× weaker: its gain (output error per unit of layer error) is ~100× smaller, and
    the allocation rewrites it first."""
    _, rep = decompose(loud_and_quiet_net(), calib=correlated_images(40, 6, 10, 10, seed=3), select="all",
                       max_error=0.05)
    layers = {layer["name"]: layer for layer in rep.budget["layers"]}
    loud, quiet = layers["loud"]["probe"], layers["quiet"]["probe"]
    # y ≈ a: the loud branch's relative error passes on at gain ~1, the quiet one's at ~0.01
    assert 0.5 < loud["gain"] < 2.0, loud
    assert 50 < loud["gain"] / quiet["gain"] < 200, (loud, quiet)
    assert layers["quiet"]["multiplier"] != "skip" and layers["loud"]["multiplier"] == "skip"
    assert rep.budget["probes"] == {"count": 2, "samples": rep.verification.samples}


def test_a_probe_equals_the_rewritten_model():
    """A probe feeds the dense equivalent of the separable factors: its output error is the one
    of the model with that conv really rewritten (up to float round-off: the two-conv form sums
    in another order; observed 1e-7 relative)."""
    net = loud_and_quiet_net(quiet=0.5)
    data = correlated_images(12, 6, 10, 10, seed=4)
    layers = list(find_candidates(net).layers)
    factors = {layer.name: svd_factors(layer.weight, layer.bias, 1) for layer in layers}
    batches = [{"x": data[:8]}, {"x": data[8:]}]
    probes = measure_sensitivities(net, layers, factors, {layer.name: 0.25 for layer in layers},
                                   {layer.name: 1 for layer in layers}, batches, None)
    assert probes.samples == 12 and set(probes.probes) == {"loud", "quiet"}
    for layer in layers:
        alone = apply_replacements(net, [Replacement(layer, factors[layer.name])])
        expected = compare_models(net, alone, batches, "test").worst_error()
        p = probes.probes[layer.name]
        assert p.output_error == pytest.approx(expected, rel=1e-4)
        assert p.sensitivity == pytest.approx(expected ** 2 / 0.25) and p.gain == pytest.approx(expected / 0.5)


def test_probe_model_reads_weights_from_inputs_and_leaves_the_model_alone():
    net = loud_and_quiet_net()
    before = net.SerializeToString()
    layers = list(find_candidates(net).layers)
    probe, names = probe_model(net, layers)
    assert net.SerializeToString() == before
    inputs = {i.name for i in probe.graph.input}
    assert set(names) == {"loud", "quiet"} and all(w in inputs and b in inputs for w, b in names.values())
    onnx.checker.check_model(probe)


def test_sensitivity_rules():
    assert sensitivity(0.1, 0.04) == pytest.approx(0.25)
    assert sensitivity(0.1, 0.0) == 0.0  # an exact option predicts 0 whatever the weight
    assert sensitivity(float("nan"), 0.1) == float("inf")


def skip_net(c: int = 4, hw: int = 8, reshape: bool = False) -> onnx.ModelProto:
    """x → conv0 → relu → conv1 → relu → conv2 → + r0 → y: the part after conv2 reads a tensor
    from before conv1 (the skip); with ``reshape``, also a shape-derived one (Shape of x, taken
    first → Reshape of the sum), which the store keeps per batch, not per sample."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), f"w{k}")
             for k in range(3)]
    nodes = [helper.make_node("Shape", ["x"], ["xs"])] if reshape else []
    nodes += [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    if reshape:
        nodes += [helper.make_node("Add", ["c2", "r0"], ["s"]),
                  helper.make_node("Reshape", ["s", "xs"], ["y"])]
    else:
        nodes.append(helper.make_node("Add", ["c2", "r0"], ["y"]))
    return square_net(nodes, inits, c, hw, "skip")


@pytest.mark.parametrize("reshape", [False, True])
def test_in_pass_probes_equal_whole_network_probes(reshape):
    """The curve pass probes each layer from the cut tensors it holds (the network from that conv
    on, the skip read from the store); it must measure what a whole-network probe measures: the
    same function on the same samples, so equal up to float round-off (the two-conv form and the
    dense weight sum in another order: observed ~1e-7 relative; 1e-4 allowed). Where the rest
    reads a shape-derived tensor the probe falls back to the whole network."""
    from onnx_dwdecomp.calibration.driver import CalibrationOptions, calibrate_and_solve
    from onnx_dwdecomp.data.dataset import load_calibration
    from onnx_dwdecomp.planning.sensitivity import SensitivityProbes
    from onnx_dwdecomp.shapes import graph_inputs, infer_tensor_info
    from onnx_dwdecomp.verify import model_outputs

    net = skip_net(reshape=reshape)
    images = correlated_images(24, 4, 8, 8, seed=2)
    data = load_calibration(images, graph_inputs(net))
    infos = infer_tensor_info(net, {"x": (1, 4, 8, 8)})
    layers = list(find_candidates(net).layers)
    heldout = np.zeros(24, dtype=bool)
    heldout[[1, 5, 6, 11, 17, 20, 23]] = True
    batches = [{"x": images[heldout][:4]}, {"x": images[heldout][4:]}]
    ones = {layer.name: 1 for layer in layers}
    probes = SensitivityProbes(model_outputs(net, batches, "net"), None, ones, len(layers))
    outcome = calibrate_and_solve(net, layers, data, infos, lambda layer, stats, _err: svd_factors(layer.weight, None, 1),
                                  CalibrationOptions(batch_size=4, positions=None, symmetric=True),
                                  heldout=heldout, probe=probes)
    assert {name for name in probes.deferred} == ({"conv0", "conv1", "conv2"} if reshape else set())
    got = probes.finish(net, batches, [layer.name for layer in layers])
    whole = measure_sensitivities(net, layers, {n: r.factors for n, r in outcome.layers.items()},
                                  {n: r.heldout_error for n, r in outcome.layers.items()}, ones, batches, None)
    assert list(got.probes) == ["conv0", "conv1", "conv2"] and got.samples == 7
    for name, p in whole.probes.items():
        assert p.output_error > 1e-3  # a real error, not round-off
        assert got.probes[name].output_error == pytest.approx(p.output_error, rel=1e-4)
        assert got.probes[name].layer_error == p.layer_error


def test_a_probe_never_slices_an_input_without_a_sample_axis(tmp_path):
    """An input without a sample axis (shape [4], one value for all samples) read after the last
    conv: at --batch-size 4 the store keeps it like a per-sample tensor (its axis 0 equals each
    batch's rows), so a probe fed from the store would slice it by held-out sample. Such a part
    of the graph is probed on the whole network instead: the probes equal those of the batch-3
    job, where the question never arises (same function, same samples; 1e-4 relative)."""
    c, hw = 4, 8
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32),
                                     f"w{k}") for k in range(2)]
    inits.append(numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), "shp"))
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["s", "shp"], ["s4"]),
             helper.make_node("Mul", ["c1", "s4"], ["y"])]
    graph = helper.make_graph(nodes, "unbatched", [
        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, hw, hw]),
        helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [c])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c, hw, hw])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated_images(24, c, hw, hw), s=np.array([1, 2, 3, 4], np.float32))
    probes = {}
    for batch in (3, 4):
        _, rep = decompose(model, calib=str(calib), batch_size=batch, max_error=0.5, select="all")
        probes[batch] = {layer["name"]: layer["probe"]["output_error"] for layer in rep.budget["layers"]}
    assert set(probes[4]) == {"conv0", "conv1"}
    for name, error in probes[3].items():
        assert probes[4][name] == pytest.approx(error, rel=1e-4)
