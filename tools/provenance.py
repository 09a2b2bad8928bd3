"""Where and with what a study ran, and what a generator wrote: machine, versions, commit, sha256.

Printed into the headers of ``docs/RESULTS.md`` (``tools/reproduce.py``) and ``docs/ACCURACY.md``
(``tools/accuracy_study.py``); ``file_sha256`` into the generators' ``meta.json``
(``tools/make_resnet.py``, ``tools/make_residual_cnn.py``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, str]:
    """CPU count, platform and library versions (no torch import: the installed version)."""
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnx_dwdecomp": version("onnx-dwdecomp"),
        "onnxruntime": version("onnxruntime"),
        "onnx": version("onnx"),
        "numpy": version("numpy"),
        "scipy": version("scipy"),
        "torch": version("torch"),
        "matplotlib": version("matplotlib"),
    }
    try:
        info["loadavg"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        info["loadavg"] = "?"
    return info


def git_description(root: Path = ROOT) -> str:
    """'abc1234' or 'abc1234 + uncommitted changes' (never fails: '?' without git)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "onnx_dwdecomp"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head} + uncommitted changes in onnx_dwdecomp/" if dirty else head


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
