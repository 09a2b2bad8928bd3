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
samples (:func:`mean_squares`, from the original model). A held-out sample whose output is
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
        return max((o.rel_l2 for o in self.outputs.values()), default=0.0)

    def worst_error(self) -> float:
        """The output error plans bound: the largest ``feature_rel_l2`` over the outputs."""
        return max((o.feature_rel_l2 for o in self.outputs.values()), default=0.0)


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


def mean_squares(outputs: Iterable[np.ndarray]) -> np.ndarray:
    """Mean square of each feature (shape (F,); (1,) without a feature axis) over ``outputs``,
    arrays of one graph output (e.g. one per batch)."""
    total, rows = None, 0
    for y in outputs:
        f = as_features(y)
        total = (f * f).sum(axis=0) if total is None else total + (f * f).sum(axis=0)
        rows += len(f)
    return np.zeros(1) if total is None else total / max(rows, 1)


def agreement(reference: np.ndarray, candidate: np.ndarray, mean_square: np.ndarray | None = None
              ) -> OutputAgreement:
    """Agreement of one output; ``mean_square`` (from :func:`mean_squares`) sets the scale the
    relative errors are taken against, else the reference's own norm."""
    y = reference.astype(np.float64).ravel()
    y_hat = candidate.astype(np.float64).ravel()
    diff = y_hat - y
    norm_y, norm_hat = np.linalg.norm(y), np.linalg.norm(y_hat)
    ref, cand = as_features(reference), as_features(candidate)
    rows = len(ref)
    scale = (np.linalg.norm(ref, axis=0) if mean_square is None or mean_square.shape != (ref.shape[1],)
             else np.sqrt(rows * mean_square))
    scale_all = float(np.sqrt(np.sum(scale ** 2)))
    rel = float(np.linalg.norm(diff) / scale_all) if scale_all > 0 else float(np.linalg.norm(diff) > 0)
    cos = float(y @ y_hat / (norm_y * norm_hat)) if norm_y > 0 and norm_hat > 0 else float(norm_y == norm_hat)
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    feature = rel
    live = scale > 0
    if ref.shape[1] > 1 and live.any():
        errors = np.linalg.norm((cand - ref)[:, live], axis=0) / scale[live]
        feature = float(np.sqrt(np.mean(errors ** 2)))
    return OutputAgreement(rel, float(np.abs(diff).max()) if diff.size else 0.0, cos, top1, feature)


def compare_models(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                   batches: Iterable[dict[str, np.ndarray]], inputs: str,
                   scales: dict[str, np.ndarray] | None = None) -> Verification:
    """Run both models on the same batches and measure agreement per graph output (against the
    typical magnitudes ``scales[name]`` from :func:`mean_squares` where given)."""
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
        samples += len(next(iter(feeds.values())))
        try:
            reference = run(ref_session, feeds, names)
        except Exception as exc:  # onnxruntime's own exception types
            raise ModelError(f"onnxruntime cannot run the input model: {first_line(exc)}") from exc
        for name, value in reference.items():
            ref_out[name].append(value)
        for name, value in run(new_session, feeds, names).items():
            new_out[name].append(value)
    outputs = {}
    for n in names:
        ref = np.concatenate(ref_out[n]) if ref_out[n][0].ndim else np.stack(ref_out[n])
        new = np.concatenate(new_out[n]) if new_out[n][0].ndim else np.stack(new_out[n])
        outputs[n] = agreement(ref, new, (scales or {}).get(n))
    return Verification(samples, inputs, outputs)


