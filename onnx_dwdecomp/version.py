"""The package's version, and the one line ``--version`` prints (with the onnx and onnxruntime
it runs on). Imported by the package face, the command line, ``bench`` and the timing record."""

from __future__ import annotations

import onnx
import onnxruntime

__version__ = "0.1.0"


def version_line() -> str:
    """``onnx-dwdecomp 0.1.0 (onnx 1.x, onnxruntime 1.y)``."""
    return f"onnx-dwdecomp {__version__} (onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__})"
