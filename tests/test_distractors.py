"""Distractor identification: rank-1 against N distractors vs brute force; synthetic split; plots; CLI."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_pipeline.synthetic import SynthConfig
from train.evaluation.distractors import (
    curve_table,
    distractor_curve,
    plot_cmc,
    plot_rank1_vs_distractors,
)
from train.evaluation.synthetic_identification import (
    embed_rendered,
    evaluate_synthetic_identification,
    identification_split,
)

REPO = Path(__file__).resolve().parent.parent


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_rank1(probes, plab, enrolled, elab, distractors):
    """Fraction of probes whose own enrolled feature beats every other enrolled one and every distractor (float64)."""
    p, e = unit_rows(probes.astype(np.float64)), unit_rows(enrolled.astype(np.float64))
    d = unit_rows(distractors.astype(np.float64)) if len(distractors) else np.zeros((0, p.shape[1]))
    hits = 0
    for i, label in enumerate(plab):
        own = p[i] @ e[list(elab).index(label)]
        rivals = [p[i] @ e[j] for j in range(len(elab)) if elab[j] != label] + list(d @ p[i])
        hits += all(r < own for r in rivals)
    return hits / len(plab)


def test_rank1_against_distractors_matches_brute_force():
    rng = np.random.default_rng(0)
    ids, dim = 15, 6
    centres = rng.normal(size=(ids, dim))
    enrolled = centres + 0.5 * rng.normal(size=(ids, dim))
    plab = np.repeat(np.arange(ids), 4)
    probes = centres[plab] + 0.5 * rng.normal(size=(plab.size, dim))
    pool = rng.normal(size=(400, dim))
    curve = distractor_curve(probes, plab, enrolled, np.arange(ids), pool, sizes=[100, 0, 10, 400], max_rank=12)
    assert curve["sizes"] == [0, 10, 100, 400]
    for n, rank1 in zip(curve["sizes"], curve["rank1"]):
        assert rank1 == pytest.approx(brute_rank1(probes, plab, enrolled, np.arange(ids), pool[:n]))
    # More strangers can only push mates down, and this data is hard enough that they do.
    assert all(a >= b for a, b in zip(curve["rank1"], curve["rank1"][1:]))
    assert curve["rank1"][0] > curve["rank1"][-1]
    assert curve["cmc"][400].shape == (12,) and curve["cmc"][400][9] == pytest.approx(curve["rank10"][-1])
    assert curve_table(curve).splitlines()[2].startswith(f"| 0 | 15 | {100 * curve['rank1'][0]:.2f} |")
    with pytest.raises(ValueError, match="500 distractors asked for but only 400"):
        distractor_curve(probes, plab, enrolled, np.arange(ids), pool, sizes=[500])
    with pytest.raises(ValueError, match="probe identity 3 is not enrolled"):
        distractor_curve(probes, plab, enrolled[:3], np.arange(3), pool, sizes=[0])


def test_plots_are_written(tmp_path):
    curve = {"sizes": [0, 10, 100], "rank1": [0.9, 0.8, 0.6]}
    a = plot_rank1_vs_distractors({"m": curve}, tmp_path / "r1.png")
    b = plot_cmc({"m": np.linspace(0.5, 1, 10)}, tmp_path / "cmc.png")
    for path in (a, b):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


class PixelEmbedding(nn.Module):
    """A fixed 'model': the image average-pooled to 4x4 (48 numbers), so identity shows through."""

    image_size = 32

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


SMALL = SynthConfig(num_identities=50, images_per_identity=4, heldout_identities=8, heldout_pairs=0,
                    image_size=32, seed=3)


def test_synthetic_split_uses_never_trained_identities():
    split = identification_split(SMALL, probes_per_identity=2, distractors=5)
    assert split.labels_enrolled.tolist() == list(range(50, 58))
    assert split.labels_probes.tolist() == [i for i in range(50, 58) for _ in range(2)]
    assert [split.heldout.locate(i)[1:] for i in split.probes[:3]] == [(50, 1), (50, 2), (51, 1)]
    strangers = [split.strangers.locate(i)[1] for i in split.distractors]
    assert strangers == list(range(58, 63))  # after training (0..49) and held-out (50..57)
    with pytest.raises(ValueError, match=r"probes_per_identity=4 must lie in \[1, 3\]"):
        identification_split(SMALL, probes_per_identity=4)


def test_synthetic_identification_is_the_curve_of_the_rendered_images():
    model = PixelEmbedding()
    curve = evaluate_synthetic_identification(model, SMALL, sizes=[0, 6], probes_per_identity=2, progress=False)
    split = identification_split(SMALL, probes_per_identity=2, distractors=6)
    enrolled = embed_rendered(model, split.heldout, split.enrolled, progress=False)
    probes = embed_rendered(model, split.heldout, split.probes, progress=False)
    pool = embed_rendered(model, split.strangers, split.distractors, progress=False)
    # Embeddings add the mirrored image and are unit rows.
    np.testing.assert_allclose(np.linalg.norm(enrolled, axis=1), 1, atol=1e-5)
    for n, rank1 in zip([0, 6], curve["rank1"]):
        want = brute_rank1(probes, split.labels_probes, enrolled, split.labels_enrolled, pool[:n])
        assert rank1 == pytest.approx(want)
    assert curve["num_probes"] == 16 and curve["num_enrolled"] == 8
    with pytest.raises(ValueError, match="do not fit the model's 48-dimensional"):
        evaluate_synthetic_identification(model, SMALL, sizes=[2], distractor_features=np.ones((4, 8)), progress=False)


@pytest.mark.slow
def test_eval_command_runs_identification(tmp_path):
    from train.backbones import build_backbone
    from train.export import export_embedding_model

    torch.manual_seed(0)
    backbone = build_backbone("iresnet_tiny", embedding_size=16, input_size=56)
    model = export_embedding_model(backbone, "iresnet_tiny", {"embedding_size": 16, "input_size": 56},
                                   tmp_path / "run" / "model.pt")
    data = tmp_path / "data"
    data.mkdir()
    cfg = SynthConfig(num_identities=20, images_per_identity=3, heldout_identities=6, heldout_pairs=0, image_size=56)
    (data / "synthetic.json").write_text(json.dumps(asdict(cfg)))
    result = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "--model", str(model), "--identification",
                             str(data), "--distractors", "0", "5", "--probes-per-identity", "2", "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out" / "identification.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"identification.json holds {c}"))
    assert record["sizes"] == [0, 5] and record["num_probes"] == 12 and len(record["cmc"]["5"]) == 20
    assert (tmp_path / "out" / "rank1_vs_distractors.png").exists() and (tmp_path / "out" / "cmc.png").exists()
    assert "| 5 | 11 |" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.cli", "eval", "--model", str(model)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "nothing to evaluate" in bad.stderr


def test_identification_record_with_an_unmeasured_rank_is_strict_json(tmp_path):
    from train.evaluation.report import json_tree, write_json

    record = {"sizes": [0, 5], "rank1": [0.5, float("nan")], "num_probes": np.int64(4),
              "cmc": {"5": [np.float32(0.25), float("inf")]}}
    text = write_json(tmp_path / "identification.json", json_tree(record)).read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the file"))
    assert back == {"sizes": [0, 5], "rank1": [0.5, None], "num_probes": 4, "cmc": {"5": [0.25, None]}}
    with pytest.raises(ValueError):  # the writer itself refuses a NaN left in
        write_json(tmp_path / "x.json", record)
