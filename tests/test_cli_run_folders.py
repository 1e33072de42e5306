"""What a new user meets on the command line: checkpoints used as models, run folders that are not
clobbered, readable artifacts, bad-data messages that name the setting, image-folder conversion."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.bad_data import CORRUPT_JPEG
from data_pipeline.loaders import build_loader
from shard_helpers import write_dataset
from train.checkpoint import LATEST, list_checkpoints

REPO = Path(__file__).resolve().parent.parent
CORRUPT = (3, 17, 30)  # samples whose JPEG bytes are damaged
TINY = ["data.image_size=16", "data.batch_size=4", "data.workers=0", "data.shuffle_buffer=8",
        "model.embedding_size=8", "loss.sample_rate=1.0", "eval.bins=[]", "eval.at_end=false",
        "log.progress=false", "log.every_steps=100", "optim.warmup_steps=1"]


def shardface(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter under ``umask`` (as a user's shell would run it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(umask))


def cli(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """``shardface ARGS`` through its entry point in this process (no interpreter start-up: faster)."""
    from launch.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = os.umask(umask)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.umask(old)
    return subprocess.CompletedProcess(["shardface", *args], code, out.getvalue(), err.getvalue())


def train_args(manifest: Path, out: Path, *sets: str) -> list[str]:
    items = [f"data.manifest={manifest}", f"output_dir={out}", *TINY, *sets]
    return ["train", "--no-wandb"] + [x for item in items for x in ("--set", item)]


def last_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (no traceback before it)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("shardface: error:"), result.stderr
    return lines[-1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def corrupt_members(i: int, jpg: bytes, cls: bytes) -> list[tuple[str, bytes]]:
    if i in CORRUPT:
        jpg = b"\xff\xd8" + b"not a jpeg" * 4
    return [(f"{i:09d}.jpg", jpg), (f"{i:09d}.cls", cls)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """One finished 4-step run (checkpoints at steps 2 and 4, model.pt) on 48 tiny images: (manifest, run folder)."""
    root = tmp_path_factory.mktemp("tiny_run")
    write_dataset(root / "data", [24, 24], num_classes=6, size=16)
    run = root / "run"
    result = cli(*train_args(root / "data" / "manifest.json", run, "max_steps=4", "checkpoint.every_steps=2"))
    assert result.returncode == 0, result.stderr
    return root / "data" / "manifest.json", run


@pytest.mark.slow
def test_a_checkpoint_folder_is_a_model_and_artifacts_get_the_umask(tiny_run, tmp_path):
    manifest, run = tiny_run
    for artifact in [run / "model.pt", run / "summary.json", run / "checkpoints" / LATEST,
                     *(run / "checkpoints" / "step_00000004").iterdir()]:
        assert mode(artifact) == 0o644, artifact
    # An interrupted run: checkpoints, no model.pt yet.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(run, interrupted)
    (interrupted / "model.pt").unlink()
    images = tmp_path / "faces"
    images.mkdir()
    for k in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(images / f"{k}.jpg")
    exported = shardface("export", "--model", str(interrupted), "--onnx", str(tmp_path / "model.onnx"))
    assert exported.returncode == 0, exported.stderr
    assert "step_00000004" in exported.stdout and mode(tmp_path / "model.onnx") == 0o644
    embedded = cli("embed", "--model", str(interrupted / "checkpoints" / LATEST), "--images", str(images),
                         "--out", str(tmp_path / "faces.npy"))
    assert embedded.returncode == 0, embedded.stderr
    assert mode(tmp_path / "faces.npy") == 0o644 and mode(tmp_path / "faces.txt") == 0o644
    assert np.load(tmp_path / "faces.npy").shape == (3, 8)
    # The checkpoint's backbone is the one model.pt holds (the run ended at the checkpointed step).
    from train.export import load_checkpoint_model, load_embedding_model
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = load_checkpoint_model(run / "checkpoints" / "step_00000004")(x)
    b = load_embedding_model(run / "model.pt")(x)
    torch.testing.assert_close(a, b)
    nothing = cli("export", "--model", str(tmp_path / "faces"), "--onnx", str(tmp_path / "x.onnx"))
    assert "no model.pt and no complete checkpoint" in last_error(nothing)


def test_a_new_run_in_an_old_run_folder_is_refused_before_anything_is_written(tiny_run, tmp_path):
    manifest, run = tiny_run
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    line = last_error(cli(*train_args(manifest, folder, "max_steps=2")))
    assert "already holds a run" in line and "step_00000004" in line and "overwrite=true" in line, line
    assert "checkpoint.resume=latest" in line, line
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_overwrite_replaces_the_earlier_run_so_latest_is_the_newest(tmp_path):
    from train.checkpoint import find_latest
    from train.config_parse import ConfigError
    from train.distributed import init_distributed
    from train.trainer import Trainer
    from train_fixtures import SplitLoader, plain_net, tiny_config

    ctx = init_distributed(device="cpu")
    Trainer(tiny_config(tmp_path, "checkpoint.every_steps=2"), ctx, loader=SplitLoader(), backbone=plain_net()).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002", "step_00000004"]
    with pytest.raises(ConfigError, match="overwrite=true"):
        Trainer(tiny_config(tmp_path, "max_steps=1"), ctx, loader=SplitLoader(), backbone=plain_net()).fit()
    Trainer(tiny_config(tmp_path, "max_steps=1", "overwrite=true"), ctx, loader=SplitLoader(),
            backbone=plain_net()).fit()
    # Step 1 of the new run is alone: latest, and what checkpoint.resume=latest picks, agree on it.
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000001"]
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step_00000001"
    assert find_latest(tmp_path / "checkpoints").name == "step_00000001"


def test_strict_bad_data_in_a_loader_worker_names_shard_key_and_setting(tmp_path):
    write_dataset(tmp_path / "data", [24, 24], num_classes=6, size=16, members=corrupt_members)
    line = last_error(cli(*train_args(tmp_path / "data" / "manifest.json", tmp_path / "run", "max_steps=8",
                                            "data.strict=true", "data.workers=1")))
    found = re.search(r"shard (train-00000\d\.tar) at key (\d+)", line)
    assert found and int(found.group(2)) in CORRUPT and "data.strict=false" in line, line
    assert found.group(1) == f"train-{int(found.group(2)) // 24:06d}.tar", line
    assert "Caught" not in line and "BytesIO" not in line and "strict=False" not in line, line


def test_labels_outside_num_classes_stop_the_run_naming_the_setting(tmp_path):
    # Labels 0..17 under a manifest that declares 6 classes: two samples in three are bad.
    write_dataset(tmp_path / "data", [30, 30], num_classes=6, size=16, label_of=lambda i: i % 18)
    line = last_error(cli(*train_args(tmp_path / "data" / "manifest.json", tmp_path / "run", "max_steps=40")))
    assert "data.max_bad_fraction=0.1" in line and "bad_label" in line and "data.num_classes" in line, line
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_bad_sample_read_again_is_counted_once(tmp_path):
    write_dataset(tmp_path, [24, 24], num_classes=6, size=16, members=corrupt_members)
    loader = build_loader("webdataset", tmp_path, rank=0, world_size=1, batch_size=4, workers=0, mode="resampled",
                          epoch_samples=48, shuffle_buffer=8)
    reads = 0
    for epoch in range(3):  # resampled shards: each damaged sample is met several times
        loader.set_epoch(epoch)
        reads += sum(len(y) for _, y in loader)
    assert loader._report.bad_reads > len(CORRUPT)
    assert loader.stats[CORRUPT_JPEG] == len(CORRUPT) and sum(loader.stats.values()) == len(CORRUPT)


def test_image_folder_conversion_names_the_flag_the_file_and_takes_sub_folders(tmp_path):
    root = tmp_path / "faces"
    for ident in range(2):
        (root / f"id{ident}" / "session").mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((16, 16, 3), 30 * k, np.uint8)).save(root / f"id{ident}" / f"{k}.jpg")
        Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(root / f"id{ident}" / "session" / "s.jpg")
    (root / "id1" / "broken.jpg").write_bytes(b"not an image")
    line = last_error(cli("data", "convert", "--from", "folder", str(root), "--out", str(tmp_path / "a")))
    assert "--skip-bad" in line and "broken.jpg" in line and "skip_bad=True" not in line.split("--skip-bad")[0], line
    assert "BytesIO" not in line, line
    ok = cli("data", "convert", "--from", "folder", str(root), "--out", str(tmp_path / "b"), "--skip-bad")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 6 images of 2 classes" in ok.stdout and "left out 1" in ok.stdout, ok.stdout
    assert mode(tmp_path / "b" / "manifest.json") == 0o644
    (root / "id1" / "broken.jpg").unlink()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "id1" / "session" / "big.jpg")
    line = last_error(cli("data", "convert", "--from", "folder", str(root), "--out", str(tmp_path / "c")))
    assert str(root / "id1" / "session" / "big.jpg") in line and "20x20" in line, line
