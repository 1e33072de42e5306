"""Building a metric loss by name, with overrides checked against its parameters."""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..comm import ProcessGroup
from .center import CenterLoss
from .circle import CircleLoss
from .triplet import TripletLoss

METRIC_LOSSES: dict[str, type] = {"center": CenterLoss, "triplet": TripletLoss, "circle": CircleLoss}
"""Metric losses by name."""

# Set by build_metric_loss itself, so not accepted as overrides.
_FIXED = ("num_classes", "embedding_size", "group")


def metric_loss_options(name: str) -> dict[str, Any]:
    """The parameters of the loss ``name`` that overrides may set, with their defaults."""
    cls = _lookup(name)
    params = inspect.signature(cls).parameters.values()  # the class: its __init__ without self
    return {p.name: p.default for p in params if p.name != "self" and p.name not in _FIXED}


def _lookup(name: str) -> type:
    if name not in METRIC_LOSSES:
        raise ValueError(f"unknown metric loss {name!r}: choose one of {', '.join(METRIC_LOSSES)}")
    return METRIC_LOSSES[name]


def build_metric_loss(name: str, num_classes: int, embedding_size: int, group: ProcessGroup = None,
                      **overrides: Any) -> nn.Module:
    """The metric loss ``name`` (center, triplet, circle) for C classes and D-wide features."""
    cls = _lookup(name)
    allowed = metric_loss_options(name)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{name} loss has no parameter {', '.join(map(repr, unknown))}: it accepts "
                         f"{', '.join(f'{k}={v!r}' for k, v in allowed.items())}")
    return cls(num_classes=num_classes, embedding_size=embedding_size, group=group, **overrides)
