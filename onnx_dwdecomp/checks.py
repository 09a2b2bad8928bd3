"""Integer arguments, checked one way for the API and the command line: the value (or the
flag's text) and the least value allowed; anything else is an :class:`OptionError` naming it."""

from __future__ import annotations

import numbers
from typing import Any

from .errors import OptionError


def check_int(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` when it is an integer (Python or numpy, not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise OptionError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_int(text: str, what: str, minimum: int = 1) -> int:
    """A flag's text as an integer ``>= minimum`` (the message as :func:`check_int`'s)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be an integer >= {minimum}, got {text!r}") from None
    return check_int(value, what, minimum)
