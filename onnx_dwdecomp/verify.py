"""Check the rewritten model: ONNX checker, then output agreement with the original in onnxruntime.

Metrics per graph output, over all verification samples (``y`` original, ``ŷ`` rewritten):

- ``rel_l2``   = ‖ŷ − y‖₂ / ‖y‖₂
- ``max_abs``  = max |ŷ − y|
- ``cosine``   = ⟨ŷ, y⟩ / (‖ŷ‖₂‖y‖₂) over the flattened outputs
- ``top1_agreement`` = share of rows whose argmax agrees, for (N, classes) outputs only.
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


@dataclass(frozen=True)
class OutputAgreement:
    rel_l2: float
    max_abs: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class Verification:
    samples: int
    inputs: str  # "random (seed N)" or "held-out calibration samples"
    outputs: dict[str, OutputAgreement]

    def worst_rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs.values()), default=0.0)


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


def agreement(reference: np.ndarray, candidate: np.ndarray) -> OutputAgreement:
    y = reference.astype(np.float64).ravel()
    y_hat = candidate.astype(np.float64).ravel()
    diff = y_hat - y
    norm_y, norm_hat = np.linalg.norm(y), np.linalg.norm(y_hat)
    rel = float(np.linalg.norm(diff) / norm_y) if norm_y > 0 else float(np.linalg.norm(diff) > 0)
    cos = float(y @ y_hat / (norm_y * norm_hat)) if norm_y > 0 and norm_hat > 0 else float(norm_y == norm_hat)
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return OutputAgreement(rel, float(np.abs(diff).max()) if diff.size else 0.0, cos, top1)


def compare_models(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                   batches: Iterable[dict[str, np.ndarray]], inputs: str) -> Verification:
    """Run both models on the same batches and measure agreement per graph output."""
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
        outputs[n] = agreement(ref, new)
    return Verification(samples, inputs, outputs)


