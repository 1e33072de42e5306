"""The package layout: old flat module names still import, as the very same module objects."""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import data_pipeline
from data_pipeline import MOVED

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_name_is_the_new_module(old):
    new = importlib.import_module(f"data_pipeline.{MOVED[old]}")
    alias = importlib.import_module(f"data_pipeline.{old}")
    assert alias is new
    assert sys.modules[f"data_pipeline.{old}"] is new
    # The module keeps its own identity: name, spec and file are the new ones.
    assert new.__name__ == f"data_pipeline.{MOVED[old]}"
    assert new.__spec__.name == new.__name__
    assert Path(new.__file__).is_relative_to(REPO / "data_pipeline")
    assert getattr(data_pipeline, old) is new


def test_every_new_path_exists_and_no_flat_file_is_left():
    for old, new in MOVED.items():
        assert (REPO / "data_pipeline" / (new.replace(".", "/") + ".py")).is_file(), new
        assert not (REPO / "data_pipeline" / f"{old}.py").exists(), old


def test_from_imports_through_old_names_give_the_same_objects():
    from data_pipeline.manifest import Manifest as OldManifest
    from data_pipeline.wds_loader import WebDatasetLoader as OldLoader

    from data_pipeline.formats.manifest import Manifest
    from data_pipeline.loaders import build_loader
    from data_pipeline.loaders.build import build_loader as built
    from data_pipeline.loaders.wds_loader import WebDatasetLoader
    from data_pipeline.synthetic import SyntheticFaces
    from data_pipeline.synthetic.faces import SyntheticFaces as faces
    assert (OldManifest, build_loader, SyntheticFaces, OldLoader) == (Manifest, built, faces, WebDatasetLoader)


def test_patching_through_the_old_name_is_seen_by_the_new(monkeypatch):
    import data_pipeline.tar_reader as old

    import data_pipeline.formats.tar_reader as new
    monkeypatch.setattr(old, "open_shard", "patched")
    assert new.open_shard == "patched"


def test_pickles_naming_an_old_module_load():
    from data_pipeline.formats.manifest import ShardInfo
    info = ShardInfo("a.tar", 3, "0" * 64)
    data = pickle.dumps(info, protocol=0)  # text opcodes: the module name can be swapped in place
    assert b"data_pipeline.formats.manifest" in data  # new pickles name the new module
    old = data.replace(b"data_pipeline.formats.manifest", b"data_pipeline.manifest")
    assert pickle.loads(old) == info


def test_run_as_main_through_an_old_name():
    # `python -m data_pipeline.<old>` still runs the module (its --help here).
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "data_pipeline.dali_index", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()
