"""The checks a config section runs on its own fields (its ``__post_init__``).

Every section of :mod:`train.config` derives from :class:`Section`: its ``Literal[...]``
fields are checked against their choices (with a "did you mean" for a near miss), and its
own ``__post_init__`` adds the range rules of its fields with the helpers below.  The error
names the key as ``--set`` spells it (``data.batch_size``), also for a section built alone
(``DataConfig(batch_size=0)``).  Rules that span sections live on ``TrainConfig``.

This module imports only :mod:`train.config_parse`; :mod:`train.config` imports it, never
the other way round.
"""
from __future__ import annotations

import dataclasses
import typing
import warnings
from typing import Any, ClassVar

from .config_parse import ConfigError, field_types, literal_choices, suggest


class Section:
    """Base of the config dataclasses: the ``--set`` prefix and the checks of its own fields."""

    PATH: ClassVar[str] = ""
    """The section's name in keys (``data`` for ``data.batch_size``); empty at the top level."""
    ALIASES: ClassVar[dict[str, dict[Any, Any]]] = {}
    """Deprecated choice names per field, mapped to the current ones (each warns once)."""

    def __post_init__(self) -> None:
        check_choices(self)

    def key(self, name: str) -> str:
        """The dotted key of field ``name`` (``data.batch_size``)."""
        return f"{self.PATH}.{name}" if self.PATH else name

    def at_least(self, name: str, low: float, hint: str = "") -> None:
        """Field ``name`` (None passes) must be >= ``low``."""
        value = getattr(self, name)
        if value is not None and value < low:
            raise ConfigError(f"{self.key(name)}={value!r} must be >= {low}{': ' + hint if hint else ''}")

    def within(self, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               hint: str = "") -> None:
        """Field ``name`` (None passes) must lie in the interval from ``low`` to ``high``."""
        value = getattr(self, name)
        if value is None:
            return
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ConfigError(f"{self.key(name)}={value!r} must be in {span}{': ' + hint if hint else ''}")


_warned: set[tuple[str, Any]] = set()  # deprecated names already reported in this process


def check_choices(section: Section) -> None:
    """Every ``Literal[...]`` field of ``section`` holds one of its choices (aliases renamed)."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        choices = literal_choices(field_types(type(section))[f.name])
        if choices is None:
            continue
        value = getattr(section, f.name)
        aliases = section.ALIASES.get(f.name, {})
        if value in aliases:
            value = rename_alias(section.key(f.name), value, aliases[value])
            setattr(section, f.name, value)
        check_choice(section.key(f.name), value, choices)


def rename_alias(key: str, old: Any, new: Any) -> Any:
    """``new``, after a one-time warning that ``key=old`` is deprecated."""
    if (key, old) not in _warned:
        _warned.add((key, old))
        warnings.warn(f"{key}={old} is deprecated: use {key}={new}", FutureWarning, stacklevel=4)
    return new


def check_choice(key: str, value: Any, choices: tuple) -> None:
    """ConfigError unless ``value`` is one of ``choices``, with the closest one suggested."""
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return
    hint = suggest(str(value), [str(c) for c in choices])
    raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}{hint}")


def choices_of(cls: type, name: str) -> tuple:
    """The choices of ``Literal[...]`` field ``name`` of dataclass ``cls``."""
    found = literal_choices(typing.get_type_hints(cls)[name])
    if found is None:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return found

