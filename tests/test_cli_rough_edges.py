"""What a new user meets at the command line: checks made at start, one number format, quiet
output, and help texts and docs that agree with the code (each through the real command)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_helpers import make_jpeg  # noqa: E402


def shardface(*args, cwd=None, env=None):
    """Run the command line in a fresh interpreter, as a user would."""
    import os
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=180, env=full_env)


def last_error(result) -> str:
    """The one error line of a failed command (no traceback)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("shardface: error:"), result.stderr
    return lines[-1]


def strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path} holds a bare {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def model_and_bins(tmp_path_factory):
    """A small exported model (56x56 input) and two .bin sets of 56x56 images."""
    import torch

    from data_pipeline.verification import write_bin
    from train.backbones import build_backbone
    from train.export import export_embedding_model
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = {"embedding_size": 16, "input_size": 56}
    model = build_backbone("mobilefacenet_tiny", **config).eval()
    path = export_embedding_model(model, "mobilefacenet_tiny", config, root / "run" / "model.pt")
    bins = []
    for name, offset in (("first", 0), ("second", 100)):
        jpegs = [make_jpeg(offset + i // 2 if i % 4 < 2 else offset + 50 + i, size=56) for i in range(40)]
        write_bin(root / f"{name}.bin", jpegs, [k % 2 == 0 for k in range(20)])
        bins.append(root / f"{name}.bin")
    return path, bins


def cli(capsys, *args):
    """``shardface ARGS`` in this process (parser, commands and error handling as installed): (code, out, err)."""
    from launch.cli import main
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith("shardface: error:"), err
    return lines[-1]


RANDOM_DATA = ["--set", "data.loader=random_tensors", "--set", "data.manifest=", "--set", "data.num_classes=10",
               "--set", "data.num_samples=16"]


# ---------------------------------------------------------------- checks made at start
def test_mistakes_are_found_at_start_with_the_setting_to_change(tmp_path, capsys, model_and_bins):
    from shard_helpers import write_dataset
    model, (first, _) = model_and_bins
    write_dataset(tmp_path / "d56", [4], num_classes=4, size=56)
    # In a fresh process, as a user runs it (W&B on): exit 2, one line, and no run folder or W&B run.
    result = shardface("train", "--set", f"data.manifest={tmp_path / 'd56'}", "--set", "data.image_size=112",
                       "--set", f"output_dir={tmp_path / 'run'}", "--set", "log.wandb=true",
                       env={"WANDB_MODE": "offline"})
    line = last_error(result)
    assert result.returncode == 2
    assert "data.image_size=112" in line and "56x56" in line and "set data.image_size=56" in line
    assert not (tmp_path / "run").exists(), "nothing may start before the check"

    line = one_line(*cli(capsys, "train", *RANDOM_DATA, "--set", "loss.margin_options.m=abc")[::2])
    assert "loss.margin_options.m='abc' must be a number" in line

    jpeg = tmp_path / "face.jpg"
    jpeg.write_bytes(make_jpeg(0, 32))
    line = one_line(*cli(capsys, "train", "--set", f"data.manifest={jpeg}")[::2])
    assert "is a JPEG image, not a manifest" in line

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data:\n  batch_size: 4\n optim: {lr: 1}\n")
    assert "line 3, column 2" in one_line(*cli(capsys, "train", "--config", str(bad_yaml))[::2])

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x08\x12\x07pytorch")
    line = one_line(*cli(capsys, "eval", "--model", str(onnx), "--bin", str(first))[::2])
    assert "is an ONNX model" in line and "model.pt" in line
    line = one_line(*cli(capsys, "export", "--model", str(onnx), "--onnx", str(tmp_path / "again.onnx"))[::2])
    assert "is an ONNX model" in line

    code, out, err = cli(capsys, "eval", "--model", str(model), "--bin", str(first), str(tmp_path / "nope.bin"))
    assert "nope.bin does not exist" in one_line(code, err)
    assert "first:" not in out, "the missing set is found before the first one is evaluated"

    code, out, err = cli(capsys, "eval-ijb", "--features", str(tmp_path / "f.npy"), "--faces", str(tmp_path / "x.txt"),
                         "--pairs", str(tmp_path / "p.txt"))
    assert "face list" in one_line(code, err) and "does not exist" in err


# ---------------------------------------------------------------- output
def test_eval_writes_strict_json_and_prints_one_number_format(tmp_path, capsys, model_and_bins):
    model, bins = model_and_bins
    code, out, _ = cli(capsys, "eval", "--model", str(model), "--bin", *map(str, bins), "--out", str(tmp_path))
    assert code == 0
    results = strict_json(tmp_path / "results.json")
    assert set(results) == {"first", "second"}
    first = results["first"]
    assert first["num_pairs"] == 20 and isinstance(first["num_pairs"], int)
    assert 0.0 <= first["accuracy"] <= 1.0, "JSON keeps fractions"
    assert first["tar@far=1e-03"] is None, "20 pairs cannot measure FAR 1e-3: null, not NaN"
    line = next(line for line in out.splitlines() if line.startswith("first:"))
    assert f"accuracy {100 * first['accuracy']:.2f}%" in line and "num_pairs 20," in line and "n/a" in line


def test_embed_shows_one_progress_bar(tmp_path, capsys, model_and_bins):
    from PIL import Image
    model, _ = model_and_bins
    folder = tmp_path / "faces"
    for i in range(9):
        (folder / f"id{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((56, 56, 3), 20 * i, np.uint8)).save(folder / f"id{i % 3}" / f"{i}.jpg")
    code, out, err = cli(capsys, "embed", "--model", str(model), "--images", str(folder),
                         "--out", str(tmp_path / "e.npy"), "--batch-size", "2")
    assert code == 0 and np.load(tmp_path / "e.npy").shape == (9, 16)
    bars = [line for line in (out + err).splitlines() if "embedding" in line]
    assert len(bars) == 1 and "9/9" in bars[0], out + err


def test_training_output_reads_as_numbers_people_use(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *RANDOM_DATA, "--set", "model.backbone=mobilefacenet_tiny", "--set", "data.image_size=32",
            "--set", "model.embedding_size=8", "--set", "data.batch_size=4", "--set", "max_steps=3",
            "--set", "log.every_steps=1", "--set", "eval.bins=[]", "--set", "checkpoint.export=false",
            "--set", "checkpoint.every_steps=0", "--no-wandb", "--set", f"output_dir={run}"]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    assert "single process" in out and "(none)" not in out
    loss_text = out.split("final loss ")[1].split(",")[0]
    assert len(loss_text.split(".")[1]) == 4, out
    summary = strict_json(run / "summary.json")
    assert summary["samples_per_s"] > 0 and summary["train_s"] <= summary["wall_s"]

    code, out, _ = cli(capsys, *args, "--set", "checkpoint.resume=latest")
    assert code == 0
    assert "already finished" in out and f"final loss {loss_text}" in out, out
    assert "eval step" not in out and strict_json(run / "summary.json")["steps_this_run"] == 0


def test_throughput_leaves_out_paused_time():
    import time

    from train.loggers import Throughput
    meter = Throughput(total_steps=10)
    with meter.paused():
        time.sleep(0.2)
    meter.add(100)
    report = meter.report(1)
    assert meter.paused_s >= 0.2
    # Without the pause the window is >= 0.2 s long: 100 samples could not exceed 500/s.
    assert report["samples_per_s"] > 500


def test_counts_and_inspect_messages_read_as_english(tmp_path, capsys):
    from shard_helpers import write_dataset
    write_dataset(tmp_path / "d", [3], num_classes=3, size=16)
    code, out, _ = cli(capsys, "data", "inspect", "--no-verify", str(tmp_path / "d"))
    assert code == 0 and "1 shard of" in out and "1 shards" not in out
    assert "verify=" not in out and "not verified" in out


# ---------------------------------------------------------------- noise
def test_library_noise_is_filtered_but_ours_is_not(tmp_path, capsys, monkeypatch, caplog):
    import logging
    import warnings

    import launch.supervise
    seen = {}

    class FakeSupervisor:
        def __init__(self, cmd, *args, env=None, **kw):
            seen["cmd"], seen["env"] = cmd, env

        def run(self):
            return 0

    monkeypatch.setattr(launch.supervise, "Supervisor", FakeSupervisor)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out, _ = cli(capsys, "train", "--nproc-per-node", "2", *RANDOM_DATA, "--no-wandb")
    assert code == 0 and "--nproc_per_node=2" in seen["cmd"]
    assert int(seen["env"]["OMP_NUM_THREADS"]) >= 1, "set for the workers, so torchrun prints no banner"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from train.quiet import quiet_libraries
        quiet_libraries.__globals__["_installed"] = False
        quiet_libraries()  # after simplefilter: the filters must take precedence
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use x", FutureWarning,
                      stacklevel=1)
        warnings.warn("This DataLoader will create 8 worker processes in total. Our suggested max ...", UserWarning,
                      stacklevel=1)
        warnings.warn("shardface: something of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["shardface: something of ours"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("DeepSpeed").warning("**** You are using ZeRO with an untested optimizer, proceed ****")
        logging.getLogger("DeepSpeed").info("Setting ds_accelerator to cpu (auto detect)")
        logging.getLogger("DeepSpeed").warning("a real DeepSpeed problem")
    assert [r.getMessage() for r in caplog.records] == ["a real DeepSpeed problem"]


def test_wandb_runs_without_its_console_summary(tmp_path, monkeypatch):
    import wandb

    from train.loggers import WandbLogger
    calls = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.update(kw))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    WandbLogger("p", "r", tmp_path, {})
    assert calls["settings"].quiet and calls["settings"].silent


# ---------------------------------------------------------------- docs and command line agree
def test_synth_defaults_have_one_source(capsys):
    import dataclasses
    import re

    from data_pipeline.synthetic import SynthConfig
    from launch.cli import build_parser
    synth = build_parser()._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices["synth"]
    defaults = {a.dest: a.default for a in synth._actions}
    cfg = SynthConfig()
    assert (defaults["identities"], defaults["images_per_identity"], defaults["heldout_identities"],
            defaults["pairs"], defaults["difficulty"], defaults["seed"]) == (
        cfg.num_identities, cfg.images_per_identity, cfg.heldout_identities, cfg.heldout_pairs, cfg.difficulty,
        cfg.seed)
    doc = (REPO / "docs" / "synthetic.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", doc, re.M))
    for f in dataclasses.fields(SynthConfig):
        shown = str(getattr(cfg, f.name)) if f.name != "image_size" else str(cfg.image_size)
        assert table[f.name] == shown, f"docs/synthetic.md says {f.name}={table[f.name]}, SynthConfig {shown}"
    assert "samples_per_shard=10000" in doc and defaults["samples_per_shard"] == 10000
    code = _help(capsys, "data", "synth")
    assert f"(default: {cfg.images_per_identity})" in code


def _help(capsys, *command):
    from launch.cli import main
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_help_texts_show_their_defaults(capsys):
    assert "(default: 256)" in _help(capsys, "eval")
    assert "(default: 1)" in _help(capsys, "train")  # --nproc-per-node
    assert "(default: runs/demo)" in _help(capsys, "demo")
    assert "--flipped" in _help(capsys, "eval-ijb") and "--face-scores" in _help(capsys, "eval-ijb")


def test_train_options_work_where_users_put_them(tmp_path, capsys, monkeypatch):
    import yaml

    from train.config import ConfigError
    code, out, _ = cli(capsys, "train", "--print-config", "--set", "optim.lr=0.07")
    assert code == 0 and yaml.safe_load(out)["optim"]["lr"] == 0.07
    from launch.cli import main
    with pytest.raises(ConfigError):  # --debug after the subcommand: the traceback, not one line
        main(["train", "--debug", "--config", "no_such_preset"])
    # The README's DeepSpeed JSON resolves from any folder (it is package data beside the code).
    monkeypatch.chdir(tmp_path)
    from train.parallel import resolve_deepspeed_config
    assert resolve_deepspeed_config("launch/deepspeed_zero2.json") == REPO / "launch" / "deepspeed_zero2.json"
    with pytest.raises(FileNotFoundError, match="parallel.deepspeed_config='nope.json'"):
        resolve_deepspeed_config("nope.json")
    assert "shardface demo --quick" in (REPO / "README.md").read_text()


def test_bench_writes_where_the_user_says(tmp_path, capsys, monkeypatch):
    import launch.cli
    seen = {}
    monkeypatch.setattr(launch.cli.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "bench", "data", "--no-write")
    assert code == 0 and seen["cmd"][-1] == "--no-write"
    assert seen["env"]["SHARDFACE_BENCH_RESULTS"] == str(tmp_path / "bench_results.md")
    monkeypatch.setenv("SHARDFACE_BENCH_RESULTS", seen["env"]["SHARDFACE_BENCH_RESULTS"])
    from bench.results import write_section
    before = (REPO / "bench" / "RESULTS.md").read_text()
    write_section("Check", "a table")
    assert "## Check" in (tmp_path / "bench_results.md").read_text()
    assert (REPO / "bench" / "RESULTS.md").read_text() == before


def test_eval_ijb_takes_flips_and_detector_scores(tmp_path, capsys):
    from test_ijb import write_protocol
    from train.evaluation.ijb import evaluate_ijb
    features, faces, pairs = write_protocol(tmp_path, [0.05 * k for k in range(1, 11)], [0.95, 0.7, 0.46, 0.32])
    rng = np.random.default_rng(0)
    flipped = features + rng.normal(0, 1.0, features.shape)
    scores = rng.uniform(0.5, 1.0, len(features))
    np.save(tmp_path / "f.npy", features)
    np.save(tmp_path / "flip.npy", flipped)
    (tmp_path / "scores.txt").write_text("".join(f"{i}.jpg 1 2 3 {float(s)!r}\n" for i, s in enumerate(scores)))
    code, out, _ = cli(capsys, "eval-ijb", "--features", str(tmp_path / "f.npy"), "--faces", str(faces),
                       "--pairs", str(pairs), "--flipped", str(tmp_path / "flip.npy"),
                       "--face-scores", str(tmp_path / "scores.txt"), "--out", str(tmp_path / "ijb.json"))
    assert code == 0 and "TAR (%)" in out
    expected = evaluate_ijb(features, faces, pairs, flipped=flipped, face_scores=scores)
    got = strict_json(tmp_path / "ijb.json")
    assert got["auc"] == pytest.approx(expected["auc"]) and got["num_pairs"] == 14
    assert got["tar@far=1e-01"] == pytest.approx(expected["tar@far=1e-01"])
    plain = evaluate_ijb(features, faces, pairs)
    assert plain["auc"] != pytest.approx(expected["auc"]), "the flips must reach the scoring"
    (tmp_path / "short.txt").write_text("0.jpg 0.9\n")
    code, _, err = cli(capsys, "eval-ijb", "--features", str(tmp_path / "f.npy"), "--faces", str(faces),
                       "--pairs", str(pairs), "--face-scores", str(tmp_path / "short.txt"))
    assert "has 1 scores for the face list's 15 faces" in one_line(code, err)


def test_backbone_aliases_and_set_names(tmp_path):
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic_dataset import make_synthetic_dataset
    from train.backbones import ALIASES, build_backbone, canonical_backbone
    from train.config import TrainConfig
    from train.insightface import CORRESPONDENCES
    from train.validation import verification_sets
    assert [canonical_backbone(n) for n in ("r18", "r50", "r100", "mbf", "vit_t")] == [
        "iresnet18", "iresnet50", "iresnet100", "mobilefacenet_mbf", "vit_t"]
    for short, ours in ALIASES.items():  # the same network their weights import into
        assert CORRESPONDENCES[short].ours == ours, short
    alias, full = build_backbone("mbf", embedding_size=8), build_backbone("mobilefacenet_mbf", embedding_size=8)
    assert sum(p.numel() for p in alias.parameters()) == sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="or an alias: r18=iresnet18"):
        build_backbone("r9")
    cfg = SynthConfig(num_identities=2, images_per_identity=2, heldout_identities=2, heldout_pairs=2, image_size=32)
    manifest = make_synthetic_dataset(cfg, tmp_path / "d", workers=1)
    named = verification_sets(TrainConfig.load(None, ["data.loader=random_tensors", "data.num_classes=2",
                                                      "data.num_samples=4", "max_steps=1"]), manifest)
    (name, path), = named.items()
    assert name == path.stem, "training logs a set under the name `eval --bin` gives it"
