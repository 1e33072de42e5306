"""The losses of the loss study: how each is trained, as training-config overrides.

Margins are trained alone through the sharded classifier with their paper's defaults
(``loss.margin_options={}``).  The metric losses are trained as their papers used them for
faces: center loss as softmax + λ·center (Wen et al. 2016: λ = 0.003, α = 0.5); triplet
(FaceNet-style, here batch-hard) and circle loss (pair form) alone, without a classifier.
"""
from __future__ import annotations

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
