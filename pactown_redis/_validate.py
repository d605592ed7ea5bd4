"""Checks applied to every argument before anything is sent to Redis."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InvalidIdError, InvalidNumberError

#: Ids longer than this many UTF-8 bytes are rejected, which bounds every
#: key this package builds.
MAX_ID_BYTES = 256

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_id(value: Any, what: str) -> str:
    """Return ``value`` if it is a usable user or service id.

    An id is any ``str`` of 1 to ``MAX_ID_BYTES`` UTF-8 bytes; every
    character is allowed, since ids are encoded before they reach a key.

    Raises:
        InvalidIdError: not a ``str``, empty, too long, or not encodable
            as UTF-8 (a lone surrogate).
    """
    if not isinstance(value, str):
        raise InvalidIdError(
            f"{what} must be str, not {type(value).__name__}"
        )
    if not value:
        raise InvalidIdError(f"{what} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidIdError(f"{what} is not valid Unicode text") from exc
    if size > MAX_ID_BYTES:
        raise InvalidIdError(
            f"{what} is {size} bytes long; the limit is {MAX_ID_BYTES}"
        )
    return value


def check_namespace(value: Any) -> str:
    """Return ``value`` if it is a namespace: 1-64 of ``A-Z a-z 0-9 _ . -``.

    Raises:
        InvalidIdError: anything else, since the namespace is written into
            every key as it is.
    """
    if not isinstance(value, str) or not _NAMESPACE.fullmatch(value):
        raise InvalidIdError(
            f"namespace must be 1-64 characters of A-Z a-z 0-9 _ . -, "
            f"got {value!r}"
        )
    return value


def check_number(
    value: Any,
    what: str,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite number in range.

    The range is ``low <= value <= high`` (``low < value`` with
    ``low_open``). ``bool`` is refused even though it is an ``int``.

    Raises:
        InvalidNumberError: wrong type, NaN, infinite, or out of range.
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise InvalidNumberError(
            f"{what} must be {kind}, not {type(value).__name__}"
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number) and not isinstance(value, int):
        raise InvalidNumberError(f"{what} must be finite, got {value!r}")
    too_low = number <= low if low_open else number < low
    if too_low or number > high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise InvalidNumberError(
            f"{what} must be {bound} and <= {high:g}, got {_show(value)}"
        )
    return number


def _show(value: float) -> str:
    # repr() of an int of thousands of digits is slow or refused outright.
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of {value.bit_length()} bits"
    return repr(value)
