"""Logits of a margin as functions of the angle, computed by the margin module the training uses.

A sweep of angles θ becomes a :class:`~partial_fc.margins.MarginInput` batch (one sample per
angle, unit class rows) and goes through the margin's own ``forward`` in eval mode, so a
curve shows exactly what the classifier feeds to the softmax.  Values are divided by the
margin's scale ``s`` (1 for the margins without one), so every curve lives on the cos θ axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from partial_fc.margins import Margin, MarginInput, build_margin

# Annealed margins (L-Softmax, SphereFace) are drawn at the end of their λ schedule.
_LATE_ITERATION = 10 ** 9


def margin_logits(margin: Margin, cos: np.ndarray | torch.Tensor, feature_norm: float | np.ndarray = 1.0,
                  weight_norm: float = 1.0) -> np.ndarray:
    """Logits [N, c] of ``margin`` (eval mode, no state change) for cosines [N, c], target column 0.

    ``feature_norm`` is ‖x‖ of each sample (a number or [N]); every class row has norm
    ``weight_norm`` and bias 0.  The result is float64, not divided by the scale.
    """
    c = torch.as_tensor(np.asarray(cos), dtype=torch.float32)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"cos must be [N, c] with c >= 1 (column 0 is the target), got {tuple(c.shape)}")
    n, cols = c.shape
    norms = torch.as_tensor(np.broadcast_to(np.asarray(feature_norm, dtype=np.float32), (n,)).copy())
    inp = MarginInput(cos=c.clone(), target=torch.zeros(n, dtype=torch.long), feature_norm=norms.unsqueeze(1),
                      weight_norm=torch.full((cols,), float(weight_norm)),
                      bias=torch.zeros(cols) if margin.uses_bias else None)
    was_training = margin.training
    margin.eval()  # eval: no running statistic, iteration counter or random draw advances
    try:
        with torch.no_grad():
            logits = margin(inp)
    finally:
        margin.train(was_training)
    return logits.double().numpy()


def margin_scale(margin: Margin) -> float:
    """The margin's scale s (1.0 for margins whose logits are not scaled by s)."""
    return float(getattr(margin, "s", 1.0))


@dataclass
class MarginCurve:
    """One curve: the target logit (or a negative's logit) / s over ``theta``."""

    label: str
    """Legend text."""
    margin: Margin
    """The margin module that produced the values."""
    theta: np.ndarray
    """Angles in radians, [N]."""
    value: np.ndarray
    """Logit / s at each angle, [N]."""
    feature_norm: float = 1.0
    """‖x‖ the margin saw."""
    column: int = 0
    """0: the target column swept over θ; 1: a negative column swept over θ (target fixed)."""
    target_theta: Optional[float] = None
    """For column 1: the fixed target angle (radians)."""
    group: str = "fixed"
    """Panel of the figure: fixed, adaptive or negative."""
    style: dict = field(default_factory=dict)
    """Matplotlib line style keywords."""


def target_curve(margin: Margin, theta: np.ndarray, label: str, feature_norm: float = 1.0,
                 group: str = "fixed", **style) -> MarginCurve:
    """The target logit / s of ``margin`` as θ sweeps ``theta``."""
    logits = margin_logits(margin, np.cos(theta)[:, None], feature_norm)
    return MarginCurve(label, margin, theta, logits[:, 0] / margin_scale(margin), feature_norm,
                       group=group, style=style)


def negative_curve(margin: Margin, theta: np.ndarray, target_theta: float, label: str, **style) -> MarginCurve:
    """The logit / s of a negative class at angle θ while the target sits at ``target_theta``."""
    cos = np.stack([np.full_like(theta, math.cos(target_theta)), np.cos(theta)], axis=1)
    logits = margin_logits(margin, cos)
    return MarginCurve(label, margin, theta, logits[:, 1] / margin_scale(margin), column=1,
                       target_theta=target_theta, group="negative", style=style)


def _late(name: str) -> Margin:
    margin = build_margin(name)
    margin.iteration.fill_(_LATE_ITERATION)
    return margin


def _adaface_for(z: float) -> tuple[Margin, float]:
    """AdaFace with settled batch statistics (μ = 20, σ = 5) and the norm whose ẑ is ``z``."""
    margin = build_margin("adaface")
    margin.batch_mean.fill_(20.0)
    margin.batch_std.fill_(5.0)
    norm = 20.0 + z * (5.0 + margin.eps) / margin.h
    return margin, norm


def standard_curves(theta: Optional[np.ndarray] = None) -> list[MarginCurve]:
    """The curves of the margin figure: every margin at its paper defaults."""
    theta = np.linspace(0.0, math.pi, 361) if theta is None else np.asarray(theta, dtype=np.float64)
    curves = [
        target_curve(build_margin("softmax"), theta, "softmax, NormFace: cos θ", color="black", lw=2.5),
        target_curve(_late("lsoftmax"), theta, "L-Softmax ψ(θ), m=4 (λ→0; −7 at 180°)", color="tab:brown"),
        target_curve(_late("sphereface"), theta, "SphereFace (λ=5 after annealing)", color="tab:purple"),
        target_curve(build_margin("cosface"), theta, "CosFace cos θ − 0.35", color="tab:blue"),
        target_curve(build_margin("arcface"), theta, "ArcFace, sub-center, CurricularFace: cos(θ + 0.5)",
                     color="tab:red"),
        target_curve(build_margin("combined"), theta, "combined cos(θ + 0.3) − 0.2", color="tab:green"),
    ]
    ada_styles = {-1.0: ("−1, low quality", ":"), 0.0: ("0, average", "--"), 1.0: ("+1, high quality", "-")}
    for z, (what, ls) in ada_styles.items():
        margin, norm = _adaface_for(z)
        curves.append(target_curve(margin, theta, f"AdaFace ẑ={what}", norm, "adaptive", color="tab:orange", ls=ls))
    for a, ls in ((10.0, ":"), (60.0, "--"), (110.0, "-")):
        margin = build_margin("magface")
        m = float(margin.margin_of(torch.tensor(a)))
        curves.append(target_curve(margin, theta, f"MagFace ‖x‖={a:g} (m={m:.3g})", a, "adaptive",
                                   color="tab:cyan", ls=ls))
    curves.append(target_curve(build_margin("elasticface"), theta, "ElasticFace mean margin cos(θ + 0.5)",
                               group="adaptive", color="tab:pink"))
    curves.append(target_curve(build_margin("arcface"), theta, "ArcFace (reference)", group="adaptive",
                               color="tab:red", lw=1, alpha=0.5))
    for t, ls in ((0.0, ":"), (0.5, "--"), (1.0, "-")):
        margin = build_margin("curricularface")
        margin.t.fill_(t)
        curves.append(negative_curve(margin, theta, math.radians(60.0),
                                     f"CurricularFace negative, t={t:g}", color="tab:olive", ls=ls))
    curves.append(negative_curve(build_margin("arcface"), theta, math.radians(60.0), "every other margin: cos θ",
                                 color="black", lw=1.5))
    return curves
