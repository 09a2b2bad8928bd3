r"""Calibration: run data through onnxruntime and gather each conv's input statistics.

Multi-layer (asymmetric) correction needs, for layer ``k``, its input ``x`` in the original
network and ``x̂`` in the network whose layers ``< k`` are already decomposed. Running the
whole network once per layer would cost K passes. Instead the graph is cut just before every
candidate conv into *segments*; the tensors alive across a cut (the conv's input and any skip
connection) are kept for all samples, once for the original network and once for the
decomposed one. Segment ``k`` runs from the previous cut (starting with layer ``k−1``, which
the decomposed copy replaces by its new two-conv form) to the next, so the total work is about
one pass of each network plus the solves. Cut tensors go to memory-mapped files in a private
temporary folder once they exceed a memory budget. Segments are in-memory models whose cut
tensors are graph outputs, so onnxruntime's graph optimisations (fusions, layout changes) can
stay on: they never remove a graph output (about 20 % faster than with optimisations off).

Cut tensors, by dataflow (:func:`plan_segments`, :class:`TensorStore`):

- *static*: no graph input reaches them (``Constant`` weights, casts of initializers). Each
  segment recomputes them (:func:`static_producers`).
- *shape-derived*: graph inputs reach them only through inputs that an op reads for their
  metadata, never their values — the shape (``Shape``, ``Size``, ``EyeLike``) or the element
  type (``CastLike``'s second input). These are the ``Shape → Gather → Cast/Mul → Range/
  Reshape/Expand/ConstantOfShape/Concat`` chains and 0-d scalars of torch.onnx exports. They
  carry no sample axis but may depend on the batch's row count (``Shape(x)[0]``): kept *per
  batch*, one value per calibration batch. They are computed for both networks, not shared: a
  shape can depend on values (``NonZero``, a ``Reshape`` to a computed target).
- the rest depend on the data: kept *per sample*, one array with sample ``i`` in row ``i``,
  while every batch's value has that batch's row count (padded count included) as its leading
  dimension and the same trailing shape; otherwise — a sample axis elsewhere, like an RNN's
  (T, N, C) output, or none, like a reduction over the batch — per batch too.

Segments run the same batches in the same order, so either way a segment is fed exactly what
the previous one computed for that batch, the padding rows of a fixed-batch model's last batch
included. A decomposed conv's input must come out per sample, since the statistics read it row
by row; it is never made per batch for being shape-derived (a Conv's axis 0 is its batch axis,
e.g. a parameter expanded to the batch), and one that is not per sample stops calibration with
a :class:`~onnx_dwdecomp.errors.CalibrationError`.

Statistics, not activations: at ``positions`` seeded output positions per sample we gather the
patch vectors (length ``C_in·kh·kw``; statistics come out channel-major like the conv weight) and accumulate
running sums (float64) — ``Σx``, ``Σx̂``, ``Σx̂x̂ᵀ``, ``Σ(Wx)x̂ᵀ``, ``ΣWx``, ``Σ‖Wx‖²`` — from
which :class:`~onnx_dwdecomp.solve.LayerStats` follows (``Σx̂x̂ᵀ`` by a symmetric rank-m update;
in the symmetric pass the response sums follow from ``Σxxᵀ``, see :class:`MomentSums`). A seeded
held-out share of the samples is left out of the sums; after the solve, each layer's response
error is measured directly on the held-out patches (:func:`heldout_response_error`; gathered
once per layer, :class:`HeldoutPatches`, however many candidates are measured).
"""

from __future__ import annotations

import contextvars
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .data.dataset import CalibrationData
from .candidates import ConvLayer
from .errors import CalibrationError, first_line
from .graph import node_reads, subgraph_reads
from .resources import CUT_BUDGET
from .rewrite import NameAllocator, Replacement, replacement_convs, to_onnx_nodes
from .runtime import make_session, run
from .shapes import TensorInfo
from .solve import ChannelFactors, LayerStats, SeparableFactors, one_blas_thread


# --------------------------------------------------------------------------- patch geometry

