"""Turning YAML mappings and ``section.key=value`` strings into typed config dataclasses.

Kept apart from :mod:`train.config` so that the config module reads as a list of
settings, and this one as the (generic) machinery: type coercion from the annotations,
unknown-key errors with a suggestion, and the docstring under each field as help text.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key, the value and the fix."""


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "list": "a list like [a, b] or a,b", "tuple": "a list like [a, b]", "dict": "a mapping like {k: v}"}


def suggest(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_error(key: str, known: list[str]) -> ConfigError:
    """The error for a key that names no config field, with the closest known key."""
    return ConfigError(f"unknown config key '{key}'{suggest(key, known)}")


def is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None; (False, tp) otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def literal_choices(tp: Any) -> tuple | None:
    """The choices of a ``Literal[...]`` annotation (also inside Optional), else None."""
    _, tp = is_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a --set string) to the annotated type ``tp``."""
    optional, tp = is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{key}=None is not allowed: give a {getattr(tp, '__name__', tp)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        # A choice is read as the type of the choices (``parallel.zero_stage=2`` is the int 2);
        # whether it is one of them is the section's own check (it knows deprecated names).
        kinds = {type(c) for c in typing.get_args(tp)}
        return coerce(value, kinds.pop(), key) if len(kinds) == 1 else value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or not isinstance(number, (int, float)) or \
                    (isinstance(number, float) and not number.is_integer()):
                raise ValueError
            return int(number)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else \
                    [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            args = typing.get_args(tp)
            if origin is tuple:
                if len(args) == 2 and args[1] is Ellipsis:
                    return tuple(coerce(v, args[0], key) for v in value)
                if len(value) != len(args):
                    raise ConfigError(f"{key}={value!r} needs {len(args)} values, got {len(value)}")
                return tuple(coerce(v, a, key) for v, a in zip(value, args))
            return [coerce(v, args[0], key) for v in value] if args else list(value)
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        return value
    name = getattr(origin or tp, "__name__", str(tp))
    shown = value if isinstance(value, str) else repr(value)
    raise ConfigError(f"{key}={shown} is not a valid {name}: give {_KINDS.get(name, 'a ' + name)}")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, values: dict, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys raise ConfigError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping of keys, got {values!r}")
    types_ = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_:
            raise unknown_key_error(full, [f"{prefix}.{k}" if prefix else k for k in types_])
        kwargs[key] = coerce(value, types_[key], full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``"section.key=value"`` into (["section", "key"], "value")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value "
                          "(for example optim.lr=0.05)")
    key, value = text.split("=", 1)
    return [p for p in key.strip().split(".") if p], value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (its help text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and nested containers as YAML-friendly built-in types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value
