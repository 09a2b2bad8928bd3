"""The user's own Python code named on the command line: ``module:callable`` or ``file.py:callable``
(``--calib-reader``, ``--eval``)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import OptionError, UserError, exc_text


def load_callable(spec: str, what: str, raised: type[UserError]) -> Callable[..., Any]:
    """The callable named by ``spec`` (``"package.module:name"`` or ``"path/to/file.py:name"``;
    ``name`` may be dotted, ``"mod:Class.create"``), imported, not called.

    ``what`` names the flag's role in messages ("calibration reader", "evaluate function").
    A malformed spec, a missing module, file or attribute, or one that is not callable is an
    :class:`OptionError`; importing code that raises is ``raised`` (the caller's error type).
    """
    if not isinstance(spec, str):
        raise OptionError(f"{what} must be 'module:callable' or 'file.py:callable', got {spec!r}")
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise OptionError(f"{what} {spec!r}: expected 'module:callable' or 'path/to/file.py:callable'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise OptionError(f"{what} {spec!r}: file not found: {target}")
        modname = "_onnx_dwdecomp_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        mspec = importlib.util.spec_from_file_location(modname, path)
        if mspec is None or mspec.loader is None:
            raise OptionError(f"{what} {spec!r}: cannot import {target} as a Python file")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[modname] = module
        try:
            mspec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # sys.exit() or argparse at import time included
            sys.modules.pop(modname, None)
            raise raised(f"importing {what} file {target} raised {exc_text(e)}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise OptionError(f"{what} {spec!r}: module {target!r} not found "
                                  "(expected 'module:callable' or 'path/to/file.py:callable')") from e
            raise raised(f"importing {what} module {target!r} raised {exc_text(e)}") from e
        except (Exception, SystemExit) as e:
            raise raised(f"importing {what} module {target!r} raised {exc_text(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"{what} {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptionError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def display_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a callable, for messages and the report."""
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    if module.startswith("_onnx_dwdecomp_user_"):
        module = getattr(sys.modules.get(module), "__file__", None) or module
    return f"{module}:{name}"
