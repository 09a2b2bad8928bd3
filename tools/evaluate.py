"""Top-1 accuracy of an ONNX classifier on a labelled ``.npz`` set, with onnxruntime.

Usage::

    python tools/evaluate.py MODEL.onnx models/mnist/test.npz [--batch-size 100]

The ``.npz`` holds ``input`` (float32, N x C x H x W, already preprocessed) and
``labels`` (integer class ids, shape ``(N,)``). The model's first input is fed
with batches of ``input``; its first output must be ``(batch, num_classes)``
logits (or probabilities: only the arg-max matters).

numpy + onnxruntime only (no torch), so it runs in the package's own venv.
Importable: :func:`top1_accuracy`, :func:`evaluate`, :func:`predict`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label.

    Parameters
    ----------
    logits : ndarray, shape (N, K)
        Scores per class. Ties go to the lowest class index (``np.argmax``).
    labels : ndarray, shape (N,)
        Integer class ids in ``[0, K)``.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the shapes are not ``(N, K)`` / ``(N,)`` with the same ``N >= 1``,
        or if labels are not integers.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, K), got shape {logits.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"empty logits, shape {logits.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _session(model_path: str | Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def predict(model_path: str | Path, inputs: np.ndarray, batch_size: int = 100,
            threads: int | None = None) -> np.ndarray:
    """Run the model on ``inputs`` in batches; return the stacked first output."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sess = _session(model_path, threads)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: inputs[i:i + batch_size]})[0]
            for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs, axis=0)


def load_npz(npz_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(input, labels)`` from a labelled ``.npz``, checked and typed."""
    with np.load(npz_path) as data:
        missing = {"input", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{npz_path}: missing key(s) {sorted(missing)}; has {data.files}")
        inputs = np.ascontiguousarray(data["input"], dtype=np.float32)
        labels = np.asarray(data["labels"])
    if len(inputs) != len(labels):
        raise ValueError(f"{npz_path}: {len(inputs)} inputs but {len(labels)} labels")
    return inputs, labels


def evaluate(model_path: str | Path, npz_path: str | Path, batch_size: int = 100,
             threads: int | None = None) -> float:
    """Top-1 accuracy of ``model_path`` on the labelled set ``npz_path``."""
    inputs, labels = load_npz(npz_path)
    logits = predict(model_path, inputs, batch_size, threads)
    return top1_accuracy(logits, labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="ONNX classifier")
    parser.add_argument("data", type=Path, help=".npz with 'input' and 'labels'")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    args = parser.parse_args(argv)
    inputs, labels = load_npz(args.data)
    logits = predict(args.model, inputs, args.batch_size, args.threads)
    acc = top1_accuracy(logits, labels)
    correct = int(round(acc * len(labels)))
    print(f"{args.model}: top-1 {100 * acc:.2f} % ({correct}/{len(labels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
