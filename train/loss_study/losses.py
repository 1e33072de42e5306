"""The losses of the loss study: how each is trained, as training-config overrides.

Margins are trained alone through the sharded classifier with their paper's defaults
(``loss.margin_options={}``).  The metric losses are trained as their papers used them for
faces: center loss as softmax + λ·center (Wen et al. 2016: λ = 0.003, α = 0.5); triplet
(FaceNet-style, here batch-hard) and circle loss (pair form) alone, without a classifier.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from partial_fc.margins import MARGINS, build_margin
from partial_fc.metric_losses import METRIC_LOSSES

CENTER_LAMBDA = 0.003
"""λ of softmax + λ·center: Wen et al. 2016's face-recognition setting."""


@dataclass(frozen=True)
class StudyLoss:
    """One entry of the study: a name, the config overrides that train it, and how it is trained."""

    name: str
    """Row name in the results (a margin name or a metric-loss name)."""
    overrides: tuple[str, ...]
    """``--set`` items applied on top of the study's common settings."""
    trained_as: str
    """Short description of the objective, e.g. ``softmax + 0.003·center``."""
    paper: str
    """The paper the loss and its defaults come from."""


def _margin_loss(name: str) -> StudyLoss:
    margin = build_margin(name)
    params = {k: v for k, v in margin.describe().items() if k != "name"}
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return StudyLoss(name, (f"loss.margin={name}", "loss.margin_options={}", "loss.metric_loss=none",
                            "loss.metric_weight=0.0", "loss.classifier=true"),
                     shown or "linear classifier with bias", margin.paper)


_METRIC = {
    "center": StudyLoss("center", ("loss.margin=softmax", "loss.margin_options={}", "loss.metric_loss=center",
                                   f"loss.metric_weight={CENTER_LAMBDA}", "loss.metric_options={}",
                                   "loss.classifier=true"),
                        f"softmax + {CENTER_LAMBDA:g}·center (alpha=0.5)",
                        "Wen et al., A Discriminative Feature Learning Approach for Deep Face Recognition, ECCV 2016"),
    "triplet": StudyLoss("triplet", ("loss.margin=normface", "loss.margin_options={}", "loss.metric_loss=triplet",
                                     "loss.metric_weight=1.0", "loss.metric_options={}", "loss.classifier=false"),
                         "batch-hard triplet alone (margin=0.3, no classifier)",
                         "Schroff et al., FaceNet, CVPR 2015; batch hard: Hermans et al. 2017"),
    "circle": StudyLoss("circle", ("loss.margin=normface", "loss.margin_options={}", "loss.metric_loss=circle",
                                   "loss.metric_weight=1.0", "loss.metric_options={}", "loss.classifier=false"),
                        "circle loss, pair form, alone (m=0.25, gamma=256, no classifier)",
                        "Sun et al., Circle Loss: A Unified Perspective of Pair Similarity Optimization, CVPR 2020"),
}


def default_loss_names() -> list[str]:
    """Every margin of ``partial_fc.margins.MARGINS``, then every metric loss."""
    missing = sorted(set(METRIC_LOSSES) - set(_METRIC))
    if missing:
        raise RuntimeError(f"metric loss(es) {missing} have no study entry in train/loss_study/losses.py")
    return list(MARGINS) + list(METRIC_LOSSES)


def study_loss(name: str) -> StudyLoss:
    """The study entry called ``name``; ValueError listing the valid names otherwise."""
    if name in MARGINS:
        return _margin_loss(name)
    if name in _METRIC:
        return _METRIC[name]
    raise ValueError(f"unknown loss {name!r} for the study: choose among {', '.join(default_loss_names())}")


def study_losses(names: list[str] | None) -> list[StudyLoss]:
    """Entries for ``names`` (default: all), in the given order; duplicates are an error."""
    names = default_loss_names() if not names else list(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"loss(es) {', '.join(repeated)} listed more than once in --losses")
    return [study_loss(n) for n in names]


TOY_SCALE = 16.0
"""Scale s of the 2-D / 3-D geometry runs.  s = 64 suits 128-D and larger features, whose class
weights are near-orthogonal; on a circle with 8 identities the neighbours sit 45° apart and a
target logit of s·cos θ saturates the softmax long before the features spread.  NormFace's bound
(s ≥ (C-1)/C · log((C-1)·p / (1-p))) asks for s ≈ 4 to reach p = 0.9 with C = 8 on a simplex;
the circle's closer neighbours need about four times that."""

_MARGIN_KEYS = ("m", "m2", "m3", "l_m", "u_m")
"""Margin parameters measured in radians or cosine units, shrunk with the toy's angular room
(``m1`` of combined and the integer ``m`` of the large-margin softmaxes are multipliers and stay)."""


def toy_room_deg(dim: int, identities: int) -> float:
    """Angle between neighbouring class directions when ``identities`` share a ``dim``-D unit sphere.

    2-D: 360° / C exactly.  3-D: twice the radius of the caps that cover the sphere at the
    hexagonal packing density π/√12 (C = 8 gives 78.6°; the best arrangement, a square
    antiprism, 74.9°).  Higher dimensions: 90°, the near-orthogonal weights of a real model.
    """
    if dim == 2:
        return 360.0 / identities
    if dim == 3:
        density = math.pi / math.sqrt(12.0)
        return min(90.0, 2.0 * math.degrees(math.acos(max(-1.0, 1.0 - 2.0 * density / identities))))
    return 90.0


def toy_overrides(loss: StudyLoss, dim: int, identities: int) -> tuple[str, ...]:
    """``--set`` items that fit ``loss`` to a ``dim``-D toy of ``identities`` classes (margins only).

    The scale becomes :data:`TOY_SCALE` and every additive margin shrinks by room / 90°, the
    ratio of the toy's neighbour angle to the near-orthogonal room the papers' margins were
    chosen for; without it, e.g. CosFace's m = 0.35 exceeds 1 - cos 45° = 0.29 on the circle
    and no feature can ever rank its own class first.  Metric losses keep their settings.
    """
    name = next((o.split("=", 1)[1] for o in loss.overrides if o.startswith("loss.margin=")), None)
    if name is None or name not in MARGINS or loss.name not in MARGINS:
        return ()
    factor = min(1.0, toy_room_deg(dim, identities) / 90.0)
    params = build_margin(name).describe()
    options: dict[str, float] = {}
    if "s" in params:
        options["s"] = TOY_SCALE
    for key in _MARGIN_KEYS:
        value = params.get(key)
        if isinstance(value, float):
            options[key] = round(value * factor, 4)
    # One dict-valued item, placed after the entry's own ``loss.margin_options={}``, which it replaces.
    return (f"loss.margin_options={json.dumps(options)}",) if options else ()
