"""Score-level metrics shared by the verification protocols: ROC, AUC, TAR@FAR and best-threshold accuracy.

Scores are similarities: higher means "same identity".  Labels are booleans (True = genuine pair,
False = impostor pair).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def as_scores_and_labels(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores and bool labels of equal length, with a clear error otherwise."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be booleans or 0/1, got values {np.unique(y)[:5].tolist()}")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels: give one label per pair")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite: check the embeddings")
    return s, y


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) accepting ``score >= threshold``, thresholds descending, starting at (0, 0)."""
    s, y = as_scores_and_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(~y)[last_of_value]
    num_pos, num_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fp / num_neg]
    tpr = np.r_[0.0, tp / num_pos]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` ROC points, spread evenly in log-FAR and in FAR (for results and plots)."""
    if fpr.size <= max_points:
        return fpr, tpr
    half = max_points // 2
    grid = np.r_[np.logspace(np.log10(max(fpr[fpr > 0].min(), 1e-12)), 0, half), np.linspace(0, 1, half)]
    keep = np.unique(np.r_[0, np.searchsorted(fpr, grid, side="right") - 1, fpr.size - 1].clip(0, fpr.size - 1))
    return fpr[keep], tpr[keep]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC: P(genuine score > impostor score) + ½·P(equal); NaN without both classes."""
    s, y = as_scores_and_labels(scores, labels)
    genuine, impostor = s[y], np.sort(s[~y])
    if genuine.size == 0 or impostor.size == 0:
        return math.nan
    below = np.searchsorted(impostor, genuine, side="left")
    equal = np.searchsorted(impostor, genuine, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (genuine.size * impostor.size))


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose false-accept rate is at most ``far``.

    The threshold is read from the impostor scores: with N impostors and k = floor(far·N), it is
    the (k+1)-th highest impostor score and pairs scoring strictly above it are accepted, so at
    most k impostors pass.  When far < 1/N no impostor may pass and the estimate has no
    support: (NaN, NaN) is returned.
    """
    if not 0.0 < far <= 1.0:
        raise ValueError(f"far={far!r} is outside (0, 1]: use e.g. 1e-3")
    s, y = as_scores_and_labels(scores, labels)
    impostor = np.sort(s[~y])[::-1]
    genuine = s[y]
    allowed = int(math.floor(far * impostor.size + 1e-9))
    if allowed < 1 or genuine.size == 0:
        return math.nan, math.nan
    threshold = impostor[allowed] if allowed < impostor.size else -math.inf
    return float((genuine > threshold).mean()), float(threshold)


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of "same iff score > threshold" over these pairs.

    Candidates are the midpoints between consecutive distinct scores and one value beyond each
    end, so the search is exact.  Among equally accurate candidates the highest threshold wins.
    """
    s, y = as_scores_and_labels(scores, labels)
    values = np.unique(s)
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2, values[-1] + 1.0]
    sorted_pos, sorted_neg = np.sort(s[y]), np.sort(s[~y])
    # Correct = genuine pairs above the threshold + impostor pairs at or below it.
    pos_above = sorted_pos.size - np.searchsorted(sorted_pos, candidates, side="right")
    neg_below = np.searchsorted(sorted_neg, candidates, side="right")
    correct = pos_above + neg_below
    best = int(np.flatnonzero(correct == correct.max())[-1])
    return float(candidates[best]), float(correct[best] / s.size)


def accuracy_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Accuracy of "same iff score > threshold"."""
    s, y = as_scores_and_labels(scores, labels)
    return float(((s > threshold) == y).mean())


def far_key(far: float) -> str:
    """Result key of a TAR at one FAR, e.g. ``tar@far=1e-03``."""
    return f"tar@far={far:.0e}"
