"""Name → builder registry of backbones: ``@register_backbone("name")`` and ``build_backbone``."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

BackboneBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, BackboneBuilder] = {}

ALIASES: dict[str, str] = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100",
                           "r200": "iresnet200", "mbf": "mobilefacenet_mbf"}
"""The short names of insightface's arcface_torch, accepted wherever a backbone name is; each is the
backbone its weights import into (``train.insightface.CORRESPONDENCES``, checked by the tests)."""


def canonical_backbone(name: str) -> str:
    """The registered name of ``name`` (an alias such as ``r50`` becomes ``iresnet50``)."""
    return ALIASES.get(name, name)


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator that registers a builder ``fn(embedding_size=512, **options) -> nn.Module`` under ``name``."""

    def decorate(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BUILDERS:
            raise ValueError(f"backbone name {name!r} is registered twice "
                             f"({_BUILDERS[name].__module__} and {builder.__module__}): pick another name")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_backbones() -> list[str]:
    """Names of every registered backbone, in registration order."""
    return list(_BUILDERS)


def backbone_options(name: str) -> list[str]:
    """Keyword options that the builder of ``name`` accepts besides ``embedding_size``."""
    params = inspect.signature(_builder(name)).parameters
    return [p for p in params if p != "embedding_size"]


def build_backbone(name: str, embedding_size: int = 512, **options: Any) -> nn.Module:
    """Build the backbone ``name`` mapping ``[B,3,H,W]`` images in [-1,1] to ``[B, embedding_size]``."""
    builder = _builder(name)
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size={embedding_size!r} is not a positive integer: pass e.g. 512")
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in options if k not in params)
    if unknown and not takes_any:
        raise ValueError(f"backbone {name!r} does not take option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(backbone_options(name))}")
    return builder(embedding_size=embedding_size, **options)


def _builder(name: str) -> BackboneBuilder:
    try:
        return _BUILDERS[canonical_backbone(name)]
    except (KeyError, TypeError):
        aliases = ", ".join(f"{k}={v}" for k, v in ALIASES.items())
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(list_backbones())} "
                         f"(or an alias: {aliases})") from None
