"""Evaluation: 1:1 verification on pair lists (``.bin``); IJB-B/C template verification in ``.ijb``;
1:N identification in ``.identification``, ``.ijb_1n`` (IJB-B/C) and ``.distractors``."""
from .metrics import best_threshold, roc_auc, roc_curve, tar_at_far
from .verification import evaluate_bin, evaluate_embeddings, evaluate_scores, plot_roc, scalars

__all__ = ["best_threshold", "evaluate_bin", "evaluate_embeddings", "evaluate_scores", "plot_roc", "roc_auc",
           "roc_curve", "scalars", "tar_at_far"]