def effective_pads(layer: ConvLayer, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) zero padding actually applied, resolving ``auto_pad``."""
    if layer.auto_pad in ("", "NOTSET"):
        return layer.pads
    if layer.auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for size, k, s, d in zip(in_hw, layer.kernel, layer.strides, layer.dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        if layer.auto_pad == "SAME_UPPER":
            begin.append(small), end.append(total - small)
        else:
            begin.append(total - small), end.append(small)
    return (begin[0], begin[1], end[0], end[1])


def output_hw(layer: ConvLayer, in_hw: tuple[int, int]) -> tuple[int, int]:
    top, left, bottom, right = effective_pads(layer, in_hw)
    return tuple(
        (size + p0 + p1 - (k - 1) * d - 1) // s + 1
        for size, p0, p1, k, s, d in zip(in_hw, (top, left), (bottom, right), layer.kernel, layer.strides,
                                         layer.dilations)
    )


def extract_patches(x: np.ndarray, layer: ConvLayer, positions: np.ndarray) -> np.ndarray:
    """Patch vectors of ``x`` (B, C, H, W) at flat output positions ``positions`` (B, P).

    Returns (B·P, kh·kw·C), *tap-major*: entry ``k·C + i`` is tap ``k`` of channel ``i`` — the
    order the gather produces, so no transposed copy is made. :class:`MomentSums` takes rows
    in this order and returns channel-major moments (``i·K + k``, like ``W.reshape(n, -1)``).
    """
    bsz, c, h, w = x.shape
    top, left, bottom, right = effective_pads(layer, (h, w))
    _, ow = output_hw(layer, (h, w))
    # A contiguous zero-padded NHWC copy: gathering whole channel vectors is about 2× faster
    # than gathering from a transposed NCHW view.
    nhwc = np.zeros((bsz, h + top + bottom, w + left + right, c), dtype=x.dtype)
    nhwc[:, top:top + h, left:left + w] = x.transpose(0, 2, 3, 1)
    kh, kw = layer.kernel
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    oy, ox = np.divmod(positions, ow)  # (B, P)
    ky, kx = np.divmod(np.arange(kh * kw), kw)  # (K,)
    rows = oy[:, :, None] * sh + ky * dh  # (B, P, K)
    cols = ox[:, :, None] * sw + kx * dw
    batch = np.arange(bsz)[:, None, None]
    patches = nhwc[batch, rows, cols]  # (B, P, K, C)
    return patches.reshape(bsz * positions.shape[1], -1)


# ----------------------------------------------------------------------------- running sums

def tap_major(weight: np.ndarray) -> np.ndarray:
    """A conv weight (n, C, kh, kw) as the (n, kh·kw·C) matrix that acts on tap-major patches."""
    n, c = weight.shape[:2]
    return np.ascontiguousarray(weight.reshape(n, c, -1).transpose(0, 2, 1)).reshape(n, -1)


class MomentSums:
    """Running float64 sums of patch pairs (x, x̂) for one conv with weight ``W`` (n, C, kh, kw).

    Rows are tap-major (see :func:`extract_patches`); :meth:`stats` reorders to channel-major.

    Per batch of ``m`` rows the products are float32 and the running sums float64. ``Σx̂x̂ᵀ`` is
    ``x̂ᵀx̂``, which numpy's matmul hands to BLAS ``syrk`` (a symmetric rank-m update: one
    triangle, half the multiply-adds of a general product, mirrored into the other; about
    0.55–0.6× the time of the general product measured here).

    ``symmetric=True`` (the symmetric pass: every batch has ``x_hat is x``): the response
    moments are not accumulated row by row — ``Σ(Wx)xᵀ = W·Σxxᵀ``, ``ΣWx = W·Σx`` and
    ``Σ‖Wx‖² = ⟨W·Σxxᵀ, W⟩`` follow from the input moments once, in float64 (n·D² work per
    layer instead of 2·n·D per row; equal up to float32 round-off). A batch with
    ``x_hat is not x`` turns those into running sums and continues row by row. Without it
    every batch is summed row by row (the asymmetric pass, whose results stay bit for bit as
    they were: its L-BFGS solves amplify round-off differences, see tests/test_calibrate.py).
    """

    def __init__(self, weight: np.ndarray, symmetric: bool = False):
        n, c = weight.shape[:2]
        k = int(np.prod(weight.shape[2:]))
        self.shape = (n, c, k)
        self.w = tap_major(np.asarray(weight, dtype=np.float32))
        d = c * k
        self.count = 0
        #: the response sums are derived from ``Σxxᵀ`` in :meth:`stats` (every batch had ``x_hat is x``)
        self.symmetric = symmetric
        self.sum_x = np.zeros(d)
        self.sum_xhat = np.zeros(d)
        self.sum_xhat_xhat = np.zeros((d, d))
        self.sum_y_xhat = np.zeros((n, d))
        self.sum_y = np.zeros(n)
        self.sum_y_sq = 0.0

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """Accumulate rows of ``x`` and ``x_hat`` (m, D), float32 products per batch."""
        if not len(x):
            return
        if x_hat is x and self.symmetric:
            s = x.sum(axis=0, dtype=np.float64)
            self.sum_x += s
            self.sum_xhat += s
        else:
            if self.symmetric and self.count:
                self._response_from_moments()
            self.symmetric = False
            y = x @ self.w.T
            self.sum_x += x.sum(axis=0, dtype=np.float64)
            self.sum_xhat += x_hat.sum(axis=0, dtype=np.float64)
            self.sum_y_xhat += y.T @ x_hat
            self.sum_y += y.sum(axis=0, dtype=np.float64)
            self.sum_y_sq += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.count += len(x)
        self.sum_xhat_xhat += x_hat.T @ x_hat  # BLAS syrk (see the class docstring)

    def _response(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(Σ(Wx)xᵀ, ΣWx, Σ‖Wx‖²)`` of the symmetric batches so far, from ``Σxxᵀ`` and ``Σx``."""
        w = self.w.astype(np.float64)
        wf = w @ self.sum_xhat_xhat
        return wf, w @ self.sum_x, float(np.vdot(wf, w))

    def _response_from_moments(self) -> None:
        wf, sy, syy = self._response()
        self.sum_y_xhat += wf
        self.sum_y += sy
        self.sum_y_sq += syy

    def stats(self) -> LayerStats:
        """Centred moments: ``Cov = Σ/m − μμᵀ``."""
        _, c, k = self.shape
        d = c * k
        m = max(self.count, 1)

        def channel_major(v: np.ndarray) -> np.ndarray:  # (…, K·C) tap-major → (…, C·K)
            return v.reshape(v.shape[:-1] + (k, c)).swapaxes(-1, -2).reshape(v.shape[:-1] + (d,))

        if self.symmetric:
            sum_y_xhat, sum_y, sum_y_sq = self._response()
        else:
            sum_y_xhat, sum_y, sum_y_sq = self.sum_y_xhat, self.sum_y, self.sum_y_sq
        mx, mxh, my = channel_major(self.sum_x) / m, channel_major(self.sum_xhat) / m, sum_y / m
        # Σx̂x̂ᵀ comes from syrk (both triangles written alike) and μμᵀ is symmetric too, so
        # the covariance is exactly symmetric without averaging it with its transpose.
        cov = np.ascontiguousarray(self.sum_xhat_xhat.reshape(k, c, k, c).transpose(1, 0, 3, 2)).reshape(d, d)
        cov /= m
        cov -= np.outer(mxh, mxh)
        cross = channel_major(sum_y_xhat) / m
        cross -= np.outer(my, mxh)
        var = max(sum_y_sq / m - float(my @ my), 0.0)
        return LayerStats(self.count, mx, mxh, cov, cross, var)


