"""Field checks shared by every typed config: each raises `FastpromptError` with a message
that names the field, the bad value and what it must be."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from fastprompt.errors import FastpromptError


def require(ok: bool, message: str) -> None:
    """Raise `FastpromptError(message)` unless `ok`."""
    if not ok:
        raise FastpromptError(message)


def is_int(value: Any) -> bool:
    """An int (Python or numpy) and not a bool (`isinstance(True, int)` holds)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def check_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1, maximum: int | None = None) -> None:
    """`name` must be an integer in [minimum, maximum] (or None where allowed)."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise FastpromptError(f"{name}={value!r} must be an integer {bound}")


def check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False, allow_none: bool = False) -> None:
    """`name` must be a finite number >= minimum (> minimum when strict)."""
    if value is None and allow_none:
        return
    if not is_number(value) or value < minimum or (strict and value == minimum):
        raise FastpromptError(f"{name}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def check_bool(name: str, value: Any) -> None:
    require(isinstance(value, bool), f"{name}={value!r} must be True or False")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    require(value in choices, f"{name}={value!r} must be one of {', '.join(map(str, choices))}")


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
