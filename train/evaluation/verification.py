"""1:1 verification on pair lists (LFW-style ``.bin`` sets): 10-fold accuracy, TAR@FAR, AUC, ROC plot.

Layout: 2P images where rows 2i and 2i+1 form pair i, and ``issame[i]`` says whether the two
show one identity.  The embedding of an image is the sum of its embedding and that of its
horizontal flip, L2-normalised.  Accuracy follows the usual protocol: the pairs are cut into 10
consecutive folds; for each fold the threshold that is best on the other 9 is applied to it,
and the 10 accuracies are averaged.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .figures import line_plot
from .metrics import (
    accuracy_at,
    as_scores_and_labels,
    best_threshold,
    far_key,
    roc_auc,
    roc_curve,
    tar_at_far,
    thin_roc,
)

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
METRICS = ("cosine", "sql2")


def pair_scores(embeddings: np.ndarray | torch.Tensor, flipped: np.ndarray | torch.Tensor | None = None,
                metric: str = "cosine") -> np.ndarray:
    """Similarity of each consecutive pair of rows: cosine, or minus the squared L2 distance ("sql2")."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {METRICS}")
    emb = _as_array(embeddings)
    if flipped is not None:
        flip = _as_array(flipped)
        if flip.shape != emb.shape:
            raise ValueError(f"flipped embeddings {flip.shape} do not match embeddings {emb.shape}")
        emb = emb + flip
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"embeddings must be [2P, D] (pairs in consecutive rows), got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} embeddings are all zeros and cannot be normalised")
    emb = emb / norms
    a, b = emb[0::2], emb[1::2]
    if metric == "cosine":
        return np.sum(a * b, axis=1)
    return -np.sum((a - b) ** 2, axis=1)


def fold_slices(num_pairs: int, folds: int = 10) -> list[slice]:
    """Consecutive folds; the first ``num_pairs % folds`` get one extra pair."""
    if folds < 2 or num_pairs < folds:
        raise ValueError(f"cannot cut {num_pairs} pairs into {folds} folds: need folds >= 2 and "
                         f"at least one pair per fold")
    sizes = [num_pairs // folds + (1 if i < num_pairs % folds else 0) for i in range(folds)]
    starts = np.cumsum([0] + sizes)
    return [slice(int(starts[i]), int(starts[i + 1])) for i in range(folds)]


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy per fold, threshold per fold), each threshold chosen on the other folds."""
    s, y = as_scores_and_labels(scores, issame)
    accuracies, thresholds = [], []
    for test in fold_slices(s.size, folds):
        train = np.ones(s.size, dtype=bool)
        train[test] = False
        threshold, _ = best_threshold(s[train], y[train])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(s[test], y[test], threshold))
    return np.array(accuracies), np.array(thresholds)


def evaluate_scores(scores: np.ndarray, issame: np.ndarray, folds: int = 10,
                    fars: Sequence[float] = DEFAULT_FARS) -> dict[str, Any]:
    """Metrics of similarity scores: accuracy (mean, std over folds), threshold, AUC, TAR@FAR, ROC."""
    s, y = as_scores_and_labels(scores, issame)
    if y.all() or not y.any():
        raise ValueError(f"all {y.size} pairs are {'genuine' if y.all() else 'impostor'}: "
                         f"verification needs both kinds")
    accuracies, thresholds = kfold_accuracy(s, y, folds)
    fpr, tpr, _ = roc_curve(s, y)
    result: dict[str, Any] = {
        "accuracy": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std()),
        "threshold": float(thresholds.mean()),
        "auc": roc_auc(s, y),
        "num_pairs": int(s.size),
    }
    for far in fars:
        result[far_key(far)] = tar_at_far(s, y, far)[0]
    result["roc"] = thin_roc(fpr, tpr)
    return result


def evaluate_embeddings(embeddings: np.ndarray | torch.Tensor, issame: np.ndarray | Sequence[bool],
                        flipped: np.ndarray | torch.Tensor | None = None, metric: str = "cosine",
                        folds: int = 10, fars: Sequence[float] = DEFAULT_FARS) -> dict[str, Any]:
    """Verification metrics of 2P embeddings (plus optional flip embeddings) against ``issame`` [P].

    Every value is a float except ``"roc"``, a ``(fpr, tpr)`` pair of arrays for :func:`plot_roc`.
    ``"threshold"`` is in the metric's units: a cosine, or minus a squared L2 distance.
    TAR@FAR values are NaN when there are too few impostor pairs to measure that FAR.
    """
    scores = pair_scores(embeddings, flipped, metric)
    issame = np.asarray(issame).reshape(-1)
    if issame.size != scores.size:
        raise ValueError(f"{scores.size * 2} embeddings make {scores.size} pairs but issame has "
                         f"{issame.size} entries")
    return evaluate_scores(scores, issame, folds, fars)


def scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """The number entries of a result (everything but the ROC arrays), e.g. for logging; counts stay ints."""
    from .report import COUNT_KEYS
    return {k: int(v) if k in COUNT_KEYS else float(v) for k, v in result.items() if k != "roc"}


@torch.no_grad()
def embed_pairs(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of images and of their flips, from batches of ``(images, flipped)`` in [-1, 1]."""
    device = torch.device(device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = backbone.training
    backbone.eval()
    plain, flips, done = [], [], 0
    try:
        for images, flipped in batches:
            with autocast:
                plain.append(backbone(images.to(device, non_blocking=True)).float().cpu())
                flips.append(backbone(flipped.to(device, non_blocking=True)).float().cpu())
            done += images.shape[0]
            if progress is not None:
                progress(done)
    finally:
        backbone.train(was_training)
    if not plain:
        raise ValueError("the verification set yielded no images")
    return torch.cat(plain).numpy(), torch.cat(flips).numpy()


def evaluate_bin(backbone: nn.Module, vset: Any, batch_size: int = 256, device: str | torch.device = "cpu",
                 autocast_dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None
                 ) -> dict[str, Any]:
    """Verification metrics of ``backbone`` on a loaded ``.bin`` set (``data_pipeline.formats.verification``)."""
    from data_pipeline.formats.verification import verification_batches  # the data side owns image decoding

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    emb, flip = embed_pairs(backbone, verification_batches(vset, batch_size), device, autocast_dtype, progress)
    return evaluate_embeddings(emb, np.asarray(vset.issame), flipped=flip)


def plot_roc(results_by_name: Mapping[str, Mapping[str, Any]], path: str | Path,
             title: str = "ROC") -> Path:
    """Write a PNG of the ROC curves (log-scale FAR) of several results, keyed by name."""
    if not results_by_name:
        raise ValueError("plot_roc needs at least one result")
    with line_plot(path, title, "lower right") as ax:
        for name, result in results_by_name.items():
            if "roc" not in result:
                raise ValueError(f"result {name!r} has no 'roc' entry: pass results of evaluate_embeddings")
            fpr, tpr = result["roc"]
            auc = result.get("auc", math.nan)
            keep = fpr > 0  # log axis
            ax.plot(fpr[keep], tpr[keep], label=f"{name} (AUC {auc:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_ylim(0, 1.01)
    return Path(path)


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
