"""The one generic reader: a section of the config document becomes a frozen dataclass by
walking the dataclass's declared fields (balancers.settings.setting). The annotation gives the
type, the declaration gives the default and bounds; nothing here knows any key by name.

Every refusal names the key path and the bad value (`ConfigError`), never a traceback: an
operator reading it should know which line of which file to fix.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from balancers.settings import Setting, declared

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_ABSENT = object()


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


class Section:
    """One mapping of the document: keys are taken as they are read, and whatever is left
    unread at the end is refused as unknown."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or '<top level>'}: expected a mapping, got {data!r}")
        self.data = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, default: Any = None) -> Any:
        return self.data.pop(name, default)

    def done(self) -> None:
        if self.data:
            key = next(iter(self.data))
            raise ConfigError(f"{self.key(str(key))}: unknown key (value {self.data[key]!r})")


def read(cls: type[T], data: Any, path: str, defaults: Mapping[str, Any] | None = None) -> T:
    """`cls` from one mapping: every declared key read, nothing unknown left. `defaults` replace
    declared defaults that depend on the surroundings (an endpoint inherits its model's weight)."""
    section = Section(data, path)
    values = read_keys(cls, section, defaults or {})
    section.done()
    return cls(**values)


def read_keys(cls: type, section: Section, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The declared keys of `cls` taken from `section`, converted; others are the caller's."""
    values = {}
    for field, spec, hint in declared_fields(cls):
        default = defaults.get(field.name, field.default)
        raw = section.take(field.name, _ABSENT)
        if raw is _ABSENT and default is not dataclasses.MISSING:
            values[field.name] = default
            continue
        values[field.name] = convert(raw, hint, spec, section.key(field.name), default)
    return values


def declared_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Setting, Any]]:
    """(field, declaration, resolved type) for each field of `cls` that is a key."""
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        spec = declared(field)
        if spec is not None:
            yield field, spec, hints[field.name]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert(value: Any, hint: Any, spec: Setting, path: str, default: Any) -> Any:
    """One value of type `hint`, checked against its declaration."""
    if value is _ABSENT:
        raise ConfigError(f"{path}: missing")
    optional = _is_optional(hint)
    base = _strip_optional(hint)
    if value is None and (optional or base is str or _is_section(base) or _is_pairs(base)):
        return None if optional else default
    if dataclasses.is_dataclass(base):
        return read(base, value, path)  # type: ignore[arg-type]
    converted = _converter(base)(value, path)
    if base is str and not converted:
        converted = None if optional else default  # an empty string means "not set"
    if isinstance(converted, int | float) and not isinstance(converted, bool):
        _check_bounds(converted, spec, path)
    if spec.choices and converted not in spec.choices:
        expected = " or ".join(repr(choice) for choice in spec.choices)
        raise ConfigError(f"{path}: expected {expected}, got {converted!r}")
    if spec.validate is not None and converted is not None:
        try:
            converted = spec.validate(converted, path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return converted


def _check_bounds(value: float, spec: Setting, path: str) -> None:
    if spec.positive:
        if value <= 0:
            raise ConfigError(f"{path}: must be a positive number, got {value!r}")
    elif spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"{path}: must be >= {spec.minimum:g}, got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"{path}: must be <= {spec.maximum:g}, got {value!r}")


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _boolean(value: Any, path: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        value = value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def _parsed(value: Any, parse: Callable[[str], Any]) -> Any:
    """Environment variables arrive as strings: a number in a string is that number."""
    if isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            pass
    return value


def _integer(value: Any, path: str) -> int:
    value = _parsed(value, int)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    return value


def _number(value: Any, path: str) -> float:
    value = _parsed(value, float)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    return float(value)


def _strings(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
    return tuple(value)


def _weighted_names(value: Any, path: str) -> tuple[tuple[str, float], ...]:
    """A mapping of names to non-negative numbers, kept in the order written."""
    section = Section(value, path)
    pairs = []
    for name in list(section.data):
        number = _number(section.take(name), section.key(str(name)))
        _check_bounds(number, Setting(help=""), section.key(str(name)))
        pairs.append((str(name), number))
    return tuple(pairs)


def _named_strings(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """A mapping of names to non-empty strings, kept in the order written; from an environment
    variable, `name=value,name=value`."""
    if isinstance(value, str):
        entries = [item.partition("=") for item in value.split(",") if item.strip()]
        if not all(separator and name.strip() for name, separator, _ in entries):
            raise ConfigError(f"{path}: expected name=value,name=value, got {value!r}")
        value = {name.strip(): text.strip() for name, _, text in entries}
    section = Section(value, path)
    pairs = []
    for name in list(section.data):
        text = section.take(name)
        if not isinstance(text, str) or not text:
            raise ConfigError(
                f"{section.key(str(name))}: expected a non-empty string, got {text!r}"
            )
        pairs.append((str(name), text))
    return tuple(pairs)


def _converter(hint: Any) -> Callable[[Any, str], Any]:
    simple: dict[Any, Callable[[Any, str], Any]] = {
        str: _string,
        bool: _boolean,
        int: _integer,
        float: _number,
    }
    if hint in simple:
        return simple[hint]
    if _is_pairs(hint):
        return _named_strings if typing.get_args(hint)[0] == tuple[str, str] else _weighted_names
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        return _strings
    raise TypeError(f"no reader for settings of type {hint!r}")


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _is_optional(hint):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return hint


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_pairs(hint: Any) -> bool:
    """tuple[tuple[str, float | str], ...]: a mapping of names to weights (or to strings), in
    the order written."""
    args = typing.get_args(hint)
    return (
        typing.get_origin(hint) is tuple
        and len(args) == 2
        and args[1] is Ellipsis
        and typing.get_args(args[0]) in ((str, float), (str, str))
    )
