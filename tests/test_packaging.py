"""The wheel carries what an installed shardface needs besides code: presets, launch files, C source."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import train.config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_presets_where_the_config_loader_looks(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shardface-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    # An installed wheel has no checkout around it: train.config falls back to <prefix>/share/shardface/configs.
    fallback = Path(sys.prefix) / "share" / "shardface" / "configs"
    relative = fallback.relative_to(sys.prefix).as_posix()
    for name in presets:
        assert any(n.endswith(f".data/data/{relative}/{name}") for n in names), (name, sorted(names)[:20])
    for name in ("launch/slurm.sbatch", "launch/multinode.sh", "launch/deepspeed_zero1.json",
                 "launch/deepspeed_zero2.json", "partial_fc/native/row_kernels.c"):
        assert name in names, name


def test_checkout_presets_are_found() -> None:
    assert train.config.PRESET_DIR == ROOT / "configs"
    assert set(train.config.list_presets()) >= {"cpu_tiny", "ms1mv3_r50", "glint360k_r100", "webface42m_r100_pfc02"}
