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
