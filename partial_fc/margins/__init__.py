"""Margins of the face-recognition literature, and a registry to build them by name.

Each margin turns the cosines of :class:`~partial_fc.margins.base.MarginInput` into the
logits of the distributed softmax; see ``docs/margins.md`` for the formulas and defaults.
"""
from __future__ import annotations

import inspect
from typing import Any

from .adaface import AdaFace
from .arcface import ArcFace
from .base import COS_EPS, Margin, MarginInput
from .combined import CombinedMargin
from .cosface import CosFace
from .curricularface import CurricularFace
from .elasticface import ElasticFace
from .lsoftmax import LSoftmax
from .magface import MagFace
from .normface import NormFace
from .softmax import Softmax
from .sphereface import SphereFace
from .subcenter import SubCenterArcFace

MARGINS: dict[str, type] = {cls.name: cls for cls in (
    Softmax, NormFace, LSoftmax, SphereFace, CosFace, ArcFace, CombinedMargin, SubCenterArcFace,
    CurricularFace, AdaFace, MagFace, ElasticFace)}


def margin_parameters(name: str) -> dict[str, Any]:
    """Hyper-parameters of the margin ``name`` and their defaults."""
    cls = _lookup(name)
    params = inspect.signature(cls).parameters  # the class: its __init__ without self
    return {k: p.default for k, p in params.items() if k != "self"}


def build_margin(name: str, **overrides: Any) -> Margin:
    """The margin registered as ``name`` with its paper's defaults, some replaced by ``overrides``."""
    cls = _lookup(name)
    valid = margin_parameters(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(f"margin {name!r} has no parameter {', '.join(map(repr, unknown))}: "
                         f"its parameters are {listed}")
    for key, value in overrides.items():
        _check_type(name, key, value, valid[key])
    return cls(**overrides)


def _check_type(name: str, key: str, value: Any, default: Any) -> None:
    """A parameter's value must have its default's type (an int where a float is expected is fine)."""
    if default is None or default is inspect.Parameter.empty:
        return  # no default to learn the type from: the margin checks it itself
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise MarginOptionError(key, f"{key}={value!r} must be {wanted} (default {default!r}) for margin {name!r}")


class MarginOptionError(ValueError, TypeError):
    """A margin parameter of the wrong type; ``key`` names the parameter."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _lookup(name: str) -> type:
    if not isinstance(name, str) or name not in MARGINS:
        raise ValueError(f"unknown margin {name!r}: choose one of {', '.join(MARGINS)}")
    return MARGINS[name]


__all__ = ["MARGINS", "MarginOptionError", "build_margin", "margin_parameters", "Margin", "MarginInput", "COS_EPS",
           "Softmax", "NormFace", "LSoftmax", "SphereFace", "CosFace", "ArcFace", "CombinedMargin",
           "SubCenterArcFace", "CurricularFace", "AdaFace", "MagFace", "ElasticFace"]
