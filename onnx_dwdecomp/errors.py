"""One exception hierarchy for the whole package.

Every error the user can cause (a bad file, a bad flag, bad calibration data, an impossible
budget) is a :class:`UserError`: the CLI prints its message as one line and exits with code 2.
Anything else that escapes is a bug and is shown with its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run on for pages), or its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class DwDecompError(Exception):
    """Base class of every error raised on purpose by onnx_dwdecomp."""

    exit_code = 1


class UserError(DwDecompError):
    """The input (model, data, options) is not usable; the message says what, where and why."""

    exit_code = 2


class ModelError(UserError):
    """The model file is missing, unreadable, not ONNX, or inconsistent."""


class OptionError(UserError):
    """A flag or API argument has an invalid value."""


class CalibrationError(UserError):
    """Calibration data cannot be used with this model."""


class BudgetError(UserError):
    """A cost or error budget cannot be met by any choice of layers and multipliers."""


class VerificationFailed(DwDecompError):
    """The rewritten model's outputs differ from the original's by more than allowed."""

    exit_code = 1
