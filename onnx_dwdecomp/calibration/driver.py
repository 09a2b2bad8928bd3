"""The calibration driver: each candidate conv's statistics in graph order, against the
original network (symmetric) or the partially decomposed one (asymmetric, multi-layer
correction), each layer solved by the caller's ``solve`` as soon as its statistics are in
(package docstring, onnx_dwdecomp.calibration).
"""

from __future__ import annotations

import contextvars
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx

from ..candidates import ConvLayer
from ..data.dataset import CalibrationData
from ..errors import CalibrationError, first_line
from ..progress import Steps
from ..rewrite import NameAllocator, Replacement, replacement_convs, to_onnx_nodes
from ..runtime import make_session, run
from ..shapes import TensorInfo
from ..solve import ChannelFactors, LayerStats, SeparableFactors, one_blas_thread
from .holdout import HOLDOUT_FRACTION, HeldoutPatches, heldout_measure, split_holdout
from .moments import MomentSums
from .patches import output_hw, patch_pair, positions_per_sample
from .segments import Segment, plan_segments, sample_free, segment_model, suffix_segment
from .store import CUT_BUDGET, TensorStore


#: ``solve(layer, fit_stats, heldout_error)``: factors from the fit statistics;
#: ``heldout_error(factors)`` measures any candidate on the held-out patches (the planning error model's curves).
SolveFn = Callable[[ConvLayer, LayerStats, Callable[["SeparableFactors | ChannelFactors"], float]],
                   "SeparableFactors | ChannelFactors"]
#: ``probe(layer, calibrated, run_on)``: a symmetric pass's layer is solved; ``run_on()`` runs the
#: network from that layer to its outputs, the layer replaced by its factors, over the held-out
#: samples, from the cut tensors the pass holds (per held-out batch: output name → value);
#: None where those tensors cannot be fed (the planning/sensitivity.py probes).
ProbeFn = Callable[[ConvLayer, "CalibratedLayer", "Callable[[], list[dict[str, np.ndarray]]] | None"], None]


@dataclass(frozen=True)
class CalibrationOptions:
    batch_size: int = 32
    positions: int | None = 64  # None = all output positions
    holdout: float = HOLDOUT_FRACTION
    symmetric: bool = False
    seed: int = 0
    memory_budget: int = CUT_BUDGET  # cut tensors (both networks) past this spill to disk


@dataclass(frozen=True)
class CalibratedLayer:
    factors: SeparableFactors | ChannelFactors
    heldout_error: float
    stats_count: int


@dataclass(frozen=True)
class CalibrationOutcome:
    layers: dict[str, CalibratedLayer]
    samples: int
    heldout_samples: int
    positions: int | None
    spilled_bytes: int
    timing_s: dict[str, float]


def calibrate_and_solve(model: onnx.ModelProto, layers: list[ConvLayer], data: CalibrationData,
                        infos: dict[str, TensorInfo], solve: SolveFn, options: CalibrationOptions,
                        fixed_batch: int | None = None, heldout: np.ndarray | None = None,
                        probe: ProbeFn | None = None,
                        known: dict[str, CalibratedLayer] | None = None) -> CalibrationOutcome:
    """Decompose ``layers`` in graph order, each against statistics of the partially decomposed network.

    ``heldout`` is the mask of samples left out of the statistics (default :func:`split_holdout`).
    ``probe`` (symmetric pass only) is called once per layer with its factors (:data:`ProbeFn`):
    the rest of the network runs from the cut tensors the pass already holds, a fraction of a
    forward pass of the held-out samples instead of a whole one. ``known`` (asymmetric pass only):
    layers already solved against the same earlier layers and factors (a previous plan round
    with the same prefix); the network still runs through them with their factors, but their
    statistics and solves are skipped — the same arrays, so the same results.

    ``solve(layer, stats)`` turns one layer's calibration statistics into factors; the factors
    of every layer are in place in the decomposed copy before the next layer's statistics are
    gathered (asymmetric correction). With ``options.symmetric`` the solve sees (x, x) instead,
    the held-out errors are measured on x alone, and the decomposed network is never run.

    Overlap: asymmetric, the original network's next segment runs on a worker thread while a
    layer is solved. Symmetric, no layer's statistics depend on another's factors, so layer
    ``k`` is solved on a worker thread while the main thread runs the forward pass and the
    statistics of layer ``k + 1`` (one solve in flight). Both threads then compute with numpy
    BLAS at the same time, so the whole symmetric pass keeps BLAS on one thread (the solves do
    anyway): OpenBLAS results depend on its thread count, and a count that changed with the
    threads' timing would make the results vary from run to run. ``timing_s`` counts the main
    thread: ``solve`` is the time it waited for solves (the rest overlapped).
    """
    layers = sorted(layers, key=lambda layer: layer.node_index)
    if probe is not None and not options.symmetric:
        raise ValueError("sensitivity probes run in the symmetric pass only")
    if known and options.symmetric:
        raise ValueError("known layers are reused in the asymmetric pass only")
    if heldout is None:
        heldout = split_holdout(data.num_samples, options.holdout, options.seed)
    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_calib_") as tmp:
        state = _PassState(model, layers, infos, options, fixed_batch, heldout, data.num_samples, tmp)
        state.load(data, tail=probe is not None and fixed_batch is None)
        if options.symmetric:
            _symmetric_pass(state, solve, probe)
        else:
            _asymmetric_pass(state, solve, known or {})
        spilled = state.orig.spilled_bytes + state.approx.spilled_bytes
    return CalibrationOutcome(state.results, int((~heldout).sum()), int(heldout.sum()),
                              options.positions, spilled, state.timing)


