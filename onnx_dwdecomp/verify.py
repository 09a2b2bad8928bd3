"""Check the rewritten model: ONNX checker, then output agreement with the original in onnxruntime.

Metrics per graph output, over all verification samples (``y`` original, ``ŷ`` rewritten):

- ``max_abs``  = max |ŷ − y|
- ``cosine``   = ⟨ŷ, y⟩ / (‖ŷ‖₂‖y‖₂) over the flattened outputs
- ``top1_agreement`` = share of rows whose argmax agrees, for (N, classes) outputs only.
- ``feature_rel_l2`` — **the output error**, the one measure that plans, ``--max-error`` and
  ``--max-rel-error`` bound and every table shows as "rel. error": the relative L2 error of each
  *feature* — an entry of a feature axis — taken over all samples and positions, then the root
  mean square over the features:

      e_f = ‖ŷ[f] − y[f]‖₂ / sqrt(rows · m_f),      feature_rel_l2 = sqrt(mean_f e_f²)

  ``m_f`` is the feature's mean square (below). Every feature counts alike, whatever its scale:
  a detection head packs box coordinates in pixels next to class probabilities of ~1e-2, and a
  plain relative L2 is owned by the pixels.

  **The feature axis** (the stated rule, :func:`feature_axes`): an axis other than the batch
  axis qualifies when it has 2 to ``MAX_FEATURES`` entries. A 2-D output (N, K) has axis 1
  (a classifier's logits); a 4-D or larger map has axis 1 (its channels, NCHW); a 3-D output
  (N, a, b) has whichever of axes 1 and 2 qualify — the YOLOv5/YOLOX layout (N, A, 5+C) its
  last axis, the YOLOv8/v9/v11 layout (N, 4+C, A) axis 1 — and where both qualify (a DETR
  head's (N, Q, C+1) with few queries) the output error is the **worse** of the two. An output
  with no qualifying axis is one feature: its error is the plain ``rel_l2``.

  **Near-dead features** (the stated rule): a feature whose *peak* ``p_f = max |y[f]|`` over
  the calibration samples is below ``NEAR_DEAD`` (1e-3) of the output's RMS per feature —
  ``p_f < NEAR_DEAD · sqrt(M)``, ``M = mean_f m_f`` — is zero or tiny everywhere: it carries
  no signal of its own to be relative to (a channel that never fires, a class probability of
  ~1e-4 on every anchor of every sample). Such features are pooled into one feature whose
  error is taken against the scale of one typical feature:
  ``e_pool = ‖ŷ[pool] − y[pool]‖₂ / sqrt(rows · M)``; the pool then counts once in the mean
  (features identically zero in both models are left out). A sparse feature is judged by its
  peak, not its RMS: a class probability with RMS 1e-3 whose peaks of 0.3 are the detections
  stays live beside box coordinates of RMS 100, while five NHWC channels of RMS 1e-4 beside
  channels of RMS 1 are pooled.

  :meth:`Verification.worst_error` — the largest over the outputs — is the output error, and
  :attr:`OutputAgreement.worst_feature` names the feature that set it.
- ``rel_l2`` = ‖ŷ − y‖₂ / ‖y‖₂ over the whole output (kept in the JSON report; not a bound).

With calibration data the denominators are the output's *typical* magnitude: ``m_f`` (and the
peak ``p_f``) of feature ``f`` over all calibration samples (:class:`ScaleAccumulator` in
``pipeline.reference_pass``, the original model); without, over the verification samples. A held-out sample
whose output is near zero (a text detector on a photo without text: probabilities ~1e-7)
would otherwise turn float round-off into a relative error of 0.9.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import modelio
from .data.specs import InputSpec
from .checks import check_int
from .errors import InternalError, ModelError, NumericalError, OptionError, VerificationFailed, first_line
from .formatting import fmt_shape
from .memory import array_bytes, require
from .runtime import make_session, run

#: Random verification samples when no held-out calibration data is given.
RANDOM_SAMPLES = 8
#: An axis with 2 to this many entries is a feature axis, its entries measured one by one
#: (feature_rel_l2, :func:`feature_axes`).
MAX_FEATURES = 256
#: A feature whose peak |y| is below this share of the output's RMS per feature is near-dead:
#: pooled with the others and measured against one typical feature's scale (module docstring).
NEAR_DEAD = 1e-3


@dataclass(frozen=True)
class OutputAgreement:
    rel_l2: float
    max_abs: float
    cosine: float
    top1_agreement: float | None
    feature_rel_l2: float
    #: the feature with the largest e_f: its axis and index (index None: the near-dead pool;
    #: axis None: the output has no feature axis)
    worst_axis: int | None = None
    worst_index: int | None = None

    def worst_feature(self) -> str:
        """``"axis 1, index 7"``, ``"axis 1, near-dead pool"`` or ``"whole output"``."""
        if self.worst_axis is None:
            return "whole output"
        return f"axis {self.worst_axis}, " + ("near-dead pool" if self.worst_index is None
                                                else f"index {self.worst_index}")


@dataclass(frozen=True)
class FeatureScale:
    """One output's typical magnitude along one feature axis (``None``: the whole output as one
    feature): each feature's mean square ``m_f`` and peak ``p_f = max |y[f]|`` (shape ``(F,)``)."""

    axis: int | None
    mean_square: np.ndarray
    peak: np.ndarray


