"""Check the rewritten model: ONNX checker, then output agreement with the original in onnxruntime.

Metrics per graph output, over all verification samples (``y`` original, ``ŷ`` rewritten):

- ``rel_l2``   = ‖ŷ − y‖₂ / ‖y‖₂
- ``max_abs``  = max |ŷ − y|
- ``cosine``   = ⟨ŷ, y⟩ / (‖ŷ‖₂‖y‖₂) over the flattened outputs
- ``top1_agreement`` = share of rows whose argmax agrees, for (N, classes) outputs only.
- ``feature_rel_l2`` = the relative L2 error of each *feature* — an entry of the feature axis
  when it has 2 to ``MAX_FEATURES`` entries: the last axis of a 2-D or 3-D output (a
  classifier's logits; the box x, y, w, h, objectness and class scores a detection head packs
  side by side), axis 1 of a 4-D or larger map (its channels, NCHW) — taken over all samples
  and positions, then the root mean square over the features:

      e_f = ‖ŷ[f] − y[f]‖₂ / ‖y[f]‖₂,      feature_rel_l2 = sqrt(mean_f e_f²)

  (features that are identically zero are left out). Every feature counts alike, whatever its
  scale: in ddddocr's YOLOX head (1, 3549, 6) the box coordinates are ~100× the objectness
  scores, and a rewrite measured 0.04 plain rel. L2 while the objectness column was off by 0.49
  (box F1 0.79). Without a feature axis it equals ``rel_l2``. :meth:`Verification.worst_error`
  — the largest over the outputs — is the output error that plans and ``--max-error`` bound.

With calibration data the denominators are the output's *typical* magnitude: ``‖y_f‖₂`` is
replaced by ``sqrt(rows · m_f)``, ``m_f`` the mean square of feature ``f`` over all calibration
samples (``pipeline.reference_pass``, the original model), floored at ``FEATURE_FLOOR`` of the
output's RMS feature scale so that a feature that almost never fires cannot dominate. A held-out sample whose output is
near zero (a text detector on a photo without text: probabilities ~1e-7) would otherwise turn
float round-off into a relative error of 0.9.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from .calibdata import InputSpec
from .errors import DwDecompError, ModelError, first_line
from . import modelio
from .runtime import make_session, run

#: Random verification samples when no held-out calibration data is given.
RANDOM_SAMPLES = 8
#: A last axis with at most this many entries holds features measured one by one (feature_rel_l2).
MAX_FEATURES = 256


@dataclass(frozen=True)
class OutputAgreement:
    rel_l2: float
    max_abs: float
    cosine: float
    top1_agreement: float | None
    feature_rel_l2: float


@dataclass(frozen=True)
class Verification:
    samples: int
    inputs: str  # "random (seed N)" or "held-out calibration samples"
    outputs: dict[str, OutputAgreement]

    def worst_rel_l2(self) -> float:
        """The largest ``rel_l2`` over the outputs (NaN counts as infinite)."""
        return _worst(o.rel_l2 for o in self.outputs.values())

    def worst_error(self) -> float:
        """The output error plans bound: the largest ``feature_rel_l2`` over the outputs (NaN
        counts as infinite)."""
        return _worst(o.feature_rel_l2 for o in self.outputs.values())


def _worst(errors: Iterable[float]) -> float:
    return max((e if e == e else float("inf") for e in errors), default=0.0)


class PaddedFeeds(dict):
    """Feeds padded to a fixed batch size; ``rows`` of them are real samples."""

    def __init__(self, feeds: dict[str, np.ndarray], rows: int):
        super().__init__(feeds)
        self.rows = rows


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)``; a failure here is a bug of this tool."""
    try:
        if modelio.model_byte_size(model) < modelio.PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise DwDecompError(f"the rewritten model fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def random_batches(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int,
                   samples: int = RANDOM_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Seeded standard-normal float inputs (zeros for integer inputs), ``samples`` rows in total.

    A dynamic batch dim takes all samples at once; a fixed one is fed in several batches.
    """
    rng = np.random.default_rng(seed)
    batch = shapes[specs[0].name][0] if specs and specs[0].shape and specs[0].shape[0] is not None else samples
    batches = []
    for _ in range(max(1, -(-samples // batch))):
        feeds = {}
        for spec in specs:
            shape = (batch,) + tuple(shapes[spec.name][1:])
            if np.issubdtype(spec.dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        batches.append(feeds)
    return batches


def as_features(y: np.ndarray) -> np.ndarray:
    """``y`` as float64 (rows, F): the feature axis last (module docstring), or one column."""
    axis = 1 if y.ndim >= 4 else y.ndim - 1
    if y.ndim < 2 or not 2 <= y.shape[axis] <= MAX_FEATURES:
        return y.astype(np.float64).reshape(-1, 1)
    return np.moveaxis(y.astype(np.float64), axis, -1).reshape(-1, y.shape[axis])


#: A feature's scale is floored at this share of the output's RMS feature scale: a channel that
#: almost never fires must not turn round-off into a relative error of 15.
FEATURE_FLOOR = 1e-3


def agreement(reference: np.ndarray, candidate: np.ndarray, mean_square: np.ndarray | None = None
              ) -> OutputAgreement:
    """Agreement of one output; ``mean_square`` (per feature, from the calibration samples) sets
    the scale the relative errors are taken against, else the reference's own norm.

    Non-float outputs (class indices) are compared for equality: both errors are the share of
    entries that differ. Entries where the reference is not finite are left out; a non-finite
    candidate where the reference is finite makes both errors infinite.
    """
    if not (np.issubdtype(reference.dtype, np.floating) and np.issubdtype(candidate.dtype, np.floating)):
        mismatch = float(np.mean(reference != candidate)) if reference.size else 0.0
        return OutputAgreement(mismatch, float(mismatch > 0), 1.0 - mismatch, None, mismatch)
    ref, cand = as_features(reference), as_features(candidate)
    valid = np.isfinite(ref)
    if not np.isfinite(cand[valid]).all():
        inf = float("inf")
        return OutputAgreement(inf, inf, float("nan"), None, inf)
    ref, cand = np.where(valid, ref, 0.0), np.where(valid, cand, 0.0)
    diff = cand - ref
    rows = len(ref)
    scale = (np.linalg.norm(ref, axis=0) if mean_square is None or mean_square.shape != (ref.shape[1],)
             else np.sqrt(rows * np.nan_to_num(mean_square, nan=0.0, posinf=0.0)))
    scale_all = float(np.sqrt(np.sum(scale ** 2)))
    rel = float(np.linalg.norm(diff) / scale_all) if scale_all > 0 else float(np.linalg.norm(diff) > 0)
    norm_y, norm_hat = np.linalg.norm(ref), np.linalg.norm(cand)
    cos = float(np.sum(ref * cand) / (norm_y * norm_hat)) if norm_y > 0 and norm_hat > 0 else float(norm_y == norm_hat)
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    feature = rel
    if ref.shape[1] > 1 and scale_all > 0:
        floored = np.maximum(scale, FEATURE_FLOOR * scale_all / np.sqrt(len(scale)))
        errors = np.linalg.norm(diff, axis=0)[scale > 0] / floored[scale > 0]
        feature = float(np.sqrt(np.mean(errors ** 2)))
    return OutputAgreement(rel, float(np.abs(diff).max()) if diff.size else 0.0, cos, top1, feature)


def _real_rows(value, fed: int, real: int):
    """``value`` without the padding rows of a batch fed ``fed`` rows of which ``real`` are samples."""
    if isinstance(value, np.ndarray) and value.ndim and value.shape[0] == fed and real < fed:
        return value[:real]
    return value


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
                   scales: dict[str, np.ndarray] | None = None) -> Verification:
    """Run both models on the same batches and measure agreement per graph output that is a
    tensor (sequence outputs are skipped), against the typical magnitudes ``scales[name]``
    (per-feature mean squares over the calibration samples) where given.

    A batch padded to a fixed batch size (:class:`PaddedFeeds`) counts its real rows only:
    outputs whose axis 0 has the fed row count are cut to them.
    """
    try:
        ref_session = make_session(original)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load the input model: {first_line(exc)}") from exc
    new_session = make_session(rewritten)
    names = [o.name for o in original.graph.output]
    ref_out: dict[str, list] = {n: [] for n in names}
    new_out: dict[str, list] = {n: [] for n in names}
    samples = 0
    for feeds in batches:
        fed = len(next(iter(feeds.values())))
        real = getattr(feeds, "rows", fed)
        samples += real
        try:
            reference = run(ref_session, dict(feeds), names)
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelError(f"onnxruntime cannot run the input model: {first_line(exc)}") from exc
        for name, value in reference.items():
            ref_out[name].append(_real_rows(value, fed, real))
        for name, value in run(new_session, dict(feeds), names).items():
            new_out[name].append(_real_rows(value, fed, real))
    outputs = {}
    for n in names:
        if not all(isinstance(v, np.ndarray) for v in ref_out[n] + new_out[n]):
            continue
        outputs[n] = agreement(_join(ref_out[n]), _join(new_out[n]), (scales or {}).get(n))
    return Verification(samples, inputs, outputs)


