"""The configuration reference in docs/training.md, generated from the config dataclasses' docstrings.

``python -m train.config_docs`` rewrites the part of ``docs/training.md`` between the
``config-reference`` markers; ``--check`` only reports whether it is up to date.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from .config import SECTIONS, TrainConfig
from .config_parse import field_docs, field_types, is_optional, literal_choices, to_plain

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _type_name(tp: Any) -> str:
    choices = literal_choices(tp)
    if choices is not None:  # a Literal: its choices, as they are written in YAML or --set
        text = "{" + ", ".join(map(str, choices)) + "}"
        return f"Optional[{text}]" if is_optional(tp)[0] else text
    text = str(tp) if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(value: Any) -> str:
    """A default as it is written in YAML or --set."""
    plain = to_plain(value)
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if plain is None:
        return "null"
    return '""' if plain == "" else str(plain)


def declared_defaults(cls: type) -> dict[str, Any]:
    """The declared default of each field of ``cls``, nothing validated (a section's defaults
    alone need not be a runnable config: the data section has no manifest)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and cls is TrainConfig:
            continue
        values[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return values


def section_table(name: str, cls: type, defaults: dict[str, Any]) -> str:
    """A Markdown table of one section: key, type, default, help."""
    docs, types = field_docs(cls), field_types(cls)
    lines = [f"### `{name}`" if name else "### top level", "", " ".join((cls.__doc__ or "").split()), "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in SECTIONS and not name:
            continue
        key = f"{name}.{f.name}" if name else f.name
        doc = docs.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{key}` | {_type_name(types[f.name])} | `{_default(defaults[f.name])}` | {doc} |")
    return "\n".join(lines)


def config_reference() -> str:
    """The whole reference: top-level keys, then one table per section."""
    parts = [section_table("", TrainConfig, declared_defaults(TrainConfig))]
    parts += [section_table(name, cls, declared_defaults(cls)) for name, cls in SECTIONS.items()]
    return "\n\n".join(parts)


def render(text: str) -> str:
    """``text`` with the reference between the markers replaced by the generated one."""
    if START not in text or END not in text:
        raise ValueError(f"{DOC} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the reference in docs/training.md."""
    p = argparse.ArgumentParser(description="generate the config reference of docs/training.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the document is out of date")
    args = p.parse_args(argv)
    text = DOC.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python -m train.config_docs", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote the config reference into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
