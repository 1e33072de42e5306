"""The loss study: geometry math, margin curves, metric-loss-only training, and the study end to end."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.synthetic import SynthConfig
from data_pipeline.synthetic.dataset import make_synthetic_dataset
from launch.cli import main as cli_main
from partial_fc.margins import MARGINS, MarginInput, build_margin
from partial_fc.metric_losses import METRIC_LOSSES
from train.config import ConfigError
from train.distributed import init_distributed
from train.loss_study.geometry import centre_accuracy, geometry_metrics, pair_angles
from train.loss_study.jobs import failure_reason
from train.loss_study.losses import TOY_SCALE, default_loss_names, study_losses, toy_overrides, toy_room_deg
from train.loss_study.margin_curves import standard_curves
from train.loss_study.report import indistinguishable_from_best, ranking_note, seed_summary
from train.loss_study.study import plateaued
from train.trainer import Trainer
from train_fixtures import SplitLoader, plain_net, tiny_config

STUDY_LOSSES = ["arcface", "center", "triplet"]
FIGURES = ["margin_curves.png", "angles.png", "geometry_2d.png", "geometry_3d.png"]


# ---------------------------------------------------------------------------------------------- geometry
def _on_circle(degrees):
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def test_geometry_metrics_on_points_with_known_angles():
    # Class 0 at ±10° around 0°, class 1 at 90° ± 20°, class 2 at 200° ± 5°; norms must not matter.
    emb = _on_circle([-10, 10, 70, 110, 195, 205]) * np.array([[1.0], [3.0], [0.5], [2.0], [1.0], [7.0]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    m = geometry_metrics(emb, labels)
    assert m["intra_angle"] == pytest.approx((10 + 10 + 20 + 20 + 5 + 5) / 6)
    # Centres at 0°, 90°, 200°: nearest other centre 90°, 90°, 110°.
    assert m["inter_angle"] == pytest.approx((90 + 90 + 110) / 3)
    assert m["ratio"] == pytest.approx(m["inter_angle"] / m["intra_angle"])

    pos, neg = pair_angles(emb, labels)
    assert sorted(pos) == pytest.approx([10, 20, 40])
    ref_neg = [abs(a - b) if abs(a - b) <= 180 else 360 - abs(a - b)
               for i, a in enumerate([-10, 10, 70, 110, 195, 205]) for j, b in enumerate([-10, 10, 70, 110, 195, 205])
               if i < j and labels[i] != labels[j]]
    assert sorted(neg) == pytest.approx(sorted(ref_neg))
    # Sub-sampling negatives keeps every positive and at most the requested count of negatives.
    pos2, neg2 = pair_angles(emb, labels, max_negatives=4, seed=1)
    assert sorted(pos2) == pytest.approx(sorted(pos)) and len(neg2) <= len(neg)


def test_geometry_refuses_single_sample_classes_and_nan():
    with pytest.raises(ValueError, match="single sample"):
        geometry_metrics(_on_circle([0, 5, 90]), np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        geometry_metrics(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.array([0, 0]))


# ---------------------------------------------------------------------------------------------- margin curves
def test_margin_curves_are_the_margin_modules_outputs():
    theta = np.linspace(0.0, math.pi, 25)
    curves = standard_curves(theta)
    for c in curves:
        margin = c.margin
        before = {k: v.clone() for k, v in margin.state_dict().items() if isinstance(v, torch.Tensor)}
        n = len(theta)
        cos = np.cos(theta)
        if c.column == 0:
            cols = torch.tensor(cos, dtype=torch.float32)[:, None]
        else:
            cols = torch.stack([torch.full((n,), math.cos(c.target_theta)), torch.tensor(cos, dtype=torch.float32)], 1)
        inp = MarginInput(cos=cols, target=torch.zeros(n, dtype=torch.long),
                          feature_norm=torch.full((n, 1), float(c.feature_norm)),
                          weight_norm=torch.ones(cols.shape[1]),
                          bias=torch.zeros(cols.shape[1]) if margin.uses_bias else None)
        margin.eval()
        with torch.no_grad():
            direct = margin(inp)[:, c.column].double().numpy() / getattr(margin, "s", 1.0)
        np.testing.assert_allclose(c.value, direct, rtol=0, atol=1e-6, err_msg=c.label)
        for k, v in margin.state_dict().items():  # drawing a curve changes no running state
            if k in before:
                assert torch.equal(v, before[k]), (c.label, k)
    by_label = {c.label.split(":")[0].split(" (")[0]: c for c in curves}
    # And the values are the papers' formulas (float64, written here from the definitions).
    ref = {"CosFace cos θ − 0.35": np.cos(theta) - 0.35,
           "softmax, NormFace": np.cos(theta)}
    for label, expected in ref.items():
        np.testing.assert_allclose(by_label[label].value, expected, atol=1e-6)
    arc = next(c for c in curves if c.label.startswith("ArcFace, sub-center"))
    inside = theta + 0.5 < math.pi
    # The module clamps cos θ to 1 − 1e-7 before taking √(1 − cos²): 2e-4 at θ = 0.
    np.testing.assert_allclose(arc.value[inside], np.cos(theta[inside] + 0.5), atol=5e-4)
    sphere = next(c for c in curves if c.label.startswith("SphereFace"))
    k = np.floor(theta * 4 / math.pi).clip(0, 3)
    psi = (-1.0) ** k * np.cos(4 * theta) - 2 * k
    np.testing.assert_allclose(sphere.value, (5 * np.cos(theta) + psi) / 6, atol=1e-5)


# ---------------------------------------------------------------------------------------------- metric loss alone
def _batch_hard_triplet(x, labels, margin=0.3):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((u[:, None, :] - u[None, :, :]) ** 2).sum(-1), 1e-12))
    terms = []
    for a in range(len(labels)):
        pos = [d[a, p] for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [d[a, n] for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            terms.append(max(0.0, margin + max(pos) - min(neg)))
    return float(np.mean(terms)), len(terms)


def test_metric_loss_alone_trains_the_backbone_and_never_the_classifier(tmp_path):
    cfg = tiny_config(tmp_path, "loss.classifier=false", "loss.metric_loss=triplet", "loss.metric_weight=2.0",
                      "loss.sample_rate=1.0", "max_steps=2", "optim.warmup_steps=0", "optim.schedule=constant")
    loader = SplitLoader(0, 1, batch_size=16)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    with torch.no_grad():
        first = plain_net()(images).double().numpy()
    expected, valid = _batch_hard_triplet(first, labels.numpy())
    assert valid > 0

    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(0, 1, batch_size=16),
                      backbone=plain_net())
    head_before = trainer.head.weight.detach().clone()
    losses = []
    step = trainer.train_step
    trainer.train_step = lambda batches, **kw: losses.append(step(batches, **kw)) or losses[-1]
    summary = trainer.fit()
    assert losses[0].loss == pytest.approx(2.0 * expected, rel=1e-5)
    assert math.isnan(losses[0].accuracy) and summary["steps"] == 2
    assert torch.equal(trainer.head.weight.detach(), head_before)
    moved = trainer.runner.module.state_dict()
    assert any(not torch.equal(v, plain_net().state_dict()[k.removeprefix("module.")]) for k, v in moved.items())


def test_metric_loss_alone_needs_a_metric_loss(tmp_path):
    with pytest.raises(ConfigError, match="loss.classifier=false"):
        tiny_config(tmp_path, "loss.classifier=false")


# ---------------------------------------------------------------------------------------------- catalogue
def test_default_study_covers_every_margin_and_metric_loss():
    assert default_loss_names() == list(MARGINS) + list(METRIC_LOSSES)
    entries = study_losses(None)
    assert all("loss.margin_options={}" in e.overrides for e in entries)  # paper defaults, not the preset's
    with pytest.raises(ValueError, match="unknown loss 'arcfce'"):
        study_losses(["arcfce"])
    with pytest.raises(ValueError, match="more than once"):
        study_losses(["arcface", "arcface"])


def test_centre_accuracy_counts_samples_nearest_their_own_centre():
    # Class 0 around 0°, class 1 around 90°; the sample at 60° is nearer class 1's centre.
    emb = _on_circle([-10, 10, 60, 80, 100, 120])
    labels = np.array([0, 0, 0, 1, 1, 1])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    centres = np.stack([unit[labels == c].mean(0) for c in (0, 1)])
    own = np.array([unit[i] @ centres[labels[i]] >= unit[i] @ centres[1 - labels[i]] for i in range(6)])
    assert centre_accuracy(emb * 3.0, labels) == pytest.approx(own.mean())
    assert centre_accuracy(emb, labels) < 1.0


def test_toy_margins_fit_the_circle_and_sphere():
    assert toy_room_deg(2, 8) == pytest.approx(45.0) and toy_room_deg(128, 8) == 90.0
    assert 70.0 < toy_room_deg(3, 8) < 85.0  # near the 74.9° of the best 8-point arrangement
    import json
    for name in ("cosface", "arcface", "combined", "magface"):
        loss = study_losses([name])[0]
        (item,) = toy_overrides(loss, 2, 8)
        options = json.loads(item.split("=", 1)[1])
        assert options["s"] == TOY_SCALE
        paper = build_margin(name).describe()
        for key, value in options.items():
            if key != "s":
                assert value == pytest.approx(paper[key] * 0.5, abs=1e-4)  # 45° of 90° room
    # CosFace's paper margin could never rank the target first against a neighbour 45° away; the toy's can.
    cos_m = json.loads(toy_overrides(study_losses(["cosface"])[0], 2, 8)[0].split("=", 1)[1])["m"]
    assert build_margin("cosface").describe()["m"] > 1 - math.cos(math.radians(45)) > cos_m
    assert toy_overrides(study_losses(["triplet"])[0], 2, 8) == () == toy_overrides(study_losses(["softmax"])[0], 2, 8)


def test_plateau_rule():
    assert not plateaued([0.2, 0.4, 0.6], patience=2, gain=0.005)
    assert plateaued([0.2, 0.8, 0.801, 0.803], patience=2, gain=0.005)
    assert not plateaued([0.2, 0.8, 0.801, 0.81], patience=2, gain=0.005)
    assert plateaued([0.5, 1.0], patience=4, gain=0.005)  # nothing left to learn


def test_seed_summary_and_overlapping_intervals():
    recs = [{"accuracy": a, "intra_angle": i, "verification_set": "v"} for a, i in ((0.90, 30.0), (0.94, 34.0))]
    out = seed_summary(recs)
    assert out["seeds"] == 2 and out["accuracy"] == pytest.approx(0.92)
    assert out["accuracy_seed_std"] == pytest.approx(np.std([0.90, 0.94], ddof=1))
    assert out["intra_angle_deg_seed_std"] == pytest.approx(np.std([30.0, 34.0], ddof=1))
    assert seed_summary(recs[:1])["accuracy_seed_std"] is None
    summary = {"a": {"accuracy": 0.95, "accuracy_seed_std": 0.01}, "b": {"accuracy": 0.935, "accuracy_seed_std": 0.01},
               "c": {"accuracy": 0.90, "accuracy_seed_std": 0.01}, "d": {"accuracy": None}}
    assert indistinguishable_from_best(summary) == ["a", "b"]
    assert "indistinguishable from it" in ranking_note(summary) and "b" in ranking_note(summary)


def test_failure_reason_skips_the_launcher_report():
    log = ("step 1/3 | loss 2.0\nValueError: label 7 is outside [0, 4)\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  error_file: <N/A>\n")
    assert failure_reason(log) == "ValueError: label 7 is outside [0, 4)"


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A three-loss study on a tiny dataset (2 steps per run), run through the command line."""
    root = tmp_path_factory.mktemp("study")
    cfg = SynthConfig(num_identities=12, images_per_identity=8, heldout_identities=6, heldout_pairs=40,
                      image_size=32, seed=3)
    make_synthetic_dataset(cfg, root / "data", samples_per_shard=24, progress=False)
    args = ["study", "losses", "--out", str(root / "out"), "--data", str(root / "data"), "--losses", *STUDY_LOSSES,
            "--steps", "2", "--seeds", "2", "--nproc", "1", "--geometry-steps", "2", "--batch-size", "8",
            "--parallel", "2"]
    assert cli_main(args) == 0
    return root / "out", args