class _PassState:
    """One calibration pass's state, shared by both modes: the cut tensors of the original
    network (``orig``) and of the decomposed one (``approx``; the same arrays until a layer is
    decomposed), the segments, the held-out mask, the main thread's timings and the results."""

    def __init__(self, model: onnx.ModelProto, layers: list[ConvLayer], infos: dict[str, TensorInfo],
                 options: CalibrationOptions, fixed_batch: int | None, heldout: np.ndarray, n: int, tmp: str):
        self.model, self.layers, self.infos, self.options, self.heldout = model, layers, infos, options, heldout
        self.fixed_batch = fixed_batch
        self.batch = fixed_batch or options.batch_size
        self.timing = {"load_data": 0.0, "forward": 0.0, "statistics": 0.0, "solve": 0.0}
        self.orig = TensorStore(options.memory_budget, tmp, n, self.batch, fixed_batch)
        self.approx = TensorStore(options.memory_budget, tmp, n, self.batch, fixed_batch)
        self.segments: list[Segment] = []
        self.results: dict[str, CalibratedLayer] = {}
        self.names: NameAllocator | None = None  # the probes' replacement names (made on the first probe)
        self.sample_free: set[str] = set()  # tensors without a sample axis (computed from unbatched inputs only)

    def shared(self) -> int:
        """Bytes both stores hold in memory (the spill budget is theirs together)."""
        return sum((self.orig.in_memory() | self.approx.in_memory()).values())

    def load(self, data: CalibrationData, tail: bool = False) -> None:
        """The graph inputs of every batch into the stores, and the segments between the layers
        (with ``tail``, the rest of the graph too: its inputs stay until the end, for the probes)."""
        t0 = time.perf_counter()
        for b, loaded in enumerate(data.iter_batches(self.batch, pad_to=self.fixed_batch)):
            for name, value in loaded.feeds.items():
                self.orig.put(name, b, value, self.shared)
        self.approx.values.update(self.orig.values)  # identical until the first decomposed layer
        self.sample_free = sample_free(self.model.graph, data.unbatched)
        self.timing["load_data"] = time.perf_counter() - t0
        self.segments = plan_segments(self.model, [layer.node_index for layer in self.layers], tail=tail)

    def advance(self, store: TensorStore, seg: Segment, replace=None) -> None:
        """Run ``seg`` (its first node replaced by ``replace``) over every batch into ``store``."""
        _advance(self.model, seg, self.infos, store, replace, self.batch, self.shared)

    def statistics(self, k: int, layer: ConvLayer) -> tuple[MomentSums, np.ndarray, np.ndarray, np.ndarray]:
        """Layer ``k``'s fit sums, its sampled positions and its inputs ``x``, ``x̂`` (one array
        when the decomposed network's input is the original's, always in the symmetric pass)."""
        t0 = time.perf_counter()
        x_in = self.orig.samples(layer.input)
        xhat_in = (x_in if self.options.symmetric or self.approx.values[layer.input] is self.orig.values[layer.input]
                   else self.approx.samples(layer.input))
        fit, positions = _layer_sums(layer, x_in, xhat_in, self.heldout, self.batch, self.options, k)
        self.timing["statistics"] += time.perf_counter() - t0
        return fit, positions, x_in, xhat_in

    def free(self, k: int) -> None:
        _free_cut_tensors(k, self.layers, self.segments, (self.orig, self.approx))

    def suffix_run(self, layer: ConvLayer, factors: SeparableFactors | ChannelFactors
                   ) -> Callable[[], list[dict[str, np.ndarray]]] | None:
        """``run_on()`` of :data:`ProbeFn` for ``layer``, or None when the part of the graph from
        it on reads a tensor the store does not hold per sample (a shape-derived one, or one
        computed from inputs without a sample axis, whose rows are no samples), misses a graph
        output, or the model's batch is fixed (its held-out rows would need padding)."""
        seg = suffix_segment(self.model, layer.node_index)
        held = self.orig.values
        if (self.fixed_batch is not None or set(seg.outputs) != {o.name for o in self.model.graph.output}
                or set(seg.inputs) & self.sample_free
                or not all(isinstance(held.get(name), np.ndarray) for name in seg.inputs)):
            return None
        rows = np.flatnonzero(self.heldout)

        def run_on() -> list[dict[str, np.ndarray]]:
            self.names = self.names or NameAllocator.for_model(self.model)
            replace = to_onnx_nodes(replacement_convs(Replacement(layer, factors), self.names))
            where = f"nodes {seg.start}.. of the model (a sensitivity probe)"
            session = _segment_session(self.model, seg, self.infos, replace, where)
            out = []
            for start in range(0, len(rows), self.batch):
                chunk = rows[start:start + self.batch]
                feeds = {name: np.asarray(held[name][chunk]) for name in seg.inputs}
                try:
                    out.append(run(session, feeds, list(seg.outputs)))
                except Exception as exc:  # onnxruntime's own exception types
                    raise CalibrationError(f"onnxruntime cannot run {where}: {first_line(exc)}") from exc
            return out
        return run_on


