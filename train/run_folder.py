"""A run folder holds one run: a new run there is refused unless it resumes or is told to overwrite.

Without this, a run started in the folder of an earlier one (resume forgotten) would replace
``model.pt`` and add its ``step_*`` checkpoints beside the old ones, where pruning and the
``latest`` pointer would then disagree about which is the newest.  The check is made by the
``shardface train`` command before any process starts and again by the trainer before it
writes anything; ``overwrite=true`` removes the earlier run's checkpoints and export first, so
that ``latest`` and ``checkpoint.resume=latest`` name the new run's newest step.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .checkpoint import LATEST, STALE, list_checkpoints
from .config import TrainConfig
from .config_parse import ConfigError

EXPORT_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def checkpoint_root(cfg: TrainConfig, node: int = 0) -> Path:
    """Where the run's checkpoints go (``checkpoint.dir`` or ``<output_dir>/checkpoints``)."""
    c = cfg.checkpoint
    if not c.dir:
        return Path(cfg.output_dir) / "checkpoints"
    return Path(c.dir.replace("{node}", str(node)))


def earlier_run(run_dir: Path, checkpoints: Path) -> Optional[str]:
    """What an earlier run left in the folder ("checkpoints up to step 60, model.pt"), or None."""
    found = []
    steps = list_checkpoints(checkpoints)
    if steps:
        found.append(f"{len(steps)} checkpoint(s) up to {steps[-1].name}")
    if (run_dir / EXPORT_FILE).is_file():
        found.append(EXPORT_FILE)
    return ", ".join(found) or None


def refusal(cfg: TrainConfig, checkpoints: Optional[Path] = None) -> Optional[str]:
    """The error line when this run would overwrite an earlier one, else None."""
    if cfg.overwrite or cfg.checkpoint.resume not in ("none", ""):
        return None
    run_dir = Path(cfg.output_dir)
    left = earlier_run(run_dir, checkpoints if checkpoints is not None else checkpoint_root(cfg))
    if left is None:
        return None
    return (f"output_dir={str(run_dir)!r} already holds a run ({left}): resume it with --set "
            "checkpoint.resume=latest, choose another output_dir, or replace it with --set overwrite=true")


def check_run_folder(cfg: TrainConfig, checkpoints: Optional[Path] = None) -> None:
    """Raise ConfigError when a new run would overwrite an earlier one (see :func:`refusal`)."""
    error = refusal(cfg, checkpoints)
    if error:
        raise ConfigError(error)


def clear_checkpoints(checkpoints: Path) -> list[str]:
    """Remove every checkpoint, the ``latest`` pointer and stale temporary folders; returns the names removed."""
    removed = []
    for folder in list_checkpoints(checkpoints):
        shutil.rmtree(folder)
        removed.append(folder.name)
    pointer = checkpoints / LATEST
    if pointer.is_file():
        pointer.unlink()
    for pattern in STALE:
        for stale in checkpoints.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return removed


def clear_export(run_dir: Path) -> list[str]:
    """Remove the earlier run's ``model.pt`` and ``summary.json``; returns the names removed."""
    removed = []
    for name in (EXPORT_FILE, SUMMARY_FILE):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    return removed
