r"""Per-layer sensitivity: how much output error one layer's decomposition error causes.

The model
---------
A decomposed layer ``l`` leaves a relative response error ``e_l`` (a squared ratio,
``E‖Wx − Ŵx̂‖² / Var(Wx)``, measured on held-out patches). Rewriting it alone gives the network
an output error ``ε_l`` (the per-feature relative L2 that plans bound, verify.py). Probes on real
models (MNIST, PP-OCR det; docs/DESIGN.md) found

- ``ε_l² / e_l`` nearly constant within a layer across depth multipliers (0.44–1.13× from r = 1
  to r = 2) but different between layers (29× on MNIST, ~140× on PP-OCR det);
- single-layer output errors adding in squares: ``√Σ ε_l²`` within 5 % of the measured output
  error of combined plans up to an error of ~0.05.

So each layer gets a *sensitivity* ``s_l = ε_l² / e_l`` from one probe at its first offered
option, and a plan's output error is predicted as

    ε² ≈ α · Σ_l s_l · e_l(r_l)

with one scale ``α`` (1 before any round) that the planner's verified rounds measure to correct
the interaction between layers. ``g_l = √s_l`` is the layer's *gain*: output error per unit of
layer error (both relative RMS), shown in the report.

The probe
---------
Layer ``l``'s probe runs the network with ``l`` replaced by its factors at its first offered
option (the curve pass's solve) over the held-out calibration samples and compares the outputs
with the input model's on them (its held-out reference, run once per job). It runs inside the
curve pass (:class:`SensitivityProbes` is the calibration driver's ``probe``): from the cut
tensors the pass holds at ``l``'s conv, only the nodes from ``l`` on — on average about half a
forward pass of the held-out samples per probe instead of a whole one.

Where the part from ``l`` on cannot be fed from held tensors (it reads a shape-derived tensor,
or the model's batch is fixed), the probe runs the whole network instead: one session of the
model in which every such conv reads its weight and bias from new graph inputs
(``<prefix>w<i>``/``<prefix>b<i>``), fed the dense equivalent ``Ŵ_l = Σ_s P ⊗ F`` of its
factors (the same function as the two-conv form, up to round-off) and the original weights
everywhere else; its reference run feeds every original weight, so those probes share its
round-off.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..calibration.driver import CalibratedLayer
from ..candidates import ConvLayer
from ..errors import CalibrationError, first_line
from ..progress import Steps
from ..runtime import make_session, run
from ..solve import ChannelFactors, SeparableFactors
from ..verify import OutputScale, real_outputs, real_rows, worst_output_error
from .error_model import curve_error

#: Name prefix of the probe model's weight inputs (made unique against the model's own names).
PREFIX = "dwdecomp_probe_"


@dataclass(frozen=True)
class LayerProbe:
    """One layer rewritten alone: its layer error ``e`` (squared ratio, at ``multiplier``), the
    held-out output error ``output_error`` it caused, and ``sensitivity = output_error² / e``."""

    name: str
    multiplier: int
    layer_error: float
    output_error: float
    sensitivity: float

    @property
    def gain(self) -> float:
        """Output rel. L2 per unit of layer rel. RMS error (√sensitivity)."""
        return float(np.sqrt(self.sensitivity))


@dataclass(frozen=True)
class Sensitivities:
    probes: dict[str, LayerProbe]
    samples: int  # held-out samples each probe ran on
    seconds: float

    def weights(self) -> dict[str, float]:
        return {name: p.sensitivity for name, p in self.probes.items()}


def sensitivity(output_error: float, layer_error: float) -> float:
    """``s = ε² / e``; 0 when the layer error is 0 (an exact option: any weight predicts 0)."""
    if not np.isfinite(output_error):
        return float("inf")
    return float(output_error ** 2 / layer_error) if layer_error > 0 else 0.0


class SensitivityProbes:
    """The probes of one curve pass (module docstring): called by the calibration driver as each
    layer's factors come in (``probe(layer, calibrated, run_on)``), then :meth:`finish` probes the
    layers whose rest of the network could not be fed from the pass's tensors (or that onnxruntime
    would not load or run on its own) on the whole network.

    ``reference`` is the input model's outputs on the held-out samples (per batch, in sample
    order); ``multipliers[name]`` the option each layer's factors were solved at.
    """

    def __init__(self, reference: list[dict[str, np.ndarray]], scales: dict[str, OutputScale] | None,
                 multipliers: Mapping[str, int], total: int):
        self.reference, self.scales, self.multipliers = reference, scales, multipliers
        self.steps = Steps("plan: sensitivity probe", total)
        self.probes: dict[str, LayerProbe] = {}
        self.deferred: dict[str, tuple[ConvLayer, CalibratedLayer]] = {}
        self.seconds = 0.0

    def __call__(self, layer: ConvLayer, calibrated: CalibratedLayer, run_on) -> None:
        if run_on is None:
            self.deferred[layer.name] = (layer, calibrated)
            return
        t0 = time.perf_counter()
        self.steps.step(len(self.probes), layer.name)
        try:
            outputs = run_on()
        except CalibrationError:  # onnxruntime refused the part from this conv on: the whole network
            self.deferred[layer.name] = (layer, calibrated)
        else:
            error = worst_output_error(self.reference, outputs, self.scales)
            self.probes[layer.name] = self._probe(layer.name, calibrated.heldout_error, error)
        self.seconds += time.perf_counter() - t0

    def _probe(self, name: str, layer_error: float, output_error: float) -> LayerProbe:
        e = curve_error(layer_error)
        return LayerProbe(name, int(self.multipliers[name]), e, output_error, sensitivity(output_error, e))

    def finish(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], order: list[str]
               ) -> Sensitivities:
        """Every layer's probe (``order``: the layers' names), the deferred ones run on the whole
        network over the held-out ``batches`` (:func:`measure_sensitivities`)."""
        if self.deferred:
            layers = [layer for layer, _ in self.deferred.values()]
            whole = measure_sensitivities(
                model, layers, {name: c.factors for name, (_, c) in self.deferred.items()},
                {name: curve_error(c.heldout_error) for name, (_, c) in self.deferred.items()},
                self.multipliers, batches, self.scales)
            self.probes.update(whole.probes)
            self.seconds += whole.seconds
        samples = sum(real_rows(feeds) for feeds in batches)
        return Sensitivities({name: self.probes[name] for name in order}, samples, self.seconds)


def probe_model(model: onnx.ModelProto, layers: list[ConvLayer]) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy of ``model`` whose convs ``layers`` read weight and bias from new graph inputs;
    returns it and ``{layer name: (weight input, bias input)}``. The old weight producers stay
    (unused: onnxruntime prunes them)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    taken = {v.name for v in probe.graph.input} | {t.name for t in probe.graph.initializer}
    taken |= {o for node in probe.graph.node for o in node.output}
    names: dict[str, tuple[str, str]] = {}
    for i, layer in enumerate(layers):
        w, b = f"{PREFIX}w{i}", f"{PREFIX}b{i}"
        while w in taken or b in taken:
            w, b = "_" + w, "_" + b
        node = probe.graph.node[layer.node_index]
        del node.input[1:]
        node.input.extend([w, b])
        elem = helper.np_dtype_to_tensor_dtype(layer.weight.dtype)
        probe.graph.input.extend([helper.make_tensor_value_info(w, elem, layer.weight.shape),
                                  helper.make_tensor_value_info(b, elem, (layer.weight.shape[0],))])
        names[layer.name] = (w, b)
    return probe, names


def measure_sensitivities(model: onnx.ModelProto, layers: list[ConvLayer],
                          factors: Mapping[str, SeparableFactors | ChannelFactors],
                          layer_errors: Mapping[str, float], multipliers: Mapping[str, int],
                          batches: list[dict[str, np.ndarray]], scales: dict[str, OutputScale] | None
                          ) -> Sensitivities:
    """One whole-network probe per layer (module docstring) on the held-out ``batches``;
    ``layer_errors[name]`` is the layer error of ``factors[name]`` (the curve pass's, at
    ``multipliers[name]``)."""
    t0 = time.perf_counter()
    probe, inputs = probe_model(model, layers)
    try:
        session = make_session(probe)
    except Exception as exc:  # onnxruntime's own exception types
        raise CalibrationError(f"onnxruntime cannot load the sensitivity probe model: {first_line(exc)}") from exc
    outputs = [o.name for o in model.graph.output]
    original = {}
    for layer in layers:
        w, b = inputs[layer.name]
        bias = np.zeros(layer.weight.shape[0]) if layer.bias is None else layer.bias
        original[w], original[b] = layer.weight, bias.astype(layer.weight.dtype)

    def outputs_with(weights: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        return [real_outputs(run(session, {**feeds, **weights}, outputs), feeds) for feeds in batches]

    reference = outputs_with(original)
    probes = {}
    steps = Steps("plan: sensitivity probe", len(layers))
    for k, layer in enumerate(layers):
        steps.step(k, layer.name)
        w, b = inputs[layer.name]
        f = factors[layer.name]
        changed = dict(original)
        changed[w] = f.dense_weight().astype(layer.weight.dtype)
        changed[b] = np.asarray(f.bias).astype(layer.weight.dtype)
        error = worst_output_error(reference, outputs_with(changed), scales)
        e = float(layer_errors[layer.name])
        probes[layer.name] = LayerProbe(layer.name, int(multipliers[layer.name]), e, error, sensitivity(error, e))
    samples = sum(real_rows(feeds) for feeds in batches)
    return Sensitivities(probes, samples, time.perf_counter() - t0)
