"""Image folders: ``*.jpg|*.jpeg|*.png`` sorted by name, decoded per batch with Pillow (imported
only when a folder is read), resized (shorter side) and center-cropped to the model's H×W,
scaled to [0, 1], normalised ``(x - mean) / std``, NCHW. Every file is decoded once (at reduced
scale for JPEG) before anything else is read.
"""

from __future__ import annotations

import importlib
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import CalibrationError, OptionError, exc_text
from .sources import Source
from .specs import InputSpec, fmt_expected, quoted_names

#: File name endings (compared case-insensitively) picked up from an image folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_PILLOW_MISSING = "reading an image folder needs Pillow: pip install 'onnx-dwdecomp[images]'"


def _import_pil() -> Any:
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as e:
        raise CalibrationError(_PILLOW_MISSING) from e


def _norm_values(values: Sequence[float], what: str, channels: int) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{what} must be a list of numbers, got {values!r}") from e
    if v.ndim != 1 or len(v) != channels:
        raise OptionError(f"{what} must have {channels} value(s), one per model input channel, got {values!r}")
    if not np.isfinite(v).all():
        raise OptionError(f"{what} must be finite numbers, got {values!r}")
    return v


class _ImageSource(Source):
    """Images decoded, resized, cropped and normalised per batch."""

    def __init__(
        self,
        image_module: Any,
        files: list[Path],
        spec: InputSpec,
        channels: int,
        mean: np.ndarray,
        std: np.ndarray,
        description: str,
    ):
        self._image = image_module
        self._files = files
        self._spec = spec
        self._mode = "L" if channels == 1 else "RGB"
        self._h = int(spec.shape[2])  # type: ignore[arg-type]
        self._w = int(spec.shape[3])  # type: ignore[arg-type]
        self._mean = mean.astype(np.float32)[:, None, None]
        self._std = std.astype(np.float32)[:, None, None]
        self.num_samples = len(files)
        self.sample_shapes = {spec.name: (channels, self._h, self._w)}
        self.description = description

    def load(self, path: Path, *, fast: bool = False) -> np.ndarray:
        """One image as a normalised ``(C, H, W)`` array in the model dtype.

        ``fast`` lets JPEG decode at reduced scale (``Image.draft``): only for checking
        that the file is readable, the pixels differ slightly.
        """
        image, mode, h, w = self._image, self._mode, self._h, self._w
        try:
            with image.open(path) as im:
                if fast:
                    im.draft(mode, (w, h))
                im = im.convert(mode)
                iw, ih = im.size
                if iw < 1 or ih < 1:
                    raise ValueError(f"empty image ({iw}x{ih})")
                # Resize so the image just covers h x w: for a square target, the shorter side
                # becomes the target size and the longer is truncated like torchvision's Resize.
                if w / iw >= h / ih:
                    nw, nh = w, max(h, int(w * ih / iw))
                else:
                    nw, nh = max(w, int(h * iw / ih)), h
                if (nw, nh) != (iw, ih):
                    resample = getattr(image, "Resampling", image).BILINEAR
                    im = im.resize((nw, nh), resample)
                left = int(round((nw - w) / 2.0))
                top = int(round((nh - h) / 2.0))
                im = im.crop((left, top, left + w, top + h))
                pixels = np.asarray(im, dtype=np.float32)
        except Exception as e:
            raise CalibrationError(f"cannot read image {path}: {exc_text(e)}") from e
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out = (pixels / np.float32(255.0) - self._mean) / self._std
        return out.astype(self._spec.dtype, copy=False)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, self.num_samples, batch_size):
            chunk = self._files[s : s + batch_size]
            yield {self._spec.name: np.stack([self.load(p) for p in chunk])}


def _file_kind(p: Path) -> str:
    try:
        mode = p.stat().st_mode
    except OSError as e:
        return exc_text(e)
    target = f"a link to {os.path.realpath(p)}, " if p.is_symlink() else ""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return target + name
    return target + "a special file"


def image_source(
    folder: Path, specs: list[InputSpec], calib_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> _ImageSource:
    try:
        files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        files = [p for p in files if not p.is_dir()]  # subfolders are not searched
        for p in files:  # a link to /dev/zero would be read for ever, a dangling one not at all
            if not p.is_file():
                what = ("a link to nothing (dangling)" if p.is_symlink() and not p.exists()
                        else f"not a regular file ({_file_kind(p)})")
                raise CalibrationError(f"image folder {folder}: {p.name} is {what}; remove it or point it at an image")
    except OSError as e:
        raise CalibrationError(f"cannot list image folder {folder}: {exc_text(e)}") from e
    if not files:
        raise CalibrationError(
            f"image folder {folder} contains no .jpg/.jpeg/.png files (subfolders are not searched)"
        )
    if len(specs) != 1:
        raise CalibrationError(
            f"an image folder ({folder}) can only feed a single-input model; this one has inputs "
            f"{quoted_names([s.name for s in specs])}: use an .npz keyed by input name or a reader"
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} must be NCHW (rank 4), "
            f"its shape is {fmt_expected(spec)}"
        )
    if spec.dtype.kind != "f":
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has dtype {spec.dtype}, images need a float input"
        )
    c, h, w = spec.shape[1:]
    channels = 3 if c is None else c
    if channels not in (1, 3):
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has {channels} channels, images give 1 (L) or 3 (RGB)"
        )
    if h is None or w is None:
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has a dynamic height/width "
            f"{fmt_expected(spec)}; give the size to crop to with --input-shape"
        )
    if h < 1 or w < 1:
        raise CalibrationError(f"image folder {folder}: model input {spec.name!r} has an empty image size {h}x{w}")
    mean_v = _norm_values(mean, "mean", channels)
    std_v = _norm_values(std, "std", channels)
    if (std_v == 0).any():
        raise OptionError(f"std must not contain 0, got {std!r}")
    image = _import_pil()
    total = len(files)
    if calib_size is not None:
        files = files[:calib_size]
    src = _ImageSource(image, files, spec, channels, mean_v, std_v, f"image folder {folder} ({len(files)} images)")
    src.available = total
    for p in files:  # validation pass: every file decodes
        src.load(p, fast=True)
    return src
