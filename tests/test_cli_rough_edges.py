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
