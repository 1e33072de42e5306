"""bench/search_bench.py on a tiny gallery: exact rows agree with numpy, the face draws keep identities."""
import argparse

import numpy as np
import pytest

pytest.importorskip("faiss")

from bench.search_bench import FaceModel, random_data, run_size, shown_command  # noqa: E402


def test_rows_of_a_small_gallery():
    gallery, queries = random_data(1500, 50, 16, np.random.default_rng(0))
    args = argparse.Namespace(nprobe=[2, 39], hnsw_m=8, ef_construction=20, ef_search=[64])
    rows = []
    truth = run_size("random", gallery, queries, None, args, rows.append, "exact")
    run_size("random", gallery, queries, truth, args, rows.append, "hnsw")
    recall = {(r[2], r[3]): float(r[6]) for r in rows}
    assert recall[("numpy matmul", "chunks of 65,536 rows")] == 1.0
    assert recall[("flat (exact)", "IndexFlatIP")] == 1.0
    assert recall[("ivf", "nlist 39, nprobe 39")] == 1.0, "every cell visited is exact"
    assert recall[("ivf", "nlist 39, nprobe 2")] < 1.0
    assert [r[2] for r in rows].count("hnsw") == 1
    assert shown_command(["--sizes", "10", "--note", "x y"]) == "python bench/search_bench.py --sizes 10"


def test_face_draws_keep_mated_queries_close():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 1, 8))
    emb = centres + 0.3 * rng.standard_normal((40, 5, 8))
    faces = FaceModel(emb.astype(np.float32))
    gallery, queries = faces.sample(3000, 200, np.random.default_rng(2))
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-5)
    best = np.argmax(queries @ gallery.T, axis=1)
    mated_cos = np.sort(queries @ gallery.T, axis=1)[:, -1]
    assert mated_cos.mean() > faces.fit_diff + 0.3
    assert len(set(best.tolist())) > 150, "queries match many different gallery identities"
