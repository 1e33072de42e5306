"""1:N identification: search, CMC and TPIR at FPIR against a float64 brute-force reference; IJB 1:N files."""
import math

import numpy as np
import pytest

from train.evaluation.identification import (
    DISTRACTOR,
    cmc,
    exact_top_k,
    fpir_threshold,
    identification_metrics,
    search,
    tpir_at_fpir,
)
from train.evaluation.ijb_1n import (
    evaluate_ijb_1n,
    ident_table,
    main,
    read_1n_templates,
)


def unit_rows(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(probes, probe_labels, gallery, gallery_labels):
    """Per probe (mated, mate score, rank, best score) from the full float64 score matrix, one probe at a time."""
    scores = unit_rows(probes) @ unit_rows(gallery).T
    out = []
    for i, label in enumerate(probe_labels):
        row = scores[i]
        mates = [j for j, g in enumerate(gallery_labels) if g == label and g != DISTRACTOR]
        if not mates:
            out.append((False, math.nan, 0, row.max()))
            continue
        j = mates[0]
        others = [row[k] for k in range(row.size) if k != j]
        out.append((True, row[j], 1 + sum(s >= row[j] for s in others), row.max()))
    return out


def brute_tpir(rows, fpir, rank=1):
    nonmated = sorted((r[3] for r in rows if not r[0]), reverse=True)
    k = math.floor(fpir * len(nonmated) + 1e-9)
    if k < 1:
        return math.nan
    threshold = nonmated[k] if k < len(nonmated) else -math.inf
    mated = [r for r in rows if r[0]]
    return sum(r[2] <= rank and r[1] > threshold for r in mated) / len(mated)


def open_set_data(seed=0, subjects=30, distractors=50, probes=240, dim=8, noise=0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(subjects + 20, dim))  # 20 subjects are never enrolled
    gallery = np.concatenate([centres[:subjects] + noise * rng.normal(size=(subjects, dim)),
                              rng.normal(size=(distractors, dim))])
    gallery_labels = np.r_[np.arange(subjects), np.full(distractors, DISTRACTOR)]
    probe_labels = rng.integers(0, subjects + 20, size=probes)
    probe_feats = centres[probe_labels] + noise * rng.normal(size=(probes, dim))
    order = rng.permutation(gallery.shape[0])  # mates are not where their label says
    return probe_feats, probe_labels, gallery[order], gallery_labels[order]


def test_search_matches_brute_force_with_small_chunks():
    probes, plab, gallery, glab = open_set_data()
    found = search(probes, plab, gallery, glab, chunk=7, probe_chunk=5)
    ref = brute_force(probes, plab, gallery, glab)
    assert found["mated"].tolist() == [r[0] for r in ref]
    assert found["rank"].tolist() == [r[2] for r in ref]
    np.testing.assert_allclose(found["top_score"], [r[3] for r in ref], atol=1e-6)
    mated = found["mated"]
    np.testing.assert_allclose(found["mate_score"][mated], [r[1] for r in ref if r[0]], atol=1e-6)
    # The data must exercise every case: mates at rank 1, mates pushed down, non-mated probes.
    ranks = found["rank"][mated]
    assert (ranks == 1).any() and (ranks > 5).any() and (~mated).sum() > 20
    metrics = identification_metrics(found, fpirs=(1e-2, 1e-1, 0.3), ranks=(1, 5, 10))
    for r in (1, 5, 10):
        assert metrics[f"rank{r}"] == pytest.approx(np.mean([x[2] <= r for x in ref if x[0]]))
    for f in (1e-2, 1e-1, 0.3):
        assert metrics[f"tpir@fpir={f:.0e}"] == pytest.approx(brute_tpir(ref, f))
    assert 0 < metrics["tpir@fpir=1e-02"] < metrics["tpir@fpir=3e-01"] < metrics["rank1"]
    assert tpir_at_fpir(found, 0.3, rank=5)[0] == pytest.approx(brute_tpir(ref, 0.3, rank=5))


def test_exact_top_k_merges_chunks_like_a_full_sort():
    probes, _, gallery, _ = open_set_data(seed=3)
    scores, idx = exact_top_k(probes, gallery, k=6, chunk=9)
    full = unit_rows(probes) @ unit_rows(gallery).T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), atol=1e-6)