# ------------------------------------------------------------------------------- segments

@dataclass(frozen=True)
class Segment:
    """Nodes ``[start, stop)`` of the graph, with the cut tensors they read and write.

    ``static_nodes`` are earlier nodes whose outputs do not depend on any graph input
    (``Constant`` weights as Paddle2ONNX writes them, casts of initializers): the segment
    model recomputes them instead of storing them per sample as cut tensors. ``per_batch``
    are the shape-derived ``outputs``, kept per batch whatever their shape (module docstring).
    """

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    static_nodes: tuple[int, ...] = ()
    per_batch: tuple[str, ...] = ()


#: Ops whose output differs between runs even without inputs: never treated as static.
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def static_producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name → index of the node producing it, for outputs computable without graph inputs."""
    known = {t.name for t in graph.initializer}
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in _RANDOM_OPS and node_reads(node) <= known:
            for out in node.output:
                if out:
                    known.add(out)
                    producers[out] = index
    return producers


#: Inputs (by position) an op reads only the metadata of, its shape or element type, never its values.
_METADATA_INPUTS = {"Shape": (0,), "Size": (0,), "EyeLike": (0,), "CastLike": (1,)}


def shape_derived(graph: onnx.GraphProto) -> set[str]:
    """Node outputs that graph inputs reach only through metadata reads (see the module docstring).

    One pass in graph order: a node's outputs depend on the data when it reads a data-dependent
    tensor's values (subgraphs' outer-scope reads count as value reads) or is random; otherwise,
    unless static, they are shape-derived.
    """
    data = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    static = set(static_producers(graph))
    derived: set[str] = set()
    for node in graph.node:
        outputs = {o for o in node.output if o}
        if outputs <= static:
            continue
        metadata = _METADATA_INPUTS.get(node.op_type, ())
        values = {name for pos, name in enumerate(node.input) if name and pos not in metadata}
        if node.op_type in _RANDOM_OPS or (values | subgraph_reads(node)) & data:
            data |= outputs
        else:
            derived |= outputs
    return derived


def _static_closure(names: set[str], graph: onnx.GraphProto, producers: dict[str, int]) -> set[int]:
    """Indices of the static nodes needed to compute ``names``."""
    needed: set[int] = set()
    todo = [producers[n] for n in names if n in producers]
    while todo:
        index = todo.pop()
        if index not in needed:
            needed.add(index)
            todo.extend(producers[r] for r in node_reads(graph.node[index]) if r in producers)
    return needed


def plan_segments(model: onnx.ModelProto, cuts: list[int]) -> list[Segment]:
    """Segments between successive cut positions (node indices; a cut sits before its node).

    The first input of a node at a cut (a decomposed conv's input) is never ``per_batch``.
    """
    graph = model.graph
    producers = static_producers(graph)
    per_batch = shape_derived(graph) - {graph.node[stop].input[0] for stop in cuts}
    constants = {t.name for t in graph.initializer} | set(producers)
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node_reads(node):
            last_use[name] = index
    for out in graph.output:
        last_use[out.name] = len(graph.node)
    segments = []
    start = 0
    for stop in cuts:
        nodes = graph.node[start:stop]
        produced = {o for n in nodes for o in n.output if o}
        reads = set().union(*(node_reads(n) for n in nodes)) if nodes else set()
        inputs = sorted(r for r in reads if r not in produced and r not in constants)
        outputs = sorted(p for p in produced if last_use.get(p, -1) >= stop and p not in producers)
        static = _static_closure({r for r in reads if r not in produced}, graph, producers)
        segments.append(Segment(start, stop, tuple(inputs), tuple(outputs), tuple(sorted(static)),
                                tuple(o for o in outputs if o in per_batch)))
        start = stop
    return segments


def segment_model(model: onnx.ModelProto, seg: Segment, infos: dict[str, TensorInfo],
                  replace: tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None = None) -> onnx.ModelProto:
    """A standalone model of ``seg``; ``replace`` substitutes the segment's first node."""
    nodes = list(model.graph.node[seg.start:seg.stop])
    extra_inits: list[onnx.TensorProto] = []
    if replace is not None:
        new_nodes, extra_inits = replace
        nodes = new_nodes + nodes[1:]
    nodes = [model.graph.node[i] for i in seg.static_nodes] + nodes
    reads = set().union(*(node_reads(n) for n in nodes))
    inits = [t for t in model.graph.initializer if t.name in reads] + extra_inits

    def value_info(name: str) -> onnx.ValueInfoProto:
        info = infos.get(name)
        if info is None or info.dtype is None:
            raise CalibrationError(f"cannot determine the type of tensor {name!r} (shape inference "
                                   f"gave nothing); calibration needs typed intermediate tensors")
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(info.dtype), None)

    graph = helper.make_graph(nodes, f"segment_{seg.start}_{seg.stop}",
                              [value_info(n) for n in seg.inputs], [value_info(n) for n in seg.outputs],
                              initializer=inits)
    seg_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    seg_model.ir_version = model.ir_version
    seg_model.functions.extend(model.functions)
    return seg_model


