"""Task metrics shared by the tools: relative L2, mask IoU, box IoU, NMS, box matching and F1.

numpy only, so any tool (and its tests) can import them without torch or onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rel_l2(ref: np.ndarray, new: np.ndarray) -> float:
    """‖new − ref‖₂ / ‖ref‖₂ over all elements (0 when both are zero, inf when only ref is)."""
    ref = np.asarray(ref, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    if ref.shape != new.shape:
        raise ValueError(f"shape mismatch {ref.shape} vs {new.shape}")
    num, den = np.linalg.norm(new - ref), np.linalg.norm(ref)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return float(num / den)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def pooled_mask_iou(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """IoU over all pixels of several mask pairs (sum of intersections / sum of unions)."""
    inter = union = 0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
        if a.shape != b.shape:
            raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
        inter += int(np.logical_and(a, b).sum())
        union += int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else inter / union


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shapes (N, 4) × (M, 4) → (N, M); continuous coordinates."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[:, None] + area(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best score first (ties: lower index)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            ious = box_iou(boxes[i:i + 1], boxes[order])[0]
            order = [j for j, v in zip(order, ious) if v <= iou_threshold]
    return keep


def match_boxes(ref: np.ndarray, new: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, float]:
    """Greedy one-to-one matching by IoU (highest first); returns (#matches, mean matched IoU)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, 4)
    new = np.asarray(new, dtype=np.float64).reshape(-1, 4)
    if len(ref) == 0 or len(new) == 0:
        return 0, 0.0
    iou = box_iou(ref, new)
    pairs = sorted(((iou[i, j], i, j) for i in range(len(ref)) for j in range(len(new))
                    if iou[i, j] >= iou_threshold), key=lambda t: (-t[0], t[1], t[2]))
    used_r, used_n, got = set(), set(), []
    for v, i, j in pairs:
        if i not in used_r and j not in used_n:
            used_r.add(i)
            used_n.add(j)
            got.append(v)
    return len(got), (float(np.mean(got)) if got else 0.0)


def detection_f1(n_ref: int, n_new: int, matches: int) -> float:
    """F1 of the rewritten model's boxes against the original's (1.0 when both found none)."""
    if n_ref == 0 and n_new == 0:
        return 1.0
    return 2.0 * matches / (n_ref + n_new)
