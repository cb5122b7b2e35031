"""The checks of plain input values (numbers, choices, flags): one wording for every message.

Each check returns the value when it is allowed and otherwise raises an error that names the value and what is
allowed: ``"<name> must be <allowed>, got <value!r>"``. A wrong value is a ValueError (a number out of range, a
choice not offered, and, unless ``type_error=True``, a value of the wrong type); a flag that is not a bool is a
TypeError. A bool is never taken for a number. ``name`` is what the user wrote: an argument name, or a setting with
its option (``"epochs (--epochs)"``).

Example:
    >>> from resconv_plugin._checks import Interval, check_choice, check_fraction, check_int, check_number
    >>> check_int("epochs", 3)
    3
    >>> check_fraction("recovery_fade", 1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: recovery_fade must be in [0, 1), got 1.0
    >>> check_number("divergence_factor", 0.0, Interval(1, low_open=True), also=(0,))
    0.0
    >>> check_choice("level", "blocks", ("layer", "block"))
    Traceback (most recent call last):
    ...
    ValueError: level must be one of layer, block, got 'blocks'
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Optional, Sequence, TypeVar

__all__ = ["Interval", "FRACTION", "POSITIVE", "NON_NEGATIVE", "check_int", "check_number", "check_fraction",
           "check_choice", "check_bool", "check_value"]

T = TypeVar("T")


@dataclass(frozen=True)
class Interval:
    """The numbers from ``low`` to ``high`` (None: unbounded on that side), each end closed unless ``*_open``;
    ``integer``: ints only. A bool is in no interval. ``str()`` says it the way messages need it."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, Integral if self.integer else Real):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or bool(value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            bounds = "[("[self.low_open] + f"{low}, {high}" + "])"[self.high_open]
            return f"an int in {bounds}" if self.integer else f"in {bounds}"
        if self.integer:
            if self.low == 1 and not self.low_open:
                return "a positive int"
            if self.low is not None:
                return f"an int {'>' if self.low_open else '>='} {low}"
            return "an int" if self.high is None else f"an int {'<' if self.high_open else '<='} {high}"
        if self.low == 0 and self.low_open:
            return "a positive number"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return "a number" if self.high is None else f"{'<' if self.high_open else '<='} {high}"


#: [0, 1]: fractions and ratios.
FRACTION = Interval(0, 1)
#: Numbers > 0.
POSITIVE = Interval(0, low_open=True)
#: Numbers >= 0.
NON_NEGATIVE = Interval(0)


def check_value(name: str, value: T, interval: Optional[Interval] = None, choices: Sequence[Any] = (),
                optional: bool = False, type_error: bool = False) -> T:
    """``value`` when it is one of ``choices`` or in ``interval`` (or None, when ``optional``); the check that the
    others specialise.

    Args:
        name: what the message calls the value.
        value: the value to check.
        interval: the numbers allowed (None: none beyond ``choices``).
        choices: values allowed as they are (compared with ``==``; a bool only matches a bool).
        optional: None is allowed too.
        type_error: raise a TypeError, not a ValueError, for a value that is not a number at all (with an
            ``interval`` and no ``choices``).

    Raises:
        ValueError: ``value`` is not allowed (TypeError: see ``type_error``).
    """
    if value is None and optional:
        return value
    if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        return value
    if interval is not None and value in interval:
        return value
    allowed = [str(interval)] if interval is not None else []
    if choices:
        allowed.insert(0, ", ".join(map(str, choices)) if interval is not None else
                       "one of " + ", ".join(map(str, choices)))
    if optional:
        allowed.append("None")
    message = f"{name} must be {' or '.join(allowed)}, got {value!r}"
    if type_error and interval is not None and not choices and (
            isinstance(value, bool) or not isinstance(value, Integral if interval.integer else Real)):
        raise TypeError(message)
    raise ValueError(message)


def check_int(name: str, value: T, minimum: int = 0, optional: bool = False) -> T:
    """An int >= ``minimum`` ("a positive int" for 1); not a bool, not a float with an integral value.

    Raises:
        ValueError: anything else.
    """
    return check_value(name, value, Interval(minimum, integer=True), optional=optional)


def check_number(name: str, value: T, interval: Interval = Interval(), also: Sequence[Any] = (),
                 optional: bool = False, type_error: bool = False) -> T:
    """A number (int or float, not a bool) in ``interval``, or one of ``also`` (e.g. ``0`` for "off").

    Raises:
        ValueError: anything else (TypeError for a value that is not a number, with ``type_error``).
    """
    return check_value(name, value, interval, also, optional=optional, type_error=type_error)


def check_fraction(name: str, value: T, high_open: bool = False, optional: bool = False,
                   type_error: bool = False) -> T:
    """A number in [0, 1] (in [0, 1) with ``high_open``).

    Raises:
        ValueError: anything else (TypeError for a value that is not a number, with ``type_error``).
    """
    return check_value(name, value, Interval(0, 1, high_open=high_open), optional=optional, type_error=type_error)


def check_choice(name: str, value: T, choices: Sequence[Any], optional: bool = False) -> T:
    """One of ``choices`` (``optional``: or None).

    Raises:
        ValueError: anything else.
    """
    return check_value(name, value, choices=tuple(choices), optional=optional)


def check_bool(name: str, value: T) -> T:
    """True or False, nothing that merely tests true.

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:g}"
