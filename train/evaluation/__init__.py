"""Evaluation: 1:1 verification on pair lists (``.bin``) and IJB-B/C template verification."""
from .ijb import evaluate_ijb, pool_templates, read_face_list, read_template_pairs, tar_table
from .metrics import best_threshold, roc_auc, roc_curve, tar_at_far
from .verification import evaluate_bin, evaluate_embeddings, evaluate_scores, plot_roc, scalars

__all__ = ["best_threshold", "evaluate_bin", "evaluate_embeddings", "evaluate_ijb", "evaluate_scores",
           "plot_roc", "pool_templates", "read_face_list", "read_template_pairs", "roc_auc", "roc_curve",
           "scalars", "tar_at_far", "tar_table"]
