"""Verification metrics on hand-made embeddings and scores with answers computed by hand or by brute force."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from train.evaluation.metrics import best_threshold, roc_auc, roc_curve, tar_at_far, thin_roc
from train.evaluation.verification import (
    embed_pairs,
    evaluate_bin,
    evaluate_embeddings,
    fold_slices,
    pair_scores,
    plot_roc,
    scalars,
)


def pairs_with_cosines(cosines):
    """[2P, 2] embeddings whose consecutive rows have exactly the given cosines (with random scales)."""
    rng = np.random.default_rng(0)
    rows = []
    for c in cosines:
        base = rng.uniform(0, 2 * np.pi)
        angle = np.arccos(c)
        rows.append(rng.uniform(0.5, 3) * np.array([np.cos(base), np.sin(base)]))
        rows.append(rng.uniform(0.5, 3) * np.array([np.cos(base + angle), np.sin(base + angle)]))
    return np.array(rows)


def overlap_case():
    """100 pairs in 10 folds of 10 (5 genuine, 5 impostor each): genuine 0.9, impostor 0.1, except one
    impostor at 0.6 in every fold and one genuine at 0.3 in folds 0 and 1."""
    cos, same = [], []
    for fold in range(10):
        genuine = [0.9] * 5
        if fold < 2:
            genuine[0] = 0.3
        impostor = [0.6] + [0.1] * 4
        cos += genuine + impostor
        same += [True] * 5 + [False] * 5
    return np.array(cos), np.array(same)


def test_perfectly_separable_pairs_score_100_percent():
    rng = np.random.default_rng(1)
    same = np.arange(60) % 2 == 0
    cosines = np.where(same, rng.uniform(0.5, 1.0, 60), rng.uniform(-0.5, 0.3, 60))
    result = evaluate_embeddings(pairs_with_cosines(cosines), same)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["auc"] == 1.0
    assert cosines[~same].max() < result["threshold"] < cosines[same].min()


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.75), ("sql2", -(2 - 2 * 0.75))])
def test_constructed_overlap_accuracy_computed_by_hand(metric, threshold):
    cosines, same = overlap_case()
    result = evaluate_embeddings(pairs_with_cosines(cosines), same, metric=metric)
    # On every 9-fold training set a threshold in (0.6, 0.9) errs only on the <= 2 hard genuine pairs,
    # fewer than the 9 hard impostors any lower threshold lets in; so the midpoint 0.75 is chosen and
    # folds 0 and 1 each lose their hard genuine pair: accuracies 0.9, 0.9, 1 x 8.
    assert result["accuracy"] == pytest.approx(0.98)
    assert result["accuracy_std"] == pytest.approx(0.04)
    assert result["threshold"] == pytest.approx(threshold)
    # AUC: 48 genuine at 0.9 beat all 50 impostors, 2 at 0.3 beat the 40 at 0.1.
    assert result["auc"] == pytest.approx((48 * 50 + 2 * 40) / 2500)
    # 50 impostors cannot measure FAR 1e-2 or below.
    assert math.isnan(result["tar@far=1e-02"]) and math.isnan(result["tar@far=1e-04"])


def test_flip_embeddings_are_summed_before_normalising():
    emb = np.array([[1.0, 0.0], [1.0, 0.0]])
    flipped = np.array([[0.0, 1.0], [2.0, 0.0]])
    assert pair_scores(emb)[0] == pytest.approx(1.0)
    assert pair_scores(emb, flipped)[0] == pytest.approx(1 / math.sqrt(2))
    assert pair_scores(emb, flipped, metric="sql2")[0] == pytest.approx(-(2 - math.sqrt(2)))


def test_tar_at_far_on_a_constructed_distribution():
    impostor = np.arange(1000) / 1000  # 0.000 ... 0.999
    genuine = np.r_[[0.9995] * 10, [0.9985] * 20, [0.9895] * 30, [0.5] * 40]
    scores = np.r_[impostor, genuine]
    labels = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    # FAR 1e-2 lets 10 impostors pass: those above 0.989, the 11th highest.
    assert tar_at_far(scores, labels, 1e-2) == pytest.approx((0.6, 0.989))
    # FAR 1e-3 lets one pass: accept above 0.998.
    assert tar_at_far(scores, labels, 1e-3) == pytest.approx((0.3, 0.998))
    # FAR 1e-4 < 1/1000 impostors: not measurable.
    assert all(math.isnan(v) for v in tar_at_far(scores, labels, 1e-4))


def _brute_force_tar(scores, labels, far):
    best = 0.0
    for t in np.r_[-np.inf, np.unique(scores)]:
        if np.mean(scores[~labels] > t) <= far:
            best = max(best, np.mean(scores[labels] > t))
    return best


def test_tar_auc_and_threshold_against_brute_force_with_ties():
    rng = np.random.default_rng(2)
    labels = rng.random(400) < 0.4
    scores = np.round(rng.normal(np.where(labels, 1.0, 0.0), 0.8), 1)  # rounding creates ties
    for far in (0.01, 0.05, 0.2):
        assert tar_at_far(scores, labels, far)[0] == pytest.approx(_brute_force_tar(scores, labels, far))
    pos, neg = scores[labels], scores[~labels]
    auc = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert roc_auc(scores, labels) == pytest.approx(auc)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    threshold, accuracy = best_threshold(scores, labels)
    brute = max(np.mean((scores > t) == labels) for t in np.r_[-np.inf, np.unique(scores)])
    assert accuracy == pytest.approx(brute)
    assert np.mean((scores > threshold) == labels) == pytest.approx(brute)


def test_thinned_roc_is_a_subset_with_both_ends():
    rng = np.random.default_rng(5)
    labels = rng.random(30000) < 0.5
    fpr, tpr, _ = roc_curve(rng.normal(labels * 2.0, 1.0), labels)
    small_f, small_t = thin_roc(fpr, tpr, max_points=400)
    assert small_f.size <= 403
    assert (small_f[0], small_t[0], small_f[-1], small_t[-1]) == (0, 0, 1, 1)
    assert set(zip(small_f, small_t)) <= set(zip(fpr, tpr))
    assert np.trapezoid(small_t, small_f) == pytest.approx(np.trapezoid(tpr, fpr), abs=2e-3)


def test_kfold_accuracy_against_a_brute_force_protocol():
    rng = np.random.default_rng(4)
    labels = rng.random(95) < 0.5
    scores = np.clip(rng.normal(np.where(labels, 0.5, 0.1), 0.2), -1, 1)
    # Reference: folds of 10 pairs (the first 5 folds) or 9; on the other folds, the highest threshold t
    # maximising the accuracy of "score > t", t taken midway between consecutive training scores (or
    # beyond either end); then the accuracy of t on the held-out fold.
    bounds = np.cumsum([0] + [10] * 5 + [9] * 5)
    expected = []
    for k in range(10):
        test = np.zeros(95, bool)
        test[bounds[k]:bounds[k + 1]] = True
        s, y = scores[~test], labels[~test]
        u = np.unique(s)
        candidates = np.r_[u[0] - 1, (u[:-1] + u[1:]) / 2, u[-1] + 1]
        accuracy = np.array([np.mean((s > t) == y) for t in candidates])
        t = candidates[np.flatnonzero(accuracy == accuracy.max())[-1]]
        expected.append(np.mean((scores[test] > t) == labels[test]))
    result = evaluate_embeddings(pairs_with_cosines(scores), labels)
    assert result["accuracy"] == pytest.approx(np.mean(expected))
    assert result["accuracy_std"] == pytest.approx(np.std(expected))


def test_equally_accurate_thresholds_resolve_to_the_highest():
    # Thresholds in (0.2, 0.4) and in (0.6, 0.8) both get 3 of 4 right.
    threshold, accuracy = best_threshold([0.2, 0.4, 0.6, 0.8], [False, True, False, True])
    assert (threshold, accuracy) == pytest.approx((0.7, 0.75))


def test_folds_are_consecutive_with_the_remainder_first():
    sizes = [s.stop - s.start for s in fold_slices(25, 10)]
    assert sizes == [3] * 5 + [2] * 5
    with pytest.raises(ValueError, match="cannot cut 5 pairs into 10 folds"):
        fold_slices(5, 10)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="pairs in consecutive rows"):
        pair_scores(np.ones((3, 4)))
    with pytest.raises(ValueError, match="make 2 pairs but issame has 3"):
        evaluate_embeddings(np.eye(4), [True, False, True])
    with pytest.raises(ValueError, match="all 20 pairs are genuine"):
        evaluate_embeddings(pairs_with_cosines([0.5] * 20), [True] * 20)
    with pytest.raises(ValueError, match="far=0"):
        tar_at_far([0.1, 0.2], [True, False], 0)


def test_plot_roc_writes_a_png(tmp_path):
    from PIL import Image

    cosines, same = overlap_case()
    results = {"overlap": evaluate_embeddings(pairs_with_cosines(cosines), same),
               "noisy": evaluate_embeddings(pairs_with_cosines(np.clip(cosines + 0.3 * (np.arange(100) % 3 - 1),
                                                                        -1, 1)), same)}
    path = plot_roc(results, tmp_path / "plots" / "roc.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (600, 450)
        assert np.asarray(img.convert("L")).std() > 0
    with pytest.raises(ValueError, match="at least one result"):
        plot_roc({}, tmp_path / "none.png")


class QuadrantMeans(nn.Module):
    """Embedding = mean of each channel over the 4 image quadrants (flip-sensitive, parameter-free)."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_evaluate_bin_matches_embeddings_computed_by_hand():
    pytest.importorskip("data_pipeline.verification")
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen)
    issame = torch.arange(20) % 2 == 0
    vset = SimpleNamespace(images=images, issame=issame, name="toy")
    model = QuadrantMeans().train()
    result = evaluate_bin(model, vset, batch_size=7)
    x = images.double() / 127.5 - 1
    reference = evaluate_embeddings(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).numpy(), issame.numpy(),
                                    flipped=nn.functional.adaptive_avg_pool2d(x.flip(3), 2).flatten(1).numpy())
    for key, value in scalars(reference).items():
        assert result[key] == pytest.approx(value, nan_ok=True, abs=1e-6), key
    assert model.training and not any(model.modes), "evaluated in eval mode, then restored"


def test_embed_pairs_reports_progress_and_rejects_empty_sets():
    seen = []
    batches = [(torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 4, 4))] * 2
    emb, flip = embed_pairs(QuadrantMeans(), batches, progress=seen.append)
    assert emb.shape == flip.shape == (6, 12) and seen == [3, 6]
    with pytest.raises(ValueError, match="no images"):
        embed_pairs(QuadrantMeans(), [])