#: One :class:`FeatureScale` per feature axis of an output (:func:`feature_axes`).
OutputScale = tuple[FeatureScale, ...]


@dataclass(frozen=True)
class NonFinite:
    """NaN/Inf values of one output: ``candidate`` where the rewritten model's is NaN/Inf and the
    input model's finite (any makes the errors infinite and verification fail), ``reference``
    where the input model's own is NaN/Inf (it gives no number to compare with: left out of the
    errors), ``values`` in all."""

    candidate: int
    reference: int
    values: int

    @classmethod
    def of(cls, reference: np.ndarray, candidate: np.ndarray) -> NonFinite:
        if not (np.issubdtype(reference.dtype, np.floating) and np.issubdtype(candidate.dtype, np.floating)):
            return cls(0, 0, int(reference.size))
        valid = np.isfinite(reference)
        bad = int(np.count_nonzero(valid & ~np.isfinite(candidate))) if reference.shape == candidate.shape else 0
        return cls(bad, int(reference.size - np.count_nonzero(valid)), int(reference.size))


@dataclass(frozen=True)
class Verification:
    samples: int
    inputs: str  # "random (seed N)" or "held-out calibration samples"
    outputs: dict[str, OutputAgreement]
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)  # outputs with any NaN/Inf

    def worst_rel_l2(self) -> float:
        """The largest ``rel_l2`` over the outputs (NaN counts as infinite)."""
        return _worst(o.rel_l2 for o in self.outputs.values())

    def worst_error(self) -> float:
        """The output error plans bound: the largest ``feature_rel_l2`` over the outputs (NaN
        counts as infinite)."""
        return _worst(o.feature_rel_l2 for o in self.outputs.values())

    def require_pass(self, original: onnx.ModelProto | None = None) -> None:
        """Raise when this verification fails whatever the error bound.

        - The input model (``original``) computes NaN/Inf itself — its constants hold some, or
          its outputs do on these inputs — and either every value of an output is NaN/Inf or the
          rewritten model gives NaN/Inf where the input's output is finite: the rewrite cannot
          be verified on such a model, :class:`NumericalError` (exit 2) naming the constants.
        - Otherwise the rewritten model giving NaN/Inf where the input model's output is finite
          is a :class:`VerificationFailed` (exit 1).
        """
        bad = nonfinite_tensors(original) if original is not None else {}
        cause = (f" (NaN/Inf constants in the input: {', '.join(repr(k) for k in list(bad)[:3])}"
                 f"{', …' if len(bad) > 3 else ''})" if bad else "")
        for name, o in self.nonfinite.items():
            where = f"on {self.samples} {self.inputs}"
            if o.values and o.reference == o.values:
                raise NumericalError(f"output {name!r} of the input model is NaN/Inf in all {o.values} value(s) "
                                     f"{where}, so the rewrite cannot be verified{cause}; --no-verify skips the "
                                     f"comparison")
            if o.candidate and (bad or o.reference):
                raise NumericalError(f"output {name!r} of the input model is NaN/Inf in {o.reference} of {o.values} "
                                     f"value(s) {where} and the rewritten model's in {o.candidate} more, so the "
                                     f"rewrite cannot be verified where the input computes NaN/Inf{cause}; "
                                     f"--no-verify skips the comparison")
            if o.candidate:
                raise VerificationFailed(f"verification failed: output {name!r} of the rewritten model is NaN/Inf "
                                         f"in {o.candidate} of {o.values} value(s) where the input model's is "
                                         f"finite, {where}; nothing written")