class _PerBatch(list):
    """A tensor's values kept per batch, in batch order; ``nbytes``: those held in memory."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0


class TensorStore:
    """One network's cut tensors, batch by batch exactly as the segments computed them.

    Batch ``b`` covers ``ranges[b] = (start, rows)``: samples from ``start`` on, ``rows`` rows
    (beyond its samples only when a fixed-batch model pads the last batch). A per-sample tensor
    is one array of the batches' values stacked along axis 0 (sample ``i`` in row ``i``, padding
    rows last); a per-batch tensor is the list of its values (:class:`_PerBatch`). Which one a
    tensor gets: module docstring. Arrays go to memory-mapped files in a private temporary
    folder once the bytes in memory (both stores together, ``shared()``) would pass the budget.
    """

    def __init__(self, budget: int, tmp_dir: str, n: int, batch: int, fixed_batch: int | None):
        self.values: dict[str, np.ndarray | _PerBatch] = {}
        self.n = n
        self.ranges = [(start, fixed_batch or min(batch, n - start)) for start in range(0, n, batch)]
        self.rows = self.ranges[-1][0] + self.ranges[-1][1]
        self.budget = budget
        self.tmp_dir = tmp_dir
        self.spilled_bytes = 0  # everything ever written to disk

    def in_memory(self) -> dict[int, int]:
        """id → bytes held in memory, per tensor (ids: the two stores share values at first)."""
        return {id(v): v.nbytes for v in self.values.values() if not isinstance(v, np.memmap)}

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype, shared_bytes: Callable[[], int]) -> np.ndarray:
        """An uninitialised array, memory-mapped if it would take the bytes in memory past the
        budget — unless it is smaller than a page, which a file of its own would not save."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes >= mmap.PAGESIZE and shared_bytes() + nbytes > self.budget:
            fd, path = tempfile.mkstemp(dir=self.tmp_dir, suffix=".bin")  # unique across both stores
            os.close(fd)
            arr = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
            try:
                os.unlink(path)  # POSIX: the mapping stays valid, the space goes when the array is freed
            except OSError:
                pass  # elsewhere the file goes with the temporary folder
            self.spilled_bytes += nbytes
        else:
            arr = np.empty(shape, dtype=dtype)
        return arr

    def put(self, name: str, b: int, value: np.ndarray, shared_bytes: Callable[[], int],
            per_batch: bool = False) -> None:
        """Keep tensor ``name``'s ``value`` in batch ``b`` (a tensor's batches arrive in order from 0).

        Unless ``per_batch``, the tensor is kept per sample as long as every value has its
        batch's ``rows`` rows and the first value's trailing shape; the first value that does
        not turns the rows stacked so far back into the earlier batches' values.
        """
        start, rows = self.ranges[b]
        held = self.values.get(name) if b else None
        per_sample = not per_batch and value.shape[:1] == (rows,)
        if held is None:
            held = (self.allocate((self.rows,) + value.shape[1:], value.dtype, shared_bytes) if per_sample
                    else _PerBatch())
        elif not isinstance(held, _PerBatch) and not (per_sample and value.shape[1:] == held.shape[1:]):
            stacked, held = held, _PerBatch()
            for s, r in self.ranges[:b]:
                self._append(held, stacked[s:s + r], shared_bytes)
        self.values[name] = held
        if isinstance(held, _PerBatch):
            self._append(held, value, shared_bytes)
        else:
            held[start:start + rows] = value

    def _append(self, held: _PerBatch, value: np.ndarray, shared_bytes: Callable[[], int]) -> None:
        arr = self.allocate(value.shape, value.dtype, shared_bytes)
        arr[...] = value
        held.append(arr)
        if not isinstance(arr, np.memmap):
            held.nbytes += arr.nbytes

    def batch(self, name: str, b: int) -> np.ndarray:
        """Tensor ``name`` in batch ``b``, as computed."""
        held = self.values[name]
        if isinstance(held, _PerBatch):
            return held[b]
        start, rows = self.ranges[b]
        return np.asarray(held[start:start + rows])

    def samples(self, name: str) -> np.ndarray:
        """A per-sample tensor's rows of the ``n`` real samples (for the statistics)."""
        held = self.values[name]
        if isinstance(held, _PerBatch):
            shapes = ", ".join(str(s) for s in dict.fromkeys(v.shape for v in held))
            rows = "/".join(str(r) for r in sorted({r for _, r in self.ranges}, reverse=True))
            raise CalibrationError(
                f"tensor {name!r}, a decomposed conv's input, has no row per calibration sample: on "
                f"batches of {rows} rows its values have shapes {shapes}, so its statistics cannot be "
                f"gathered; leave that conv out with --exclude")
        return held[:self.n]