class _PendingSolve(NamedTuple):
    """A symmetric layer's solve in flight on the worker thread."""

    layer: ConvLayer
    future: Future
    heldout_error: Callable[[SeparableFactors | ChannelFactors], float]
    count: int

    def join(self, state: _PassState, probe: ProbeFn | None) -> None:
        """Wait for the factors (the main thread's wait is ``timing["solve"]``), record the
        layer and probe it (while the worker solves the next one)."""
        t0 = time.perf_counter()
        factors = self.future.result()
        state.timing["solve"] += time.perf_counter() - t0
        result = state.results[self.layer.name] = CalibratedLayer(factors, self.heldout_error(factors), self.count)
        if probe is not None:
            probe(self.layer, result, state.suffix_run(self.layer, factors))


def _symmetric_pass(state: _PassState, solve: SolveFn, probe: ProbeFn | None) -> None:
    """x̂ = x: no layer's statistics depend on another's factors, so layer ``k`` is solved on the
    worker thread while this one runs the forward pass and the statistics of layer ``k + 1``,
    then probes layer ``k`` (at most two solves queued), all under one BLAS thread (see
    :func:`calibrate_and_solve`). Layer ``k``'s probe reads the cut tensors at its conv: they
    stay in the store until the probe is done."""
    pending: _PendingSolve | None = None
    steps = Steps("calibrate: layer", len(state.layers))
    with ThreadPoolExecutor(max_workers=1) as worker, one_blas_thread():
        for k, (layer, seg) in enumerate(zip(state.layers, state.segments)):
            steps.step(k, layer.name)
            t0 = time.perf_counter()
            state.advance(state.orig, seg)  # the decomposed network is not needed
            state.timing["forward"] += time.perf_counter() - t0

            fit, positions, x_in, xhat_in = state.statistics(k, layer)  # xhat_in is x_in
            t0 = time.perf_counter()
            fit_stats = fit.stats()
            heldout_error = heldout_measure(HeldoutPatches(layer, x_in, x_in, state.heldout, positions, state.batch))
            state.timing["statistics"] += time.perf_counter() - t0
            previous, pending = pending, _PendingSolve(
                layer, worker.submit(contextvars.copy_context().run, solve, layer, fit_stats, heldout_error),
                heldout_error, fit.count)
            if previous is not None:
                previous.join(state, probe)
            del x_in, xhat_in, fit_stats, heldout_error, previous  # the cut tensors and patches can go
            state.free(k)
        if pending is not None:
            pending.join(state, probe)


