"""The shardface command: each user mistake gives one line on stderr and a non-zero exit."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shardface(*args, cwd=None):
    """Run the command line in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=120)


def one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[-1].startswith("shardface: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_help_lists_every_subcommand():
    out = shardface("--help")
    assert out.returncode == 0
    for name in ["data", "train", "eval", "export", "embed", "bench", "demo", "study"]:
        assert name in out.stdout


def test_multi_node_without_rendezvous_is_one_line():
    one_line_error(shardface("train", "--nnodes", "2", "--nproc-per-node", "1"), "--rdzv-endpoint")


def test_missing_converter_input_is_one_line(tmp_path):
    one_line_error(shardface("data", "convert", "--from", "folder", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "out")), "does not exist")


@pytest.mark.parametrize("override, fragment", [
    ("model.backbone=resnet9000", "unknown backbone 'resnet9000'"),
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("device=cuda", "no CUDA GPU"),
    ("data.manifest=/nonexistent/manifest.json", "does not exist"),
])
def test_train_mistakes_are_one_line(override, fragment):
    # A data source that exists everywhere, so only the planted mistake can be reported.
    base = ["data.loader=random_tensors", "data.manifest=", "data.num_classes=10", "data.num_samples=16"]
    args = [x for item in base + [override] for x in ("--set", item)]
    one_line_error(shardface("train", *args), fragment)


def test_unknown_preset_is_one_line():
    one_line_error(shardface("train", "--config", "no_such_preset"), "no_such_preset")


def test_world_size_the_config_cannot_use_is_one_line():
    one_line_error(shardface("train", "--nproc-per-node", "3", "--set", "data.loader=random_tensors",
                             "--set", "data.num_classes=2", "--set", "data.num_samples=16"),
                   "only 2 classes")


def test_missing_model_file_is_one_line(tmp_path):
    one_line_error(shardface("export", "--model", str(tmp_path / "nope.pt"), "--onnx", str(tmp_path / "m.onnx")),
                   "no embedding model")
