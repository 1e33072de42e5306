"""Feature geometry of labelled embeddings: how tight each identity is, how far apart identities are.

All angles are in degrees, between L2-normalised embeddings (float64).  A class *centre* is
the normalised mean of its normalised embeddings.  The two summary numbers of the loss
study are the mean angle of a sample to its own centre (compactness) and, per class, the
angle to the nearest other centre (separation), averaged over classes.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

_EPS = 1e-12


def unit_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows of ``x`` [N, D] scaled to unit length (float64); an all-zero row is an error."""
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("embeddings contain NaN or inf: the model diverged; check the run's loss")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms < _EPS).any():
        raise ValueError(f"embedding row {int(np.argmin(norms))} is zero and has no direction")
    return a / norms


def angle_deg(cos: np.ndarray) -> np.ndarray:
    """arccos in degrees, with cosines clipped to [-1, 1] (rounding can step outside)."""
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _check_labels(unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (unit.shape[0],):
        raise ValueError(f"labels have shape {labels.shape}, expected ({unit.shape[0]},): one per embedding")
    return labels


def class_centres(unit: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted class ids [C], unit centres [C, D]): the normalised mean direction of each class."""
    labels = _check_labels(unit, labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lone = classes[counts < 2][:5].tolist()
        raise ValueError(f"class(es) {lone} have a single sample: a centre and an intra-class angle need "
                         "at least two samples per class")
    sums = np.zeros((len(classes), unit.shape[1]))
    np.add.at(sums, inverse, unit)
    return classes, unit_rows(sums)


def centre_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose nearest class centre (by angle) is their own class's.

    A training accuracy that every loss has, with or without a classifier (metric losses
    train none), read from the features alone.
    """
    unit = unit_rows(embeddings)
    labels = _check_labels(unit, labels)
    classes, centres = class_centres(unit, labels)
    nearest = classes[np.argmax(unit @ centres.T, axis=1)]
    return float(np.mean(nearest == labels))


def intra_class_angles(unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] angle of each sample to its own class centre."""
    classes, centres = class_centres(unit, labels)
    index = np.searchsorted(classes, np.asarray(labels))
    return angle_deg(np.einsum("nd,nd->n", unit, centres[index]))


def nearest_centre_angles(centres: np.ndarray) -> np.ndarray:
    """[C] angle from each centre to the closest other centre."""
    if centres.shape[0] < 2:
        raise ValueError(f"{centres.shape[0]} class centre(s): separation needs at least two classes")
    cos = centres @ centres.T
    np.fill_diagonal(cos, -np.inf)
    return angle_deg(cos.max(axis=1))


def pair_angles(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray, max_negatives: int = 200_000,
                seed: int = 0, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(angles of every same-class pair, angles of a uniform sample of at most ``max_negatives``
    different-class pairs); each unordered pair counts once."""
    unit = unit_rows(embeddings)
    labels = _check_labels(unit, labels)
    n = unit.shape[0]
    _, counts = np.unique(labels, return_counts=True)
    num_pos = int((counts * (counts - 1) // 2).sum())
    num_neg = n * (n - 1) // 2 - num_pos
    keep = 1.0 if num_neg <= max_negatives else max_negatives / num_neg
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    # Row blocks against the rows after them: memory stays at chunk x N whatever N is.
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        cos = unit[rows] @ unit.T
        same = labels[rows, None] == labels[None, :]
        upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]
        pos.append(cos[same & upper])
        diff = cos[~same & upper]
        neg.append(diff if keep == 1.0 else diff[rng.random(diff.shape[0]) < keep])
    return angle_deg(np.concatenate(pos)), angle_deg(np.concatenate(neg))


def geometry_metrics(embeddings: np.ndarray | torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Compactness and separation of labelled embeddings (degrees).

    ``intra_angle``: mean angle of a sample to its class centre; ``inter_angle``: mean over
    classes of the angle to the nearest other centre; ``ratio``: inter / intra (higher is
    better separated); ``num_classes``, ``num_samples``.
    """
    unit = unit_rows(embeddings)
    labels = _check_labels(unit, labels)
    _, centres = class_centres(unit, labels)
    intra = intra_class_angles(unit, labels)
    inter = nearest_centre_angles(centres)
    return {"intra_angle": float(intra.mean()), "inter_angle": float(inter.mean()),
            "ratio": float(inter.mean() / max(intra.mean(), _EPS)),
            "num_classes": float(centres.shape[0]), "num_samples": float(unit.shape[0])}


def image_batches(images: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, flipped images)`` float32 in [-1, 1] from uint8 ``images`` [N, 3, H, W]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].float().div_(127.5).sub_(1.0)
        yield x, x.flip(3)


def embed_labelled(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device = "cpu",
                   progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """[N, D] embeddings of ``images``: image + flipped image, as in the verification protocol."""
    from train.evaluation.verification import embed_pairs  # one embedding routine for pairs and labelled sets

    plain, flipped = embed_pairs(model, image_batches(images, batch_size), device, progress=progress)
    return plain + flipped
