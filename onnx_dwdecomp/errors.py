"""One exception hierarchy for the whole package, and the exit codes of the command line.

==========  =================================================================================
exit code   meaning
==========  =================================================================================
0           the model (and ``--report``) were written
1           :class:`VerificationFailed`: the rewritten model failed verification — the
            ``--max-rel-error`` gate, or NaN/Inf in its outputs where the input model's are
            finite; nothing written
2           :class:`UserError`: the input (model, data, flags, destination, available memory)
            cannot be used; one ``error: …`` line, nothing written
3           internal error: a bug of this tool (an :class:`InternalError`, or any other
            exception); one ``internal error: … (rerun with --debug and report it)`` line,
            nothing written
130         interrupted (Ctrl-C); nothing written
==========  =================================================================================

``--debug`` shows the traceback instead of the one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130

#: Longest message line the CLI prints; longer ones are cut with "…".
MAX_LINE = 400

# "[ONNXRuntimeError] : 1 : FAIL : " and "/onnxruntime_src/core/x.h:46 void ns::f(const T&, ...) "
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_SOURCE_LOCATION = re.compile(r"\S+\.(?:h|hpp|hh|c|cc|cpp|cxx)[:(]\d+\)?\s*")


def _drop_cpp_signature(text: str) -> str:
    """Remove a ``file.h:46 <C++ signature>`` stretch (onnxruntime's, onnx's) from ``text``."""
    while True:
        m = _SOURCE_LOCATION.search(text)
        if not m:
            return text
        rest = text[m.end():]
        # a signature is "ret ns::name(args) [const] "; find its balanced argument list
        head = re.match(r"[\w:<>,*&~\s\[\]]*?\w+(?:::\w+|<[^()]*>)*\s*\(", rest)
        end = 0
        if head and "::" in rest[:head.end()]:
            depth = 0
            for i in range(head.end() - 1, len(rest)):
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                if depth == 0:
                    end = i + 1
                    break
            tail = re.match(r"\s*(?:const\s*)?", rest[end:])
            end += tail.end() if tail else 0
        text = text[:m.start()] + rest[end:]


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` as one readable line: onnxruntime's status prefix and C++ source locations and
    signatures dropped, whitespace collapsed, cut at ``limit`` characters."""
    text = _drop_cpp_signature(_ORT_PREFIX.sub("", str(text)))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run on for pages), or its type;
    made readable by :func:`one_line`."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return one_line(text) or type(exc).__name__


def exc_text(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line (:func:`one_line`, cut at ``limit`` characters), or the type
    alone: what a file reader or the user's code raised, inside a message of ours."""
    text = one_line(str(exc), limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DwDecompError(Exception):
    """Base class of every error raised on purpose by onnx_dwdecomp. One that is not a
    :class:`UserError` or :class:`VerificationFailed` is a bug (exit code 3)."""

    exit_code = EXIT_INTERNAL_ERROR


class UserError(DwDecompError):
    """The input (model, data, options) is not usable; the message says what, where and why."""

    exit_code = EXIT_USER_ERROR


class ModelError(UserError):
    """The model file is missing, unreadable, not ONNX, or inconsistent."""


class OptionError(UserError):
    """A flag or API argument has an invalid value."""


class OutputError(UserError):
    """The output model or the report cannot be written where asked (folder missing, not
    writable, disk full)."""


class CalibrationError(UserError):
    """Calibration data cannot be used with this model."""


class BudgetError(UserError):
    """A cost or error budget cannot be met by any choice of layers and multipliers."""


class EvaluationError(UserError):
    """The user's evaluation function (``--eval``) raised or returned something that is not a
    finite number."""


class ResourceError(UserError):
    """The job would need more memory than is available (resources.py); the message names
    the flag that makes it smaller."""


class NumericalError(UserError):
    """Values out of the range the computation can hold: non-finite weights or statistics, or
    data so large that float32 products overflow; the message says where."""


class VerificationFailed(DwDecompError):
    """The rewritten model's outputs differ from the original's by more than allowed, or are
    NaN/Inf where the original's are finite."""

    exit_code = EXIT_VERIFICATION_FAILED


class InternalError(DwDecompError):
    """A bug of this tool (e.g. a rewritten model that fails the ONNX checker)."""

    exit_code = EXIT_INTERNAL_ERROR


@dataclass(frozen=True)
class Refused:
    """Not an exception: something a stage declined to do, and why — a conv kept regular, a
    BatchNormalization not folded, a pair not merged. Every stage uses this one record:
    a function that may decline returns its result or a ``Refused``, a check returns ``None``
    or a ``Refused``. Helpers that do not know the node leave ``name`` empty; the caller names
    it with :meth:`named`."""

    name: str
    reason: str

    def named(self, name: str) -> Refused:
        return Refused(name, self.reason)


def refuse(reason: str) -> Refused:
    """A :class:`Refused` whose caller will name the node."""
    return Refused("", reason)
