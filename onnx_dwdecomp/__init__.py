"""onnx_dwdecomp — depth-wise decomposition of the regular convolutions of ONNX CNNs.

>>> from onnx_dwdecomp import decompose
>>> model, report = decompose("model.onnx", calib="calib.npz")     # doctest: +SKIP
>>> print(report.render())                                         # doctest: +SKIP
"""

from .errors import (BudgetError, CalibrationError, DwDecompError, InternalError, ModelError, NumericalError,
                     EvaluationError, OptionError, OutputError, Refused, ResourceError, UserError,
                     VerificationFailed)
from .pipeline import DecomposeOptions, DecomposeResult, decompose
from .report import Report
from .version import __version__  # noqa: F401  (the package face: onnx_dwdecomp.__version__)

__all__ = [
    "decompose", "DecomposeOptions", "DecomposeResult", "Report",
    "DwDecompError", "UserError", "ModelError", "OptionError", "OutputError", "CalibrationError", "BudgetError",
    "ResourceError", "EvaluationError", "NumericalError", "VerificationFailed", "InternalError", "Refused",
]