def _worst(errors: Iterable[float]) -> float:
    return max((e if e == e else float("inf") for e in errors), default=0.0)


class PaddedFeeds(dict):
    """Feeds padded to a fixed batch size; ``rows`` of them are real samples."""

    def __init__(self, feeds: dict[str, np.ndarray], rows: int):
        super().__init__(feeds)
        self.rows = rows


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)``; a failure here is a bug of this tool
    (:class:`InternalError`)."""
    try:
        if modelio.model_byte_size(model) < modelio.PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the rewritten model fails the ONNX checker: {first_line(exc)}") from exc


def nonfinite_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Name → count of NaN/Inf values of every floating-point constant of the main graph
    (initializers, ``Constant`` outputs) that has any. Data-less stubs are skipped."""
    out: dict[str, int] = {}
    tensors = [(t.name, t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            tensors += [(node.output[0], a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for name, tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        value = onnx.numpy_helper.to_array(tensor)
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            out[name] = bad
    return out


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def check_finite_weights(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """:class:`NumericalError` when ``rewritten`` holds a NaN/Inf constant that ``original``
    does not hold under the same name: a model with non-finite weights is never written unless
    the input already had them."""
    before = nonfinite_tensors(original)
    new = {k: v for k, v in nonfinite_tensors(rewritten).items() if k not in before}
    if new:
        name, count = next(iter(new.items()))
        more = f" and {len(new) - 1} more tensor(s)" if len(new) > 1 else ""
        raise NumericalError(f"the rewritten model would hold NaN/Inf weights ({count} value(s) in {name!r}{more}) "
                             f"that the input model does not have: its values overflow float32 (calibration "
                             f"data or weights too large?); nothing written")


def finite_stats_solver(solve):
    """A ``solve(layer, stats, heldout_error)`` callback (calibration.driver.calibrate_and_solve) that
    first checks the layer's statistics: NaN/Inf moments (an earlier node overflows float32,
    or the model holds NaN/Inf constants upstream) are a :class:`NumericalError` naming the
    conv, not a solver crash."""
    def checked(layer, stats, *rest):
        check_finite_stats(layer.name, stats)
        return solve(layer, stats, *rest)
    return checked


def check_finite_stats(name: str, stats) -> None:
    """:class:`NumericalError` when any moment of ``stats`` (solve.LayerStats) is NaN/Inf."""
    if stats is None:
        return
    for moment in ("mean_x", "mean_xhat", "cov_xhat", "cov_y_xhat", "response_var"):
        value = getattr(stats, moment, None)
        if value is not None and not np.isfinite(value).all():
            raise NumericalError(
                f"conv {name!r}: its input statistics on the calibration data are NaN/Inf ({moment}): values "
                f"before this conv overflow float32 or the model holds NaN/Inf constants upstream; rescale the "
                f"data or leave the conv regular with --exclude {name!r}")


def random_batches(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int,
                   samples: int = RANDOM_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Seeded standard-normal float inputs (zeros for integer and bool inputs), ``samples`` rows
    in total.

    Every input gets its own resolved shape and dtype. Inputs whose axis 0 is dynamic in the
    model (the batch axis) take the batch: all samples at once, or the first input's fixed
    batch in several batches; an input whose axis 0 is fixed (a weight fed as a graph input)
    keeps its shape. The bytes are checked against the available memory first (memory.py).
    """
    check_int(seed, "--seed", 0)
    for spec in specs:
        if spec.dtype.kind not in "fiub":
            raise OptionError(f"input {spec.name!r} has dtype {spec.dtype}: random verification inputs are made for "
                              f"numeric inputs only; pass --calib with real inputs, or --no-verify")
    first = specs[0] if specs else None
    fixed = first is not None and first.shape and first.shape[0] is not None
    batch = shapes[first.name][0] if fixed else samples
    rounds = max(1, -(-samples // batch))

    def shape_of(spec: InputSpec) -> tuple[int, ...]:
        shape = tuple(shapes[spec.name])
        if spec.shape and spec.shape[0] is None:
            shape = (batch,) + shape[1:]
        return shape

    draw = sum(array_bytes(shape_of(s), s.dtype) + (8 * array_bytes(shape_of(s), np.uint8)
                                                    if s.dtype.kind == "f" else 0) for s in specs)
    require(rounds * draw, f"{samples} random verification sample(s) of inputs "
            + ", ".join(f"{s.name!r} {fmt_shape(shape_of(s))}" for s in specs),
            "--input-shape NAME:D0,D1,... with smaller dims, or --no-verify")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(rounds):
        feeds = {}
        for spec in specs:
            shape = shape_of(spec)
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        batches.append(feeds)
    return batches


def feature_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The feature axes of an output of ``shape`` (module docstring): axis 1 of a 2-D or ≥ 4-D
    output, axes 1 and 2 of a 3-D one, each only when it has 2 to ``MAX_FEATURES`` entries."""
    candidates = (1, 2) if len(shape) == 3 else (1,) if len(shape) >= 2 else ()
    return tuple(a for a in candidates if 2 <= shape[a] <= MAX_FEATURES)


def feature_view(y: np.ndarray, axis: int | None) -> np.ndarray:
    """``y`` as float64 ``(rows, F)`` with feature axis ``axis`` last (``None``: one column)."""
    if axis is None:
        return y.astype(np.float64).reshape(-1, 1)
    return np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, y.shape[axis])


def views(y: np.ndarray) -> list[tuple[int | None, np.ndarray]]:
    """Every feature view of ``y`` (:func:`feature_view`): one per feature axis, or the whole
    output as one feature."""
    return [(axis, feature_view(y, axis)) for axis in (feature_axes(y.shape) or (None,))]


class ScaleAccumulator:
    """Each output's :class:`FeatureScale` per feature axis, accumulated over batches of the
    original model's outputs (float outputs only; NaN/Inf entries count as zero)."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[int | None, list]] = {}  # name → axis → [Σ y², peak, rows]

    def add(self, name: str, value: np.ndarray) -> list[tuple[int | None, np.ndarray]]:
        """Add one batch of output ``name``; returns its views (:func:`views`) for callers that
        need per-sample sums of the same features."""
        out = views(value)
        per_axis = self._sums.setdefault(name, {})
        for axis, f in out:
            f = np.where(np.isfinite(f), f, 0.0)
            total = per_axis.setdefault(axis, [0.0, np.zeros(f.shape[1]), 0])
            if total[1].shape != (f.shape[1],):
                continue  # the axis changed size between batches: keep the first batches' scale
            total[0] = total[0] + np.einsum("ij,ij->j", f, f)
            total[1] = np.maximum(total[1], np.abs(f).max(axis=0, initial=0.0))
            total[2] += len(f)
        return out

    def scales(self) -> dict[str, OutputScale]:
        return {name: tuple(FeatureScale(axis, sq / max(rows, 1), peak) for axis, (sq, peak, rows) in per_axis.items())
                for name, per_axis in self._sums.items()}


def output_scales(values: Iterable[tuple[str, np.ndarray]]) -> dict[str, OutputScale]:
    """:class:`FeatureScale` per output and feature axis of ``(name, value)`` batches."""
    acc = ScaleAccumulator()
    for name, value in values:
        acc.add(name, value)
    return acc.scales()


def agreement(reference: np.ndarray, candidate: np.ndarray, scale: OutputScale | None = None
              ) -> OutputAgreement:
    """Agreement of one output; ``scale`` (per feature axis, from the calibration samples) sets
    the scale the relative errors are taken against, else the reference's own.

    Non-float outputs (class indices) are compared for equality: both errors are the share of
    entries that differ. Entries where the reference is NaN/Inf are left out (the input model
    gives no number there); a candidate that is NaN/Inf where the reference is finite makes
    every error infinite — never NaN: a NaN is a failure, not a pass (:class:`NonFinite`,
    :meth:`Verification.require_pass`).
    """
    if not (np.issubdtype(reference.dtype, np.floating) and np.issubdtype(candidate.dtype, np.floating)):
        mismatch = float(np.mean(reference != candidate)) if reference.size else 0.0
        return OutputAgreement(mismatch, float(mismatch > 0), 1.0 - mismatch, None, mismatch)
    if reference.shape != candidate.shape:
        inf = float("inf")
        return OutputAgreement(inf, inf, 0.0, None, inf)
    with np.errstate(all="ignore"):
        return _float_agreement(reference, candidate, scale)


def _own_scale(axis: int | None, ref: np.ndarray) -> FeatureScale:
    if not len(ref):
        return FeatureScale(axis, np.zeros(ref.shape[1]), np.zeros(ref.shape[1]))
    return FeatureScale(axis, np.mean(ref * ref, axis=0), np.abs(ref).max(axis=0, initial=0.0))


def _float_agreement(reference: np.ndarray, candidate: np.ndarray, scale: OutputScale | None) -> OutputAgreement:
    valid = np.isfinite(reference)
    if not np.isfinite(candidate[valid]).all():
        inf = float("inf")
        return OutputAgreement(inf, inf, 0.0, None, inf)
    ref64 = np.where(valid, reference, 0.0).astype(np.float64)
    cand64 = np.where(valid, candidate, 0.0).astype(np.float64)
    given = {s.axis: s for s in scale or ()}
    rel = feature = None
    worst = (None, None)
    for axis, ref in views(ref64):
        diff = feature_view(cand64, axis) - ref
        s = given.get(axis)
        if s is None or s.mean_square.shape != (ref.shape[1],):
            s = _own_scale(axis, ref)
        error, index = _feature_error(np.linalg.norm(diff, axis=0), s, len(ref))
        if rel is None:
            norm = float(np.sqrt(len(ref) * np.sum(np.nan_to_num(s.mean_square, nan=0.0, posinf=0.0))))
            rel = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff) > 0)
        if feature is None or error > feature:
            feature, worst = error, (axis, index)
    norm_y, norm_hat = np.linalg.norm(ref64), np.linalg.norm(cand64)
    cos = float(np.sum(ref64 * cand64) / (norm_y * norm_hat)) if norm_y > 0 and norm_hat > 0 else float(norm_y == norm_hat)
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        rows_ok = np.isfinite(reference).all(axis=1)
        if rows_ok.any():
            top1 = float(np.mean(reference[rows_ok].argmax(axis=1) == candidate[rows_ok].argmax(axis=1)))
    max_abs = float(np.abs(cand64 - ref64).max()) if ref64.size else 0.0
    rel, feature, max_abs = (v if v == v else float("inf") for v in (rel, feature, max_abs))
    if worst[0] is None:  # no feature axis: the error is the plain relative L2
        feature = rel
    return OutputAgreement(rel, max_abs, cos if cos == cos else 0.0, top1, feature, *worst)


def _feature_error(diff_norms: np.ndarray, scale: FeatureScale, rows: int) -> tuple[float, int | None]:
    """``feature_rel_l2`` along one axis from each feature's error norm, and the index of the
    worst feature (None: the near-dead pool): live features relative to their own scale
    ``sqrt(rows · m_f)``, near-dead ones pooled against one typical feature's (module
    docstring)."""
    mean_square = np.nan_to_num(scale.mean_square, nan=0.0, posinf=0.0)
    typical_rms = float(np.sqrt(np.mean(mean_square)))  # sqrt(M)
    if typical_rms == 0 or rows == 0:  # nothing to be relative to (an empty output: no error)
        return float(np.linalg.norm(diff_norms) > 0), None
    live = (np.nan_to_num(scale.peak, nan=0.0, posinf=0.0) >= NEAR_DEAD * typical_rms) & (mean_square > 0)
    errors = diff_norms[live] / np.sqrt(rows * mean_square[live])
    index = np.flatnonzero(live)
    pooled = []
    if np.any(diff_norms[~live] > 0) or np.any(mean_square[~live] > 0):  # all-zero in both: left out
        pooled = [float(np.linalg.norm(diff_norms[~live])) / (typical_rms * np.sqrt(rows))]
    everything = np.concatenate([errors, pooled])
    if not everything.size:
        return 0.0, None
    k = int(np.argmax(everything))
    return float(np.sqrt(np.mean(np.square(everything)))), (int(index[k]) if k < len(errors) else None)


def real_rows(feeds: dict[str, np.ndarray]) -> int:
    """The samples a batch holds: all its rows, or a :class:`PaddedFeeds`' real ones."""
    return getattr(feeds, "rows", len(next(iter(feeds.values()))))


def real_outputs(values: dict, feeds: dict[str, np.ndarray]) -> dict:
    """A run's outputs without the padding rows of ``feeds``: outputs whose axis 0 has the fed
    row count are cut to the real rows."""
    fed, real = len(next(iter(feeds.values()))), real_rows(feeds)
    return {name: value[:real] if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == fed
            and real < fed else value for name, value in values.items()}


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """One output's per-batch values as one array: along the axis whose size differs between
    batches (the batch axis; axis 0 when they all agree), 0-d values stacked."""
    if not parts[0].ndim:
        return np.stack(parts)
    shapes = {p.shape for p in parts}
    differ = [k for k in range(parts[0].ndim) if len({shape[k] for shape in shapes}) > 1]
    return np.concatenate(parts, axis=differ[0] if len(differ) == 1 else 0)


def compare_models(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                   batches: Iterable[dict[str, np.ndarray]], inputs: str,
                   scales: dict[str, OutputScale] | None = None,
                   reference: list[dict[str, np.ndarray]] | None = None) -> Verification:
    """Run both models on the same batches and measure agreement per graph output that is a
    tensor (sequence outputs are skipped), against the typical magnitudes ``scales[name]``
    (per feature axis, over the calibration samples) where given. ``reference`` is the
    original's :func:`model_outputs` on these batches when already known (a job checks every
    plan round on the same held-out samples and runs the input model on them once).

    A batch padded to a fixed batch size (:class:`PaddedFeeds`) counts its real rows only:
    outputs whose axis 0 has the fed row count are cut to them.
    """
    batches = list(batches)
    if reference is None:
        reference = model_outputs(original, batches, "the input model")
    candidate = model_outputs(rewritten, batches, "the rewritten model")
    names = [o.name for o in original.graph.output]
    outputs, nonfinite = {}, {}
    for n in names:
        ref_parts, new_parts = [b[n] for b in reference], [b[n] for b in candidate]
        if not all(isinstance(v, np.ndarray) for v in ref_parts + new_parts):
            continue
        ref, new = _join(ref_parts), _join(new_parts)
        outputs[n] = agreement(ref, new, (scales or {}).get(n))
        counts = NonFinite.of(ref, new)
        if counts.candidate or counts.reference:
            nonfinite[n] = counts
    return Verification(sum(real_rows(feeds) for feeds in batches), inputs, outputs, nonfinite)


def model_outputs(model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]], what: str
                  ) -> list[dict[str, np.ndarray]]:
    """``model``'s graph outputs on each batch (output name → value), padding rows cut
    (:func:`real_outputs`); ``what`` names the model in errors."""
    try:
        session = make_session(model)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load {what}: {first_line(exc)}") from exc
    names = [o.name for o in model.graph.output]
    out = []
    for feeds in batches:
        try:
            out.append(real_outputs(run(session, dict(feeds), names), feeds))
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelError(f"onnxruntime cannot run {what}: {first_line(exc)}") from exc
    return out


def worst_output_error(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]],
                       scales: dict[str, OutputScale] | None = None) -> float:
    """The output error plans bound (:meth:`Verification.worst_error`) between two models' outputs
    on the same batches (per batch: output name → value, padding rows already cut)."""
    errors = []
    for name in reference[0]:
        ref = [batch[name] for batch in reference]
        new = [batch[name] for batch in candidate]
        if all(isinstance(v, np.ndarray) for v in ref + new):
            errors.append(agreement(_join(ref), _join(new), (scales or {}).get(name)).feature_rel_l2)
    return _worst(errors)
