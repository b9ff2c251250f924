"""What every job kind's config dataclass shares: strict parsing of a stored (JSON) config.

A job record stores its config as JSON so any run can be reproduced; reading it back must
refuse unknown keys and wrong types with a readable ConfigError rather than let a typo become a
default or a string reach arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A job option is out of range or mistyped; the message names the option and what it must be."""


class JobConfig:
    """Base of every kind's config dataclass: its stored form, strict reading back, and checks."""

    LABEL: ClassVar[str] = "job"
    ERROR: ClassVar[type[ConfigError]] = ConfigError

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: object) -> T:
        """Strict: unknown keys and wrong types are errors (a typo must not become a default)."""
        return parse_config(cls, d, cls.LABEL, cls.ERROR)  # type: ignore[attr-defined]

    def need(self, ok: bool, msg: str) -> None:
        """A validate() check: raise this kind's ConfigError with msg unless ok."""
        if not ok:
            raise self.ERROR(msg)


def parse_config(cls: type[T], d: object, kind: str, error: type[ConfigError] = ConfigError) -> T:
    """Build dataclass `cls` from a mapping, strictly, then run its validate(); errors are `error`."""
    if not isinstance(d, dict):
        raise error(f"{kind} config must be a mapping")
    known = {f.name: f.type for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise error(f"unknown {kind} option(s): {', '.join(unknown)}")
    for key, value in d.items():
        if not has_type(value, str(known[key])):
            raise error(f"{kind} option {key} must be {known[key]}, got {type(value).__name__}")
    return cls(**d).validate()  # type: ignore[attr-defined]


def has_type(value: Any, annotation: str) -> bool:
    """Check a JSON value against a field annotation (kept as a string by `from __future__`)."""
    if annotation.endswith(" | None"):
        return value is None or has_type(value, annotation[: -len(" | None")])
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation in ("list[str]", "tuple[str, ...]"):
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if annotation in ("list[int]", "tuple[int, ...]"):
        return isinstance(value, list) and all(has_type(x, "int") for x in value)
    if annotation in ("list[float]", "tuple[float, ...]"):
        return isinstance(value, list) and all(has_type(x, "float") for x in value)
    if annotation == "dict[str, str]":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if annotation == "dict[str, int]":
        return isinstance(value, dict) and all(isinstance(k, str) and has_type(v, "int") for k, v in value.items())
    raise TypeError(f"no type check for annotation {annotation!r}")