@pytest.mark.slow
def test_study_writes_the_table_and_figures(study):
    out, _ = study
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["seed"]) for r in rows] == [(n, s) for s in ("0", "1") for n in STUDY_LOSSES]
    labels = np.load(out / "heldout_labelled.npz")["labels"]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["train_s"]) > 0
        assert r["verification_set"] == "synthetic_heldout" and int(float(r["steps"])) == 2
        # The table's angles are those of the saved held-out embeddings.
        m = geometry_metrics(np.load(out / "runs" / r["loss"] / f"seed{r['seed']}" / "heldout_embeddings.npy"), labels)
        assert float(r["intra_angle_deg"]) == pytest.approx(m["intra_angle"], abs=1e-3)
        assert float(r["inter_angle_deg"]) == pytest.approx(m["inter_angle"], abs=1e-3)
    # The summary is the mean and sample std of the per-seed rows.
    with open(out / "results_summary.csv") as f:
        summary = {r["loss"]: r for r in csv.DictReader(f)}
    for name in STUDY_LOSSES:
        acc = np.array([float(r["accuracy"]) for r in rows if r["loss"] == name])
        assert int(summary[name]["seeds"]) == 2
        assert float(summary[name]["accuracy"]) == pytest.approx(acc.mean())
        assert float(summary[name]["accuracy_seed_std"]) == pytest.approx(acc.std(ddof=1))
    table = (out / "results.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == STUDY_LOSSES
    assert table.count(" ± ") >= 3 * len(STUDY_LOSSES)
    for name in FIGURES:
        with Image.open(out / name) as img:
            img.load()
            assert img.width > 300 and img.height > 200, name
    assert (out / "runs" / "triplet" / "seed0" / "train.log").read_text().count("acc n/a") >= 1  # no classifier
    geo = (out / "geometry" / "2d" / "arcface" / "train.log").read_text()
    assert "training accuracy (nearest class centre)" in geo and '"s": 16' in geo  # the toy's own scale


@pytest.mark.slow
def test_study_resumes_with_the_losses_not_done(study, capsys):
    out, args = study
    redo = out / "runs" / "center" / "seed1"
    kept = {n: (out / "runs" / n / "seed1" / "done.json").stat().st_mtime_ns for n in ("arcface", "triplet")}
    # As if the study had been killed while training "center": no marker, a half-written run folder.
    (redo / "done.json").unlink()
    (redo / "leftover.txt").write_text("partial")
    capsys.readouterr()
    assert cli_main(args) == 0
    lines = capsys.readouterr().out
    assert "arcface seed 1: done earlier, skipped" in lines and "center seed 0: done earlier, skipped" in lines
    assert "center seed 1: done earlier" not in lines and "] center seed 1: accuracy" in lines
    assert lines.count("(2-D): done earlier, skipped") == 3
    assert {n: (out / "runs" / n / "seed1" / "done.json").stat().st_mtime_ns for n in kept} == kept
    assert (redo / "done.json").is_file() and not (redo / "leftover.txt").exists()
    # Other settings in the same folder are refused before anything is trained.
    other = list(args)
    other[other.index("--steps") + 1] = "3"
    assert cli_main(other) == 2
    assert "written with other settings" in capsys.readouterr().err
