"""Option dataclasses: one declaration carries an option's name, type, default, help text and
validation, and is read by the Python API, the CLI (`--option key=value`), the mask metadata,
the checkpoint fingerprint and the docs (`widetopo methods`).

An options class is a frozen dataclass whose fields use `option(default, help, check)`;
`check(name, value)` returns the normalised value or raises ValueError/TypeError naming the
option. Validation runs in `__post_init__` of `Options`, so an invalid value never exists.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Options", "option", "describe", "parse_assignment", "parse_field", "as_dict",
    "finite", "positive", "nonnegative", "between", "integer", "any_integer", "one_of", "boolean", "optional", "shape",
    "parse_shape", "format_shape", "format_value",
]

Check = Callable[[str, Any], Any]


def option(default: Any, help: str, check: Optional[Check] = None):
    """A dataclass field with a help text and a validation function."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every options dataclass (see the module docstring)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


def as_dict(options: Options) -> Dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def describe(cls) -> List[Tuple[str, str, Any, str]]:
    """(name, type name, default, help) of every field of an options class."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, _type_name(hints.get(f.name, Any)), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " | None" if len(args) == 1 else " | ".join(map(_type_name, args))
    if origin in (tuple, Tuple):
        return "tuple of int"
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------------------- checks

def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:20] + "..." + text[-8:] + f" ({len(text)} characters)"


def finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {_short(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        raise ValueError(f"{name} must be a finite number, got {_short(value)} (beyond float range)") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def between(low: float, high: float) -> Check:
    """A finite number in [low, high]: the range in which the option's arithmetic is sound."""
    def check(name: str, value) -> float:
        out = finite(name, value)
        if not low <= out <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {_short(value)}")
        return out

    return check


def positive(name: str, value) -> float:
    if finite(name, value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def nonnegative(name: str, value) -> float:
    if finite(name, value) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def integer(minimum: int) -> Check:
    def check(name: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {_short(value)}")
        if value > INT64_MAX:
            raise ValueError(f"{name} must be an integer >= {minimum} and <= 2**63 - 1 (int64), got {_short(value)}")
        return int(value)

    return check


INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def any_integer(name: str, value) -> int:
    """Any integer that fits torch's int64 (targets and seeds are int64 tensors)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_short(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**63 - 1] (int64), got {_short(value)}")
    return int(value)


def one_of(*choices: str, aliases: Optional[Dict[str, str]] = None) -> Check:
    table = {c: c for c in choices}
    table.update(aliases or {})

    def check(name: str, value) -> str:
        if not isinstance(value, str) or value.lower() not in table:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return table[value.lower()]

    return check


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def optional(check: Check) -> Check:
    def wrapped(name: str, value):
        return None if value is None else check(name, value)

    return wrapped


def parse_shape(name: str, value) -> Tuple[int, ...]:
    """One sample's shape from a sequence of positive ints or its text form "3x32x32" (also
    "3,32,32"; a single size "66" is (66,)). Floats, bools and empty shapes are refused."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.lower().replace(",", "x").split("x")]
        if not value.strip() or not all(p.isdigit() for p in parts):
            raise ValueError(f"{name} must be positive sizes written like 3x32x32, got {value!r}")
        value = [int(p) for p in parts]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of positive sizes such as (3, 32, 32) or the text "
                         f"3x32x32, got {value!r}")
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= INT64_MAX for s in value):
        raise ValueError(f"{name} must be a non-empty sequence of positive integer sizes such as (3, 32, 32), "
                         f"got {value!r}")
    return tuple(int(s) for s in value)


def format_shape(value: Sequence[int]) -> str:
    """The printed form of a shape, read back by parse_shape: (1, 8, 8) -> "1x8x8"."""
    return "x".join(str(int(s)) for s in value)


shape = parse_shape  # the option check


# ------------------------------------------------------------------------------- CLI parsing

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_text(tp, text: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_text(args[0], text)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if origin in (tuple, Tuple) or tp in (tuple, Tuple):
        return parse_shape("value", text)
    return text


def format_value(value) -> str:
    """The text form of an option value that parse_assignment reads back (None, bools, shapes)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return format_shape(value)
    return str(value)


def parse_assignment(classes: Sequence[type], text: str) -> Tuple[str, Any]:
    """Parse "key=value" for a field of one of `classes` into (key, typed value).

    Raises ValueError naming the key and the allowed keys."""
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, raw = (s.strip() for s in text.split("=", 1))
    key = key.replace("-", "_")
    for cls in classes:
        if key in {f.name for f in dataclasses.fields(cls)}:
            return key, _read(cls, key, raw)
    allowed = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
    raise ValueError(f"unknown option {key!r}; allowed: {', '.join(allowed) if allowed else 'none'}")


def _read(cls, key: str, raw: str):
    tp = typing.get_type_hints(cls).get(key, str)
    try:
        return _parse_text(tp, raw)
    except ValueError as exc:
        raise ValueError(f"option {key}: cannot read {raw!r} as {_type_name(tp)} ({exc})") from None


def parse_field(cls, key: str, text: str):
    """The text of a command-line flag -> the typed value of field `key` of options class `cls`,
    validated by the field's check (ValueError/TypeError naming the option otherwise)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[key]
    value = _read(cls, key, text.strip())
    check = field.metadata.get("check")
    return value if check is None else check(key, value)
