"""shardface index build/add and shardface search: the round trip, the output formats, the errors."""
import csv
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from launch.cli import main
from train.backbones import build_backbone
from train.export import export_embedding_model, load_embedding_model, load_image


def _model(path, dim, seed=0):
    torch.manual_seed(seed)
    model = build_backbone("mobilefacenet_tiny", embedding_size=dim, input_size=32)
    return export_embedding_model(model, "mobilefacenet_tiny", {"embedding_size": dim, "input_size": 32}, path)


def _images(root, names, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / rel)
    return root


def _reference_embeddings(model_path, root, names):
    model = load_embedding_model(model_path)
    with torch.no_grad():
        x = torch.stack([load_image(root / n, 32) for n in names])
        e = (model(x) + model(x.flip(3))).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_add_search_round_trip(tmp_path, capsys):
    model = _model(tmp_path / "model.pt", 16)
    first = ["ann/1.png", "ann/2.png", "bob/1.png", "cy.png"]
    more = ["dee/1.png", "dee/2.png"]
    queries = ["q1.png", "sub/q2.png", "q3.png"]
    _images(tmp_path / "gallery", first, 0)
    _images(tmp_path / "more", more, 1)
    _images(tmp_path / "queries", queries, 2)
    index = str(tmp_path / "out" / "gallery.index")
    code, out, _ = run(capsys, "index", "build", "--model", str(model), "--images", str(tmp_path / "gallery"),
                       "--out", index, "--batch-size", "3")
    assert code == 0 and "4 16-d embeddings (flat)" in out
    code, out, _ = run(capsys, "index", "add", "--index", index, "--model", str(model),
                       "--images", str(tmp_path / "more"), "--prefix", "new")
    assert code == 0 and "6 16-d embeddings" in out

    names = first + [f"new/{n}" for n in more]
    gallery = np.concatenate([_reference_embeddings(model, tmp_path / "gallery", first),
                              _reference_embeddings(model, tmp_path / "more", more)])
    q = _reference_embeddings(model, tmp_path / "queries", queries)
    scores = q @ gallery.T
    order = np.argsort(-scores, axis=1)[:, :3]

    # CSV on stdout; the model defaults to the one the index records.
    code, out, _ = run(capsys, "search", "--index", index, "--images", str(tmp_path / "queries"), "--top", "3")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 9
    assert sorted({r["query"] for r in rows}) == sorted(queries)
    for query in queries:
        mine = [r for r in rows if r["query"] == query]
        ref = queries.index(query)
        assert [int(r["rank"]) for r in mine] == [1, 2, 3]
        assert [r["name"] for r in mine] == [names[j] for j in order[ref]]
        np.testing.assert_allclose([float(r["score"]) for r in mine], scores[ref, order[ref]], atol=1e-5)

    # JSON to a file, more matches than the gallery holds.
    code, _, err = run(capsys, "search", "--index", index, "--model", str(model), "--images",
                       str(tmp_path / "queries"), "--top", "10", "--out", str(tmp_path / "hits.json"))
    assert code == 0 and "wrote the top 10 matches of 3 queries" in err
    results = json.loads((tmp_path / "hits.json").read_text())["results"]
    assert [r["query"] for r in results] == sorted(queries)
    assert all(len(r["matches"]) == 6 for r in results)
    ref = queries.index("q1.png")
    assert [m["name"] for m in results[0]["matches"]] == [names[j] for j in np.argsort(-scores[ref])]


def test_hnsw_build_reports_recall(tmp_path, capsys):
    model = _model(tmp_path / "model.pt", 8)
    _images(tmp_path / "g", [f"{i}.png" for i in range(12)], 0)
    code, out, _ = run(capsys, "index", "build", "--model", str(model), "--images", str(tmp_path / "g"),
                       "--out", str(tmp_path / "g.index"), "--kind", "hnsw", "--ef-search", "16")
    assert code == 0
    assert "hnsw, M 32, ef_search 16" in out and "recall@10 against exact search 1.0000" in out
    # --append on a missing index builds it; on an existing one it grows it.
    _images(tmp_path / "h", ["x.png"], 1)
    code, out, _ = run(capsys, "index", "build", "--model", str(model), "--images", str(tmp_path / "h"),
                       "--out", str(tmp_path / "g.index"), "--append", "--prefix", "h")
    assert code == 0 and "updated" in out and "13 8-d embeddings" in out


def one_line(err, fragment):
    lines = [line for line in err.strip().splitlines() if line.startswith("shardface: error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_errors_are_one_line(tmp_path, capsys):
    model16 = _model(tmp_path / "m16.pt", 16)
    model8 = _model(tmp_path / "m8.pt", 8)
    _images(tmp_path / "g", ["a.png", "b.png"], 0)
    (tmp_path / "empty").mkdir()
    index = str(tmp_path / "g.index")
    code, _, _ = run(capsys, "index", "build", "--model", str(model16), "--images", str(tmp_path / "g"), "--out", index)
    assert code == 0

    code, _, err = run(capsys, "search", "--index", index, "--model", str(model8), "--images", str(tmp_path / "g"))
    assert code == 2
    one_line(err, "gives 8-d embeddings but the index")
    one_line(err, "holds 16-d ones")
    code, _, err = run(capsys, "index", "add", "--index", index, "--model", str(model8),
                       "--images", str(tmp_path / "g"))
    one_line(err, "gives 8-d embeddings")
    code, _, err = run(capsys, "search", "--index", str(tmp_path / "none.index"), "--images", str(tmp_path / "g"))
    assert code == 2
    one_line(err, "no gallery index at")
    code, _, err = run(capsys, "index", "build", "--model", str(model16), "--images", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "e.index"))
    assert code == 2
    one_line(err, "no images")
    code, _, err = run(capsys, "search", "--index", index, "--images", str(tmp_path / "missing"))
    one_line(err, "does not exist")
    code, _, err = run(capsys, "search", "--index", index, "--images", str(tmp_path / "g"),
                       "--out", str(tmp_path / "r.txt"))
    one_line(err, "output format 'txt'")
    # Same size, other weights: searched, with a warning.
    other = _model(tmp_path / "other.pt", 16, seed=1)
    code, _, err = run(capsys, "search", "--index", index, "--model", str(other), "--images", str(tmp_path / "g"))
    assert code == 0 and "is not the model file" in err
