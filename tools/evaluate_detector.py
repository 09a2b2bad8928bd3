"""Box F1 of a YOLOv8-layout detector ``(N, 4+C, A)``: a rewritten model against the original, and the original against ground truth.

Usage::

    python tools/evaluate_detector.py ORIGINAL.onnx [REWRITTEN.onnx] models/detector/test.npz
                                      [--conf 0.25] [--iou 0.45] [--batch-size 50]

The model's single output is ``(N, 4 + C, A)``: box ``cx, cy, w, h`` in pixels on axis 1,
then ``C`` class probabilities (after sigmoid), one column per anchor (YOLOv8/v9/v11 export
layout). :func:`decode` turns one image's output into detections: score = the largest class
probability, class = its index, kept when score >= ``conf``, then per-class greedy NMS at
IoU ``iou`` (boxes as xyxy).

Reported: the original's detections against the ``.npz`` ground truth (``boxes`` (N, K, 4)
xyxy pixels, ``labels`` (N, K), -1 = padding) and, with REWRITTEN, the rewritten model's
detections against the original's — box F1 at IoU 0.5 with the same class, counted over all
images — at ``--conf`` and at 0.1. Matching, IoU and NMS come from ``tools/task_metrics.py``.

numpy + onnxruntime only (no torch). Importable: :func:`decode`, :func:`detect`,
:func:`match_f1`, :func:`predict`, :func:`compare`, :func:`evaluate_vs_ground_truth`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

from task_metrics import box_iou, detection_f1, match_boxes, nms  # noqa: E402,F401

CONF, IOU_NMS, IOU_MATCH = 0.25, 0.45, 0.5


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """``(..., 4)`` centre/size boxes -> corner boxes ``x1, y1, x2, y2``."""
    b = np.asarray(b, dtype=np.float64)
    half = b[..., 2:4] / 2.0
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def decode(out: np.ndarray, conf: float = CONF, iou: float = IOU_NMS
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of one image from its ``(4 + C, A)`` output.

    Parameters
    ----------
    out : ndarray, shape (4 + C, A)
        Rows 0..3: ``cx, cy, w, h`` in pixels; rows 4..: class probabilities.
    conf : float
        Keep anchors whose best class probability is ``>= conf``.
    iou : float
        Per-class NMS threshold (a box is dropped when its IoU with a better box of the same
        class is above ``iou``).

    Returns
    -------
    boxes : ndarray, shape (K, 4)
        xyxy pixels, best score first.
    scores : ndarray, shape (K,)
        Best class probability.
    classes : ndarray, shape (K,)
        int64 class index.
    """
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2 or out.shape[0] < 5:
        raise ValueError(f"expected one image's output (4 + C, A) with C >= 1, got {out.shape}")
    probs = out[4:]
    classes = np.argmax(probs, axis=0)
    scores = probs[classes, np.arange(out.shape[1])]
    keep = np.flatnonzero(scores >= conf)
    boxes = cxcywh_to_xyxy(out[:4, keep].T)
    scores, classes = scores[keep], classes[keep]
    kept: list[int] = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        kept.extend(int(idx[k]) for k in nms(boxes[idx], scores[idx], iou))
    kept_arr = np.array(sorted(kept, key=lambda k: (-scores[k], k)), dtype=np.int64)
    return (boxes[kept_arr].reshape(-1, 4), scores[kept_arr],
            classes[kept_arr].astype(np.int64))


