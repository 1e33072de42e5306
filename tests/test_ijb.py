"""IJB template verification: media/template pooling and TAR@FAR against hand computations."""
import math

import numpy as np
import pytest

from train.evaluation.ijb import (
    align_features,
    evaluate_ijb,
    image_features,
    main,
    pool_templates,
    read_face_list,
    score_pairs,
    tar_table,
)


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_pooling_averages_within_a_media_then_sums_medias():
    features = np.array([[1, 0], [0, 2], [3, 0], [0, 5], [1, 1], [2, 0], [1, -1]], dtype=float)
    templates = np.array([1, 1, 1, 2, 3, 4, 4])
    medias = np.array([10, 10, 11, 20, 30, 30, 31])  # media 30 appears in templates 3 and 4
    ids, pooled = pool_templates(image_features(features), templates, medias)
    assert ids.tolist() == [1, 2, 3, 4]
    # Template 1: media 10 -> mean([1,0],[0,1]) = [.5,.5]; media 11 -> [1,0]; sum [1.5,.5].
    t1 = unit([1.5, 0.5])
    t2 = np.array([0.0, 1.0])
    t3 = unit([1, 1])
    # Template 4: its own image of media 30 -> [1,0]; media 31 -> [1,-1]/sqrt2.
    t4 = unit(np.array([1.0, 0.0]) + unit([1, -1]))
    np.testing.assert_allclose(pooled, np.stack([t1, t2, t3, t4]), atol=1e-12)
    # Plain image averaging would give [2/3, 1/3] for template 1: the media step matters.
    assert not np.allclose(pooled[0], unit([2 / 3, 1 / 3]))
    scores = score_pairs(ids, pooled, np.array([1, 1, 3]), np.array([2, 4, 4]))
    np.testing.assert_allclose(scores, [t1 @ t2, t1 @ t4, t3 @ t4], atol=1e-12)


def test_image_features_add_the_flip_normalise_then_weight():
    out = image_features(np.array([[1.0, 0.0]]), flipped=np.array([[0.0, 1.0]]), face_scores=np.array([2.0]))
    np.testing.assert_allclose(out, [[math.sqrt(2), math.sqrt(2)]])


def write_protocol(tmp_path, impostor, genuine):
    """Template 0 holds one image at angle 0; template k one image at cosine c_k to it; pairs (0, k)."""
    cosines = list(impostor) + list(genuine)
    features = [[1.0, 0.0]] + [[c, math.sqrt(1 - c * c)] for c in cosines]
    faces = tmp_path / "toy_face_tid_mid.txt"
    faces.write_text("".join(f"{i}.jpg {i} {100 + i}\n" for i in range(len(features))))
    pairs = tmp_path / "toy_template_pair_label.txt"
    labels = [0] * len(impostor) + [1] * len(genuine)
    pairs.write_text("".join(f"0 {k + 1} {label}\n" for k, label in enumerate(labels)))
    return np.array(features), faces, pairs


def test_evaluate_ijb_tar_at_far_from_files(tmp_path):
    impostor = [0.05 * k for k in range(1, 11)]  # 0.05 ... 0.50
    genuine = [0.95, 0.7, 0.46, 0.32]
    features, faces, pairs = write_protocol(tmp_path, impostor, genuine)
    result = evaluate_ijb(features, faces, pairs, fars=(1e-2, 1e-1, 0.5))
    # FAR 0.1 of 10 impostors: one may pass, so accept above the 2nd highest (0.45): 3 of 4 genuine.
    assert result["tar@far=1e-01"] == pytest.approx(0.75)
    # FAR 0.5: accept above the 6th highest (0.25): all genuine.
    assert result["tar@far=5e-01"] == pytest.approx(1.0)
    assert math.isnan(result["tar@far=1e-02"])
    # AUC: 0.95 and 0.7 beat all 10 impostors, 0.46 beats 9, 0.32 beats 6.
    assert result["auc"] == pytest.approx(35 / 40)
    assert result["num_templates"] == 15 and result["num_pairs"] == 14
    table = tar_table({"toy": result}, fars=(1e-2, 1e-1))
    assert table.splitlines()[-1] == "| toy | n/a | 75.00 |"


def test_metadata_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad_face_tid_mid.txt"
    bad.write_text("1.jpg 1 5\n2.jpg 1\n")
    with pytest.raises(ValueError, match=r"bad_face_tid_mid.txt:2: expected 'image template_id media_id'"):
        read_face_list(bad)
    features, faces, pairs = write_protocol(tmp_path, [0.1, 0.2], [0.9])
    pairs.write_text("0 1 0\n0 77 1\n")
    with pytest.raises(ValueError, match="absent from the face list.*77"):
        evaluate_ijb(features, faces, pairs)
    with pytest.raises(ValueError, match="must align"):
        evaluate_ijb(features[:2], faces, pairs)


def test_features_are_aligned_to_the_face_list_by_file_name():
    features = np.array([[2.0], [1.0], [3.0]])
    aligned = align_features(features, ["b/2.jpg", "a/1.jpg", "c/3.jpg"], ["1.jpg", "2.jpg", "3.jpg"])
    assert aligned[:, 0].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="no feature.*'4.jpg'"):
        align_features(features, ["b/2.jpg", "a/1.jpg", "c/3.jpg"], ["4.jpg"])


def test_command_line_prints_the_table(tmp_path, capsys):
    features, faces, pairs = write_protocol(tmp_path, [0.05 * k for k in range(1, 11)], [0.95, 0.7, 0.46, 0.32])
    np.save(tmp_path / "emb.npy", features[::-1])
    (tmp_path / "emb.txt").write_text("".join(f"crops/{i}.jpg\n" for i in reversed(range(len(features)))))
    assert main(["--features", str(tmp_path / "emb.npy"), "--names", str(tmp_path / "emb.txt"),
                 "--faces", str(faces), "--pairs", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert "| emb | n/a | n/a | n/a | n/a | n/a | 75.00 |" in out
    assert "auc 87.50%, num_pairs 14, num_templates 15" in out