def _asymmetric_pass(state: _PassState, solve: SolveFn, known: dict[str, CalibratedLayer]) -> None:
    """Each layer against the decomposed network's input: the factors of every layer are in
    place in the decomposed copy before the next layer's statistics are gathered. The original
    network's next segment does not depend on this layer's factors: it runs on the worker thread
    while this layer is solved (the solve keeps BLAS on one thread, onnxruntime releases the GIL)
    and is joined before any store is touched again."""
    names = NameAllocator.for_model(state.model)
    previous: Replacement | None = None
    ahead: Future | None = None
    steps = Steps("calibrate: layer", len(state.layers))
    with ThreadPoolExecutor(max_workers=1) as worker:
        for k, (layer, seg) in enumerate(zip(state.layers, state.segments)):
            steps.step(k, layer.name)
            t0 = time.perf_counter()
            replace = None if previous is None else to_onnx_nodes(replacement_convs(previous, names))
            if ahead is None:
                state.advance(state.orig, seg)
            if replace is None and all(state.approx.values[i] is state.orig.values[i] for i in seg.inputs):
                state.approx.values.update({o: state.orig.values[o] for o in seg.outputs})  # nothing decomposed yet
            else:
                state.advance(state.approx, seg, replace)
            state.timing["forward"] += time.perf_counter() - t0

            reused = known.get(layer.name)  # solved against the same earlier factors: no statistics
            if reused is None:
                fit, positions, x_in, xhat_in = state.statistics(k, layer)
            ahead = None
            if k + 1 < len(state.segments):  # the job's providers go with the context (runtime.py)
                ahead = worker.submit(contextvars.copy_context().run, state.advance, state.orig, state.segments[k + 1])
            if reused is not None:
                state.results[layer.name] = reused
            else:
                t0 = time.perf_counter()
                fit_stats = fit.stats()
                heldout_error = heldout_measure(HeldoutPatches(layer, x_in, xhat_in, state.heldout, positions,
                                                               state.batch))
                factors = solve(layer, fit_stats, heldout_error)
                state.timing["solve"] += time.perf_counter() - t0
                state.results[layer.name] = CalibratedLayer(factors, heldout_error(factors), fit.count)
                del x_in, xhat_in, fit_stats
            previous = Replacement(layer, state.results[layer.name].factors)
            if ahead is not None:
                t0 = time.perf_counter()
                ahead.result()
                state.timing["forward"] += time.perf_counter() - t0
            state.free(k)


def _free_cut_tensors(k: int, layers: list[ConvLayer], segments: list[Segment], stores) -> None:
    """After layer ``k``: drop the cut tensors no later segment or layer reads (keeping what the
    worker just made). A later layer's input need not be read by any segment: the last layer's
    conv is in none, and its input may come from an earlier segment."""
    alive = {later.input for later in layers[k + 1:]}
    if k + 1 < len(segments):
        alive |= _passthrough(segments, k + 1) | set(segments[k + 1].outputs)
    for store in stores:
        for name in [nm for nm in store.values if nm not in alive]:
            del store.values[name]


def _passthrough(segments: list[Segment], k: int) -> set[str]:
    """Cut tensors read by segment ``k`` or later (so they must survive until then)."""
    names: set[str] = set()
    for seg in segments[k:]:
        names |= set(seg.inputs)
    return names


def _segment_session(model, seg: Segment, infos, replace, where: str):
    """An onnxruntime session of ``seg`` (its first node replaced by ``replace``); ``where`` names
    it in the error."""
    try:
        return make_session(segment_model(model, seg, infos, replace))
    except Exception as exc:  # onnxruntime's own exception types
        raise CalibrationError(f"onnxruntime cannot load {where}: {first_line(exc)}") from exc


def _advance(model, seg: Segment, infos, store: TensorStore, replace, batch: int, shared) -> None:
    """Run one segment over all calibration batches, adding its output cut tensors to ``store``."""
    if seg.stop == seg.start or not seg.outputs:
        return
    where = f"nodes {seg.start}..{seg.stop - 1} of the model on calibration batches of {batch}"
    session = _segment_session(model, seg, infos, replace, where)
    outs = list(seg.outputs)
    for b in range(len(store.ranges)):
        feeds = {name: store.batch(name, b) for name in seg.inputs}
        try:
            values = run(session, feeds, outs)
        except Exception as exc:  # onnxruntime's own exception types
            raise CalibrationError(f"onnxruntime cannot run {where}: {first_line(exc)} "
                                   f"(a model that only runs at batch 1 needs --batch-size 1)") from exc
        for name, value in values.items():
            store.put(name, b, value, shared, per_batch=name in seg.per_batch)


def _layer_sums(layer: ConvLayer, x_all: np.ndarray, xhat_all: np.ndarray, heldout: np.ndarray,
                batch: int, options: CalibrationOptions, k: int) -> tuple[MomentSums, np.ndarray]:
    """Moment sums over the fit samples, and the seeded output positions of every sample."""
    n, _, h, w = x_all.shape
    oh, ow = output_hw(layer, (h, w))
    total = oh * ow
    rng = np.random.default_rng([options.seed, k])
    per_image = positions_per_sample(options.positions, total, layer.weight.size // layer.weight.shape[0],
                                     int((~heldout).sum()))
    if per_image == total:
        positions = np.broadcast_to(np.arange(total), (n, total))
    else:
        positions = np.argsort(rng.random((n, total)), axis=1)[:, :per_image]
    fit = MomentSums(layer.weight, symmetric=options.symmetric)
    fit_index = np.flatnonzero(~heldout)
    for start in range(0, len(fit_index), batch):
        rows = fit_index[start:start + batch]
        x, x_hat = patch_pair(layer, x_all, xhat_all, rows, positions)
        fit.add(x, x_hat)
    return fit, positions