def detect(outputs: np.ndarray, conf: float = CONF, iou: float = IOU_NMS
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`decode` for each image of a batch output.

    Parameters
    ----------
    outputs : ndarray, shape (N, 4 + C, A)
    conf, iou : float
        As in :func:`decode`.

    Returns
    -------
    list of (boxes (K, 4), scores (K,), classes (K,))
        One tuple per image.
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 3:
        raise ValueError(f"expected (N, 4 + C, A), got shape {outputs.shape}")
    return [decode(o, conf, iou) for o in outputs]


def match_f1(ref: Sequence[tuple[np.ndarray, np.ndarray]],
             new: Sequence[tuple[np.ndarray, np.ndarray]],
             iou: float = IOU_MATCH) -> dict[str, float]:
    """Box F1 of ``new`` against ``ref`` over all images, a match needing the same class.

    Parameters
    ----------
    ref, new : sequence of (boxes (K, 4) xyxy, classes (K,)) per image
        The reference (original model or ground truth) and the candidate detections.
    iou : float
        Minimum IoU of a match (greedy one-to-one, :func:`task_metrics.match_boxes`, run per
        class).

    Returns
    -------
    dict
        ``n_ref``, ``n_new``, ``matches``, ``f1`` (:func:`task_metrics.detection_f1`:
        1.0 when neither side has a box), ``precision``, ``recall``.
    """
    if len(ref) != len(new):
        raise ValueError(f"{len(ref)} reference images but {len(new)} candidate images")
    n_ref = n_new = matches = 0
    for (rb, rc), (nb, nc) in zip(ref, new):
        rb, nb = np.asarray(rb).reshape(-1, 4), np.asarray(nb).reshape(-1, 4)
        rc, nc = np.asarray(rc).reshape(-1), np.asarray(nc).reshape(-1)
        n_ref += len(rb)
        n_new += len(nb)
        for c in np.union1d(rc, nc):
            matches += match_boxes(rb[rc == c], nb[nc == c], iou)[0]
    return {"n_ref": n_ref, "n_new": n_new, "matches": matches,
            "f1": detection_f1(n_ref, n_new, matches),
            "precision": matches / n_new if n_new else 1.0,
            "recall": matches / n_ref if n_ref else 1.0}


def predict(model_path: str | Path, images: np.ndarray, batch_size: int = 50,
            threads: int | None = None) -> np.ndarray:
    """Run the model on ``images`` in batches with onnxruntime (CPU).

    Parameters
    ----------
    model_path : path
        ONNX model; its first input is fed, its first output returned.
    images : ndarray, shape (N, C, H, W)
        Cast to float32.
    batch_size : int
        Rows per ``session.run``.
    threads : int, optional
        Intra-op threads (onnxruntime's default when None).

    Returns
    -------
    ndarray
        The first output of every batch, concatenated on axis 0.
    """
    import onnxruntime as ort

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    images = np.ascontiguousarray(images, dtype=np.float32)
    return np.concatenate([sess.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def ground_truth(data: dict | np.lib.npyio.NpzFile) -> list[tuple[np.ndarray, np.ndarray]]:
    """``boxes`` (N, K, 4) / ``labels`` (N, K) with -1 padding -> per-image (boxes, classes)."""
    boxes, labels = np.asarray(data["boxes"]), np.asarray(data["labels"])
    return [(b[lab >= 0], lab[lab >= 0]) for b, lab in zip(boxes, labels)]


def _pairs(dets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    return [(b, c) for b, _, c in dets]


def compare(original: np.ndarray, rewritten: np.ndarray, conf: float = CONF,
            iou: float = IOU_NMS) -> dict[str, float]:
    """Box F1 of the rewritten model's detections against the original's.

    Parameters
    ----------
    original, rewritten : ndarray, shape (N, 4 + C, A)
        Raw outputs of the two models on the same images.
    conf, iou : float
        Confidence threshold and per-class NMS IoU (:func:`decode`).

    Returns
    -------
    dict
        As :func:`match_f1`, the original's detections as reference.
    """
    if np.shape(original) != np.shape(rewritten):
        raise ValueError(f"output shapes differ: {np.shape(original)} vs {np.shape(rewritten)}")
    return match_f1(_pairs(detect(original, conf, iou)), _pairs(detect(rewritten, conf, iou)))


def evaluate_vs_ground_truth(model_path: str | Path, data_path: str | Path, conf: float = CONF,
                             iou: float = IOU_NMS) -> dict[str, float]:
    """Box F1 of ``model_path``'s detections against the ``.npz`` ground truth.

    Parameters
    ----------
    model_path : path
        The detector.
    data_path : path
        ``.npz`` with ``images``, ``boxes`` (N, K, 4) xyxy and ``labels`` (N, K), -1 = padding.
    conf, iou : float
        As in :func:`decode`.

    Returns
    -------
    dict
        As :func:`match_f1`, ground truth as reference.
    """
    with np.load(data_path) as data:
        images, gt = data["images"], ground_truth(data)
    return match_f1(gt, _pairs(detect(predict(model_path, images), conf, iou)))


def feature_change(original: np.ndarray, rewritten: np.ndarray) -> np.ndarray:
    """How much each row of axis 1 moved, relative to its own scale.

    Parameters
    ----------
    original, rewritten : ndarray, shape (N, F, ...)
        Outputs of the two models; axis 1 holds the features (box rows, class rows).

    Returns
    -------
    ndarray, shape (F,)
        ``RMS(rewritten[:, f] - original[:, f]) / RMS(original[:, f])`` over all other axes
        (the plain RMS of the change where the original's row is all zero).
    """
    ref = np.moveaxis(np.asarray(original, np.float64), 1, 0).reshape(np.shape(original)[1], -1)
    new = np.moveaxis(np.asarray(rewritten, np.float64), 1, 0).reshape(ref.shape)
    rms = np.sqrt(np.mean(ref ** 2, axis=1))
    return np.sqrt(np.mean((new - ref) ** 2, axis=1)) / np.where(rms > 0, rms, 1.0)


def _line(tag: str, r: dict[str, float]) -> str:
    return (f"{tag}: F1 {r['f1']:.4f}  (reference {r['n_ref']} boxes, candidate {r['n_new']}"
            f" boxes, {r['matches']} matched; precision {r['precision']:.4f},"
            f" recall {r['recall']:.4f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="ORIGINAL.onnx [REWRITTEN.onnx] DATA.npz")
    parser.add_argument("--conf", type=float, default=CONF)
    parser.add_argument("--iou", type=float, default=IOU_NMS, help="per-class NMS IoU")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    if len(args.paths) not in (2, 3):
        parser.error("give ORIGINAL.onnx [REWRITTEN.onnx] DATA.npz")
    models, data_path = args.paths[:-1], args.paths[-1]
    with np.load(data_path) as data:
        images = data["images"]
        gt = ground_truth(data) if "boxes" in data and "labels" in data else None
    outs = [predict(m, images, args.batch_size) for m in models]
    print(f"{data_path}: {len(images)} images, output {outs[0].shape} "
          f"(4 box + {outs[0].shape[1] - 4} class rows, {outs[0].shape[2]} anchors)")
    confs = [args.conf] + ([0.1] if args.conf != 0.1 else [])
    for conf in confs:
        dets = [detect(o, conf, args.iou) for o in outs]
        if gt is not None:
            print(_line(f"conf {conf:g}  original vs ground truth", match_f1(gt, _pairs(dets[0]))))
        if len(outs) == 2:
            print(_line(f"conf {conf:g}  rewritten vs original", match_f1(_pairs(dets[0]),
                                                                          _pairs(dets[1]))))
            if gt is not None:
                print(_line(f"conf {conf:g}  rewritten vs ground truth",
                            match_f1(gt, _pairs(dets[1]))))
    if len(outs) == 2:
        ch = feature_change(outs[0], outs[1])
        print("RMS(change) / RMS(original) per row of axis 1: boxes "
              + " ".join(f"{v:.4f}" for v in ch[:4]) + " | classes "
              + " ".join(f"{v:.4f}" for v in ch[4:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