# ----------------------------------------------------------------------------- the driver

#: ``solve(layer, fit_stats, heldout_error)``: factors from the fit statistics;
#: ``heldout_error(factors)`` measures any candidate on the held-out patches (plan.py's curves).
SolveFn = Callable[[ConvLayer, LayerStats, Callable[["SeparableFactors | ChannelFactors"], float]],
                   "SeparableFactors | ChannelFactors"]


@dataclass(frozen=True)
class CalibrationOptions:
    batch_size: int = 32
    positions: int | None = 64  # None = all output positions
    holdout: float = 0.1
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


#: With few samples at least this many are held out (when they are at most a quarter of all).
MIN_HELDOUT = 4


def split_holdout(n: int, fraction: float, seed: int, energy: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the held-out samples.

    ``k = max(round(fraction·n), min(MIN_HELDOUT, n // 4))``, at least 1 and at most ``n − 1``:
    10 % of many samples, but never a single image out of 8 or 24 when a few more can be spared.
    With ``energy`` (each sample's output power, normalised per feature) the samples are taken
    systematically over its ranks — ``k`` evenly spaced ranks from a seeded offset — so the
    held-out set spans quiet and busy inputs (a text detector's held-out image is not only a
    photo without text); without it, a seeded random choice.
    """
    if n < 2:
        raise CalibrationError(f"calibration needs at least 2 samples (one is held out for "
                               f"verification), got {n}")
    k = min(max(1, int(round(fraction * n)), min(MIN_HELDOUT, n // 4)), n - 1)
    rng = np.random.default_rng(seed)
    if energy is None:
        chosen = rng.permutation(n)[:k]
    else:
        ranks = np.argsort(np.asarray(energy, dtype=np.float64), kind="stable")
        chosen = ranks[((np.arange(k) + rng.random()) * n / k).astype(int)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def calibrate_and_solve(model: onnx.ModelProto, layers: list[ConvLayer], data: CalibrationData,
                        infos: dict[str, TensorInfo], solve: SolveFn, options: CalibrationOptions,
                        fixed_batch: int | None = None,
                        progress: Callable[[str], None] | None = None,
                        heldout: np.ndarray | None = None) -> CalibrationOutcome:
    """Decompose ``layers`` in graph order, each against statistics of the partially decomposed network.

    ``heldout`` is the mask of samples left out of the statistics (default :func:`split_holdout`).

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
    say = progress or (lambda _msg: None)
    layers = sorted(layers, key=lambda layer: layer.node_index)
    n = data.num_samples
    if heldout is None:
        heldout = split_holdout(n, options.holdout, options.seed)
    batch = fixed_batch or options.batch_size
    timing = {"load_data": 0.0, "forward": 0.0, "statistics": 0.0, "solve": 0.0}
    names = NameAllocator.for_model(model)

    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_calib_") as tmp:
        orig = TensorStore(options.memory_budget, tmp, n, batch, fixed_batch)
        approx = TensorStore(options.memory_budget, tmp, n, batch, fixed_batch)

        def shared() -> int:
            return sum((orig.in_memory() | approx.in_memory()).values())

        t0 = time.perf_counter()
        for b, loaded in enumerate(data.iter_batches(batch, pad_to=fixed_batch)):
            for name, value in loaded.feeds.items():
                orig.put(name, b, value, shared)
        approx.values.update(orig.values)  # identical until the first decomposed layer
        timing["load_data"] = time.perf_counter() - t0

        segments = plan_segments(model, [layer.node_index for layer in layers])
        results: dict[str, CalibratedLayer] = {}
        previous: Replacement | None = None
        # Asymmetric: the original network's next segment does not depend on this layer's
        # factors: it runs on a worker thread while this layer is solved (the solve keeps BLAS on
        # one thread, onnxruntime releases the GIL), and is joined before any store is touched
        # again. Symmetric: the solves run on the worker thread instead (see the docstring).
        pending: tuple[ConvLayer, Future, Callable, int] | None = None

        def finish_pending() -> None:
            """Join the symmetric solve in flight and record its layer."""
            nonlocal pending
            if pending is not None:
                done, future, measure, count = pending
                t0 = time.perf_counter()
                factors = future.result()
                timing["solve"] += time.perf_counter() - t0
                results[done.name] = CalibratedLayer(factors, measure(factors), count)
                pending = None

        with ThreadPoolExecutor(max_workers=1) as worker, \
                (one_blas_thread() if options.symmetric else nullcontext()):
            ahead: Future | None = None
            for k, (layer, seg) in enumerate(zip(layers, segments)):
                say(f"calibrate: layer {k + 1}/{len(layers)} {layer.name}")
                t0 = time.perf_counter()
                replace = None
                if previous is not None:
                    replace = to_onnx_nodes(replacement_convs(previous, names))
                if ahead is None:
                    _advance(model, seg, infos, orig, None, batch, shared)
                if options.symmetric:
                    pass  # x̂ = x: the decomposed network is not needed
                elif replace is None and all(approx.values[i] is orig.values[i] for i in seg.inputs):
                    approx.values.update({o: orig.values[o] for o in seg.outputs})  # nothing decomposed yet
                else:
                    _advance(model, seg, infos, approx, replace, batch, shared)
                timing["forward"] += time.perf_counter() - t0

                t0 = time.perf_counter()
                x_in = orig.samples(layer.input)
                xhat_in = (x_in if options.symmetric or approx.values[layer.input] is orig.values[layer.input]
                           else approx.samples(layer.input))
                fit, positions = _layer_sums(layer, x_in, xhat_in, heldout, batch, options, k)
                timing["statistics"] += time.perf_counter() - t0

                if options.symmetric:
                    t0 = time.perf_counter()
                    fit_stats = fit.stats()
                    heldout_error = _heldout_measure(HeldoutPatches(layer, x_in, xhat_in, heldout, positions, batch))
                    timing["statistics"] += time.perf_counter() - t0
                    finish_pending()
                    pending = (layer, worker.submit(contextvars.copy_context().run, solve, layer, fit_stats,
                                                    heldout_error), heldout_error, fit.count)
                    del x_in, xhat_in, fit_stats, heldout_error
                    _free_cut_tensors(k, layers, segments, (orig, approx))
                    continue

                ahead = None
                if k + 1 < len(segments):
                    ahead = worker.submit(contextvars.copy_context().run,  # the job's providers (runtime.py)
                                           _advance, model, segments[k + 1], infos, orig, None, batch, shared)
                t0 = time.perf_counter()
                fit_stats = fit.stats()
                heldout_error = _heldout_measure(HeldoutPatches(layer, x_in, xhat_in, heldout, positions, batch))

                factors = solve(layer, fit_stats, heldout_error)
                timing["solve"] += time.perf_counter() - t0
                err = heldout_error(factors)
                results[layer.name] = CalibratedLayer(factors, err, fit.count)
                previous = Replacement(layer, factors)
                if ahead is not None:
                    t0 = time.perf_counter()
                    ahead.result()
                    timing["forward"] += time.perf_counter() - t0
                _free_cut_tensors(k, layers, segments, (orig, approx))
            finish_pending()
        spilled = orig.spilled_bytes + approx.spilled_bytes
    return CalibrationOutcome(results, int((~heldout).sum()), int(heldout.sum()),
                              options.positions, spilled, timing)


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


def _heldout_measure(patches: HeldoutPatches) -> Callable[[SeparableFactors | ChannelFactors], float]:
    """``heldout_error(factors)`` for one layer's held-out patches; the last factors' error is
    remembered (the driver re-measures the factors a solve returns)."""
    last: list = [None, 0.0]

    def heldout_error(factors: SeparableFactors | ChannelFactors) -> float:
        if last[0] is not factors:
            last[:] = [factors, patches.error(factors)]
        return last[1]
    return heldout_error


def _passthrough(segments: list[Segment], k: int) -> set[str]:
    """Cut tensors read by segment ``k`` or later (so they must survive until then)."""
    names: set[str] = set()
    for seg in segments[k:]:
        names |= set(seg.inputs)
    return names


def _advance(model, seg: Segment, infos, store: TensorStore, replace, batch: int, shared) -> None:
    """Run one segment over all calibration batches, adding its output cut tensors to ``store``."""
    if seg.stop == seg.start or not seg.outputs:
        return
    where = f"nodes {seg.start}..{seg.stop - 1} of the model on calibration batches of {batch}"
    try:
        session = make_session(segment_model(model, seg, infos, replace))
    except Exception as exc:  # onnxruntime's own exception types
        raise CalibrationError(f"onnxruntime cannot load {where}: {first_line(exc)}") from exc
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


#: Fit patches wanted per patch dimension D = C_in·kh·kw: the D×D moments need well over D
#: patches to be full rank; below that the ridge decides the solution instead of the data.
PATCHES_PER_DIM = 4


def positions_per_sample(positions: int | None, total: int, dim: int, fit_samples: int) -> int:
    """Output positions sampled per image: at least ``positions`` (None = all), raised so the fit
    samples give ``PATCHES_PER_DIM · dim`` patches, capped at all ``total`` positions."""
    if positions is None:
        return total
    wanted = -(-PATCHES_PER_DIM * dim // max(fit_samples, 1))
    return min(total, max(positions, wanted))


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
        x, x_hat = _patch_pair(layer, x_all, xhat_all, rows, positions)
        fit.add(x, x_hat)
    return fit, positions


def _patch_pair(layer: ConvLayer, x_all: np.ndarray, xhat_all: np.ndarray, rows: np.ndarray,
                positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patches of samples ``rows`` in the original and in the decomposed network (tap-major)."""
    x = extract_patches(np.asarray(x_all[rows], dtype=np.float32), layer, positions[rows])
    if xhat_all is x_all:
        return x, x
    return x, extract_patches(np.asarray(xhat_all[rows], dtype=np.float32), layer, positions[rows])


def heldout_response_error(layer: ConvLayer, factors: SeparableFactors | ChannelFactors, x_all: np.ndarray,
                           xhat_all: np.ndarray, heldout: np.ndarray, positions: np.ndarray, batch: int) -> float:
    """``E‖Wx + b − Ŵx̂ − b̂‖² / E‖Wx − E[Wx]‖²`` over the held-out samples' patches, computed
    directly (n·D work per patch) rather than from D×D moments."""
    return HeldoutPatches(layer, x_all, xhat_all, heldout, positions, batch).error(factors)


class HeldoutPatches:
    """One layer's held-out patches and original responses, gathered once for any number of
    candidate factors (:func:`heldout_response_error`; the plan's curves measure every offered
    multiplier of a layer). Same chunks, products and sums as measuring each candidate afresh."""

    def __init__(self, layer: ConvLayer, x_all: np.ndarray, xhat_all: np.ndarray, heldout: np.ndarray,
                 positions: np.ndarray, batch: int):
        n = layer.weight.shape[0]
        # float32 products like the moment sums; the sums below are float64
        w = tap_major(layer.weight).astype(np.float32)
        b = np.zeros(n, np.float32) if layer.bias is None else layer.bias.astype(np.float32)
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (x̂ patches, Wx + b)
        self.count, self.sum_y, self.sum_y_sq = 0, np.zeros(n), 0.0
        index = np.flatnonzero(heldout)
        for start in range(0, len(index), batch):
            x, x_hat = _patch_pair(layer, x_all, xhat_all, index[start:start + batch], positions)
            y = x @ w.T + b
            self.chunks.append((x_hat, y))
            self.count += len(y)
            self.sum_y += y.sum(axis=0, dtype=np.float64)
            self.sum_y_sq += float(np.einsum("ij,ij->", y, y, dtype=np.float64))

    def error(self, factors: SeparableFactors | ChannelFactors) -> float:
        if self.count == 0:
            return float("nan")
        w_hat = tap_major(factors.dense_weight()).astype(np.float32)
        b_hat = factors.bias.astype(np.float32)
        gap = 0.0
        for x_hat, y in self.chunks:
            diff = y - (x_hat @ w_hat.T + b_hat)
            gap += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        var = self.sum_y_sq / self.count - float(self.sum_y @ self.sum_y) / self.count ** 2
        err = gap / self.count
        if var <= 0:
            return 0.0 if err <= 1e-30 else float("inf")
        return err / var