def test_ties_count_against_the_mate_and_cmc_counts_only_mated():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    found = search(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), [7, 9, 4], gallery, [7, DISTRACTOR, 9])
    # Probe 0's mate ties with a distractor: rank 2. Probe 2 (subject 4) is not enrolled.
    assert found["rank"].tolist() == [2, 1, 0]
    assert found["mated"].tolist() == [True, True, False]
    np.testing.assert_allclose(cmc(found["rank"], 3), [0.5, 1.0, 1.0])
    assert fpir_threshold(np.array([0.9, 0.1, 0.5, 0.3]), 0.25) == pytest.approx(0.5)
    # 4 non-mated searches cannot measure an FPIR of 0.1: no alarm may pass, no support.
    assert math.isnan(fpir_threshold(np.array([0.9, 0.1, 0.5, 0.3]), 0.1))
    assert math.isnan(tpir_at_fpir(found, 0.5)[0])  # a single non-mated search


def test_search_errors_name_the_problem():
    g = np.eye(3)
    with pytest.raises(ValueError, match="subject 1 is enrolled 2 times"):
        search(g[:1], [1], g, [1, 1, 2])
    with pytest.raises(ValueError, match="3 dimensions but gallery features 2"):
        search(g, [0, 1, 2], np.ones((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match="rows are all zeros"):
        search(np.zeros((1, 3)), [0], g, [0, 1, 2])
    with pytest.raises(ValueError, match="one label per row"):
        search(g, [0, 1], g, [0, 1, 2])


# --------------------------------------------------------------------------- IJB 1:N files
def write_ijb_1n(tmp_path, seed=0, per_gallery=12, dim=6, noise=1.1):
    """Two galleries of one template per subject; two probe templates per subject of either; media pooling."""
    rng = np.random.default_rng(seed)
    subjects = 2 * per_gallery
    centres = rng.normal(size=(subjects, dim))
    rows = []  # (template, subject, media, feature)
    template, media = 100, 5000
    gallery_templates = {}
    probe_templates = []
    for s in range(subjects):
        for role in ("gallery", "probe", "probe"):
            template += 1
            for _ in range(int(rng.integers(1, 3))):  # 1-2 medias, 1-3 frames each
                media += 1
                for _ in range(int(rng.integers(1, 4))):
                    rows.append((template, s, media, centres[s] + noise * rng.normal(size=dim)))
            if role == "gallery":
                gallery_templates[template] = s
            else:
                probe_templates.append(template)
    features = np.array([r[3] for r in rows])
    faces = tmp_path / "ijbc_face_tid_mid.txt"
    faces.write_text("".join(f"{i}.jpg {r[0]} {r[2]}\n" for i, r in enumerate(rows)))

    def write_csv(name, keep):
        path = tmp_path / name
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID"]
        lines += [f"{r[0]},{r[1]},img/{i}.jpg,{r[2]}" for i, r in enumerate(rows) if keep(r)]
        path.write_text("\n".join(lines) + "\n")
        return path
    g1 = write_csv("ijbc_1N_gallery_G1.csv", lambda r: r[0] in gallery_templates and r[1] < per_gallery)
    g2 = write_csv("ijbc_1N_gallery_G2.csv", lambda r: r[0] in gallery_templates and r[1] >= per_gallery)
    probes = write_csv("ijbc_1N_probe_mixed.csv", lambda r: r[0] in probe_templates)
    return features, rows, faces, g1, g2, probes


def reference_templates(features, rows):
    """{template: (subject, pooled feature)}: mean of the unit image features per media, summed, normalised."""
    unit = unit_rows(features)
    out = {}
    for t in sorted({r[0] for r in rows}):
        medias = sorted({r[2] for r in rows if r[0] == t})
        total = sum(np.mean([unit[i] for i, r in enumerate(rows) if r[0] == t and r[2] == m], axis=0) for m in medias)
        out[t] = (next(r[1] for r in rows if r[0] == t), total / np.linalg.norm(total))
    return out


def test_ijb_1n_matches_brute_force_per_gallery(tmp_path):
    features, rows, faces, g1, g2, probes = write_ijb_1n(tmp_path)
    result = evaluate_ijb_1n(features, faces, [g1, g2], probes, fpirs=(1e-1, 0.25))
    pooled = reference_templates(features, rows)
    probe_ids, _ = read_1n_templates(probes)
    p_feats = np.array([pooled[t][1] for t in probe_ids])
    p_subj = [pooled[t][0] for t in probe_ids]
    for name, path in (("G1", g1), ("G2", g2)):
        gallery_ids, _ = read_1n_templates(path)
        ref = brute_force(p_feats, p_subj, np.array([pooled[t][1] for t in gallery_ids]),
                          [pooled[t][0] for t in gallery_ids])
        got = result[name]
        assert got["num_mated"] == 24 and got["num_nonmated"] == 24  # the other gallery's probes
        for r in (1, 5, 10):
            assert got[f"rank{r}"] == pytest.approx(np.mean([x[2] <= r for x in ref if x[0]]))
        for f in (1e-1, 0.25):
            assert got[f"tpir@fpir={f:.0e}"] == pytest.approx(brute_tpir(ref, f))
    assert 0 < result["G1"]["rank1"] < 1  # noisy enough to rank some mates below others
    assert result["mean"]["rank1"] == pytest.approx((result["G1"]["rank1"] + result["G2"]["rank1"]) / 2)
    table = ident_table(result, fpirs=(1e-1,))
    assert table.splitlines()[0].startswith("| gallery | rank-1 | rank-5 | rank-10 | TPIR@FPIR=1e-01")
    assert table.splitlines()[2].startswith(f"| G1 | {100 * result['G1']['rank1']:.2f} |")


def test_ijb_1n_metadata_errors(tmp_path):
    features, _, faces, _, _, probes = write_ijb_1n(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,3,a.jpg\n1,4,b.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: template 1 is listed with subjects 3 and 4"):
        read_1n_templates(bad)
    bad.write_text("TID,SID\n1,3\n")
    with pytest.raises(ValueError, match="lacks TEMPLATE_ID or SUBJECT_ID"):
        read_1n_templates(bad)
    bad.write_text("TEMPLATE_ID,SUBJECT_ID\n99999,3\n")
    with pytest.raises(ValueError, match="absent from the face list.*99999"):
        evaluate_ijb_1n(features, faces, [bad], probes)
    with pytest.raises(ValueError, match="both in gallery"):
        evaluate_ijb_1n(features, faces, [probes], probes)


def test_ijb_1n_command_line(tmp_path, capsys):
    features, rows, faces, g1, g2, probes = write_ijb_1n(tmp_path)
    np.save(tmp_path / "emb.npy", features[::-1])
    (tmp_path / "emb.txt").write_text("".join(f"crops/{i}.jpg\n" for i in reversed(range(len(rows)))))
    assert main(["--features", str(tmp_path / "emb.npy"), "--names", str(tmp_path / "emb.txt"), "--faces", str(faces),
                 "--gallery", str(g1), str(g2), "--probes", str(probes)]) == 0
    out = capsys.readouterr().out
    expected = evaluate_ijb_1n(features, faces, [g1, g2], probes)
    assert f"| G2 | {100 * expected['G2']['rank1']:.2f} |" in out and "| mean |" in out
    assert "G1: 12 gallery templates, 24 mated and 24 non-mated probe templates" in out


def test_ijb_1n_through_shardface_eval_ijb(tmp_path, capsys):
    import json

    from launch.cli import main as shardface

    features, rows, faces, g1, g2, probes = write_ijb_1n(tmp_path)
    np.save(tmp_path / "emb.npy", features[::-1])
    (tmp_path / "emb.txt").write_text("".join(f"crops/{i}.jpg\n" for i in reversed(range(len(rows)))))
    common = ["eval-ijb", "--features", str(tmp_path / "emb.npy"), "--names", str(tmp_path / "emb.txt"),
              "--faces", str(faces)]
    out = tmp_path / "eval" / "results.json"
    assert shardface([*common, "--gallery", str(g1), str(g2), "--probes", str(probes), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = evaluate_ijb_1n(features, faces, [g1, g2], probes)
    assert f"| G2 | {100 * expected['G2']['rank1']:.2f} |" in printed and "| mean |" in printed
    assert "G1: num_gallery 12, num_mated 24, num_nonmated 24" in printed
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    assert set(doc) == {"G1", "G2", "mean"} and doc["G1"]["num_mated"] == 24
    for name, result in expected.items():
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}  # curves are not written
        assert set(doc[name]) == set(scalars)
        for key, value in scalars.items():
            if math.isnan(value):  # an FPIR too small for 24 non-mated searches
                assert doc[name][key] is None
            else:
                assert doc[name][key] == pytest.approx(value)
    assert any(v is None for v in doc["G1"].values())  # the case above is exercised
    # The same one-line errors as the 1:1 command.
    assert shardface([*common, "--gallery", str(g1), "--pairs", str(probes)]) == 2
    assert "either --pairs (1:1 verification) or both --gallery and --probes" in capsys.readouterr().err
    assert shardface([*common, "--gallery", str(g1), "--probes", str(tmp_path / "none.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "probe template list" in err and "none.csv does not exist" in err
