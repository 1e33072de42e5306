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


def test_the_command_gives_its_processes_a_short_openmp_spin_unless_the_user_chose():
    from launch.openmp_env import SPIN_ROUNDS, short_openmp_spin

    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        kept = dict(chosen)
        short_openmp_spin(kept)
        assert kept == chosen
    # The console entry sets it first thing, before anything has loaded torch (and libgomp,
    # which reads it once); torchrun's workers inherit the environment.
    probe = ("import os, sys\n"
             "for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'): os.environ.pop(k, None)\n"
             "import launch.cli as cli\n"
             "assert 'torch' not in sys.modules\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(os.environ.get('GOMP_SPINCOUNT'))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == SPIN_ROUNDS
