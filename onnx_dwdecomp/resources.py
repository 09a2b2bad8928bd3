"""The job's memory estimate: what a job needs, checked against what the machine has
(:mod:`onnx_dwdecomp.memory`) before anything large is allocated.

The job estimate (:func:`check_job`, after shape inference at the resolved input shapes and
before calibration, latency timing or verification allocates anything), in bytes::

    s(t)         bytes per sample of activation tensor t (shape inference; constants excluded)
    forward(b)   = b · max over nodes of Σ s(t) over the node's inputs and outputs
                   (the widest node's operands coexist in any runtime; onnxruntime reuses the
                   rest of its arena, so this is a floor, not a sum over the graph)
    weights      = 3 · W           W: the model's serialised size (working copy, rewritten copy,
                                   onnxruntime's copy)
    verify       = 2 · forward(b_v) + S·(I + 8·I_e) + S·(4·O + 24·O_e)
                   two sessions (input and rewritten model) at batch b_v; S verification samples
                   (held-out calibration samples, else RANDOM_SAMPLES random ones drawn in
                   float64); I, I_e: input bytes, elements per sample; O, O_e: output bytes,
                   elements per sample (both models' outputs kept, joined, compared in float64)
    calibrate    = 2 · forward(B) + min(2·N·X, 1 GiB) + S·O
                   + max over layers of [2·B·P_l·D_l·4 + N·T_l·16 + 8·(D_l² + n_l·D_l)]
                   B: --batch-size (or the model's fixed batch), N: samples (--calib-size),
                   X: largest conv input per sample (the cut tensors of both networks, spilled to
                   disk past 1 GiB), P_l: output positions sampled per image (--positions,
                   raised to 4·D_l / fit samples, at most T_l: positions_per_sample; T_l for
                   'all'), T_l: the layer's output positions, D_l = C·kh·kw, n_l output
                   channels (float32 patch pairs, seeded position draws, float64 moments);
                   S·O: the input model's outputs on the S held-out samples (kept for the
                   sensitivity probes and every round's verification)
    latency      = max over candidates of [x·(1 + 8/itemsize) + 2·(y + m)]
                   + 2 · threads · THREAD_BYTES
                   x, y, m: the conv's input, output and depthwise output at the resolved shapes
                   (random input drawn in float64; two probe sessions)
    peak         = weights + max(verify, calibrate, latency)

The estimate is a floor, not a bound: it counts the arrays the job must hold at once, not the
interpreter, onnxruntime's arena slack or numpy temporaries. A job whose ``peak`` exceeds the
available memory stops with a :class:`ResourceError` naming the phase, its largest part and the
flag that makes it smaller (and the flags of every other phase that does not fit). Calibration
files are checked on their own before they are read (onnx_dwdecomp.data), and
:func:`onnx_dwdecomp.memory.require` guards each large allocation where it happens (random timing
and verification inputs, shape probing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .calibration.holdout import heldout_count
from .calibration.patches import positions_per_sample
from .calibration.store import CUT_BUDGET
from .errors import ResourceError
from .formatting import fmt_bytes, fmt_shape
from .memory import THREAD_BYTES, available_memory, array_bytes, check_threads
from .modelio import model_byte_size
from .timing.clock import default_threads
from .verify import RANDOM_SAMPLES


# --------------------------------------------------------------------------- the job estimate


@dataclass(frozen=True)
class Part:
    """One phase of the estimate: ``nbytes`` in total, ``detail`` its largest part, ``hint``
    the flag(s) that make it smaller."""

    phase: str
    nbytes: int
    detail: str
    hint: str


def _tensor_bytes(info) -> int | None:
    if info is None or info.shape is None or info.dtype is None:
        return None
    return array_bytes(info.shape, info.dtype)


def _constants(model) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def widest_node(model, infos) -> tuple[int, str]:
    """``(bytes, description)`` of the node whose activation inputs and outputs take the most
    memory at the shapes of ``infos``."""
    constants = _constants(model)
    best, where = 0, ""
    for index, node in enumerate(model.graph.node):
        names = {t for t in list(node.input) + list(node.output) if t and t not in constants}
        total = 0
        biggest = (0, "")
        for name in names:
            b = _tensor_bytes(infos.get(name))
            if b:
                total += b
                if b > biggest[0]:
                    biggest = (b, f"{name!r} {fmt_shape(infos[name].shape)} {infos[name].dtype}")
        if total > best:
            best = total
            label = node.name or f"{node.op_type}#{index}"
            where = f"node {label!r} ({node.op_type}, largest tensor {biggest[1]})"
    return best, where


def job_parts(*, model, infos, specs, shapes, fixed_batch, samples: int | None, batch_size: int,
              positions: int | None, verify: bool, random_samples: int, layers, latency: bool,
              threads: int | None, multiplier: int | None, model_bytes: int) -> list[Part]:
    """The phases of the estimate in the module docstring (no checks)."""
    first = specs[0] if specs else None
    b0 = shapes[first.name][0] if first is not None and shapes.get(first.name) else 1
    dynamic = first is not None and bool(first.shape) and first.shape[0] is None
    node_bytes, node_where = widest_node(model, infos)

    def forward(b: int) -> int:  # the widest node at batch b
        return node_bytes * b // max(b0, 1) if dynamic else node_bytes

    def per_sample(names) -> tuple[int, int]:
        total, elems = 0, 0
        for name in names:
            info = infos.get(name)
            b = _tensor_bytes(info)
            if b:
                rows = max(info.shape[0], 1) if info.shape else 1
                total += b // rows
                elems += math.prod(info.shape) // rows
        return total, elems

    in_b, in_e = per_sample([s.name for s in specs])
    out_b, out_e = per_sample([o.name for o in model.graph.output])
    parts = [Part("the model's copies", 3 * model_bytes, f"{fmt_bytes(model_bytes)} serialised",
                  "no flag makes the model smaller")]
    if verify:
        if samples:
            s = heldout_count(samples)
            bv = fixed_batch or min(batch_size, s)
            draw = 0
            hint = "--batch-size B (or --no-verify)"
        else:
            s = random_samples
            bv = fixed_batch or s
            draw = 8 * in_e
            hint = ("--input-shape NAME:D0,D1,... with smaller dims, or --no-verify" if _resizable(specs)
                    else "--no-verify skips the onnxruntime comparison")
        kept = s * (4 * out_b + 24 * out_e)
        total = 2 * forward(bv) + s * (in_b + draw) + kept
        detail = f"{node_where} at batch {bv}, two sessions"
        if kept > 2 * forward(bv):
            detail = f"the outputs of {s} sample(s) of both models, {fmt_bytes(out_b)} per sample, compared in float64"
            if samples:
                hint = "--calib-size N (fewer held-out samples), or --no-verify"
        parts.append(Part("verification", total, detail, hint))
    if samples:
        n = samples
        b = fixed_batch or min(batch_size, n)
        x_max, layer_max, layer_terms = 0, 0, []
        fit = max(n - heldout_count(n), 1)
        for layer in layers:
            xi, yi = infos.get(layer.input), infos.get(layer.output)
            xb = _tensor_bytes(xi)
            if xb and xi.shape:
                x_max = max(x_max, xb // max(xi.shape[0], 1))
            if yi is None or not yi.shape or len(yi.shape) < 3:
                continue
            t = math.prod(yi.shape[2:])
            nout = int(layer.weight.shape[0])
            d = int(layer.weight.size) // max(nout, 1)
            p = positions_per_sample(positions, t, d, fit)
            terms = [(2 * b * p * d * 4, f"conv {layer.name!r}: patches of {p} positions × {d} values per image at "
                                         f"batch {b}", "--positions P (fewer sampled positions) or --batch-size B"),
                     (n * t * 16, f"conv {layer.name!r}: position draws for {n} samples × {t} positions",
                      "--calib-size N (fewer samples)"),
                     (8 * (d * d + nout * d), f"conv {layer.name!r}: moments of {d} patch values",
                      "--exclude the conv")]
            if sum(v for v, _, _ in terms) > layer_max:
                layer_max, layer_terms = sum(v for v, _, _ in terms), terms
        cuts = min(2 * n * x_max, CUT_BUDGET)
        heldout_outputs = heldout_count(n) * out_b
        terms = [(2 * forward(b), f"{node_where} at batch {b}", "--batch-size B"),
                 (heldout_outputs, f"the input model's outputs on {heldout_count(n)} held-out sample(s), "
                                   f"{fmt_bytes(out_b)} per sample", "--calib-size N (fewer held-out samples)"),
                 (cuts, f"tensors between segments for {n} samples", "--calib-size N (fewer samples)"), *layer_terms]
        _, detail, hint = max(terms, key=lambda term: term[0])
        parts.append(Part("calibration", sum(v for v, _, _ in terms), detail, hint))
    if latency and layers:
        worst, where = 0, ""
        for layer in layers:
            xi, yi = infos.get(layer.input), infos.get(layer.output)
            xb, yb = _tensor_bytes(xi), _tensor_bytes(yi)
            if not xb or not yb:
                continue
            itemsize = np.dtype(xi.dtype).itemsize
            c, n_out = int(layer.weight.shape[1]), int(layer.weight.shape[0])
            mid = yb // max(n_out, 1) * c * (multiplier or 1)
            size = xb * (1 + 8 // itemsize) + 2 * (yb + mid)
            if size > worst:
                worst, where = size, f"conv {layer.name!r} input {fmt_shape(xi.shape)}"
        t = threads or default_threads()
        parts.append(Part("latency timing", worst + 2 * t * THREAD_BYTES, f"{where}, {t} thread(s)",
                          "--select all (times nothing)"))
    return parts


def _resizable(specs) -> bool:
    """Whether --input-shape can make the random verification inputs smaller (a dynamic dim
    other than the batch, which verification sets itself)."""
    return any(d is None for s in specs for d in s.shape[1:])


def check_job(**kwargs) -> dict:
    """Estimate the job (:func:`job_parts`, same arguments) and raise :class:`ResourceError`
    when ``weights + max(phases)`` exceeds the available memory; checks ``threads`` first.
    Returns the estimate for the report: ``{"peak_bytes": …, "phases": {phase: bytes}}``."""
    check_threads(kwargs.get("threads"))
    parts = job_parts(**kwargs)
    weights, phases = parts[0], parts[1:]
    worst = max(phases, key=lambda p: p.nbytes, default=None)
    total = weights.nbytes + (worst.nbytes if worst else 0)
    estimate = {"peak_bytes": total, "phases": {p.phase: p.nbytes for p in parts}}
    available, source = available_memory()
    if available is None or total <= available:
        return estimate
    if worst is None or weights.nbytes >= worst.nbytes:
        worst = weights
    # every phase that does not fit on its own: its flag too, so one run names them all
    hints = [worst.hint] + [p.hint for p in phases if p is not worst and weights.nbytes + p.nbytes > available
                            and p.hint != worst.hint]
    raise ResourceError(f"not enough memory: {worst.phase} needs about {fmt_bytes(total)} "
                        f"({worst.detail}), {fmt_bytes(available)} {source}; {'; '.join(hints)}")


def check_decompose_job(job, layers) -> dict:
    """:func:`check_job` for a pipeline job (pipeline._Job) and its candidate convs."""
    opts = job.opts
    return check_job(model=job.work, infos=job.infos, specs=job.specs, shapes=job.shapes, fixed_batch=job.fixed_batch,
              samples=job.data.num_samples if job.data is not None else None, batch_size=opts.batch_size,
              positions=opts.positions, verify=opts.verify, random_samples=RANDOM_SAMPLES, layers=layers,
              latency=opts.select == "latency", threads=opts.threads, multiplier=opts.multiplier,
              model_bytes=model_byte_size(job.source))
