"""Atomic, sharded checkpoints and finding the one to resume from.

Layout of ``<dir>``::

    step_00001000/          one checkpoint, complete or absent
        shared.pt           rank 0: step, epoch, config, backbone (+ optimiser, scaler),
                            schedule, W&B run id, class range of every rank
        rank_00000.pt ...   every rank: its classifier shard (weight, bias, row optimiser
                            state, sampling generator) with its class range, RNG states,
                            loader state
        deepspeed/          the DeepSpeed engine's own files (strategy=deepspeed)
    latest                  text: the folder name of the newest complete checkpoint

A save writes into ``.tmp-step_…`` (every file fsynced), then rank 0 renames the folder
(one atomic step) and only then rewrites ``latest`` (write, fsync, rename).  A process
killed at any point leaves the previous checkpoint and the pointer to it intact; the
stale temporary folder is removed by the next save.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from partial_fc.generator_state import derived_seed

from .distributed import DistContext, broadcast_object
from .failure import RankFailure, collective_verdict
from .faults import FaultSwitch

SHARED = "shared.pt"
LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after ``step`` optimiser steps."""
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """File name of one rank's part of a checkpoint."""
    return f"rank_{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj: Any, path: Path) -> None:
    """torch.save + fsync, so the bytes are on disk before the folder is renamed into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file in one step (write a temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------- RNG states
def capture_rng(device: torch.device) -> dict:
    """Python, NumPy, torch CPU and (on GPU) CUDA generator states of this process.

    ``device_type`` records where the run was: a checkpoint written on the CPU has no
    ``cuda`` entry, and :func:`restore_rng` seeds the GPU generator from the saved CPU
    state instead.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "device_type": device.type}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> Optional[str]:
    """Restore what :func:`capture_rng` returned, on this kind of device or another.

    Python, NumPy and torch's CPU generator are device-independent and come back exactly.
    A CUDA state is restored on any GPU index; a CPU checkpoint resumed on a GPU (no
    ``cuda`` entry) seeds the CUDA generator from a hash of the saved CPU state
    (deterministic; not the stream of a run that had been on a GPU all along); a GPU
    checkpoint resumed on the CPU leaves its CUDA state unused.  Returns a note when the
    restore was not exact, else None.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return "the checkpoint's CUDA generator state is unused on the CPU" if "cuda" in state else None
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
        return None
    torch.cuda.manual_seed(derived_seed(state["torch"]))
    return ("the checkpoint was written without a GPU: the CUDA generator is seeded from its CPU "
            "generator state (deterministic, a new stream)")


# ---------------------------------------------------------------------- finding
def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders in ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / SHARED).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` points to; the newest complete folder if the pointer is missing or stale."""
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / SHARED).is_file():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: Path, ctx: DistContext) -> Optional[Path]:
    """The checkpoint to resume from (rank 0 decides, every rank gets the same answer).

    ``resume`` is ``none``, ``latest`` (None when there is no checkpoint yet: a fresh start)
    or a folder path (an error when it is not a complete checkpoint).
    """
    answer: Optional[str] = None
    error: Optional[str] = None
    if ctx.is_main and resume not in ("none", ""):
        if resume == "latest":
            found = find_latest(root)
            answer = str(found) if found else None
        else:
            path = Path(resume)
            if (path / LATEST).is_file() and not (path / SHARED).is_file():
                path = find_latest(path) or path  # a checkpoint root was given
            if not (path / SHARED).is_file():
                error = (f"checkpoint.resume={resume!r}: {path} is not a complete checkpoint (no {SHARED}); "
                         f"give a step_* folder, a checkpoint dir, 'latest' or 'none'")
            answer = str(path)
    answer, error = broadcast_object((answer, error), ctx)  # type: ignore[misc]
    if error:
        raise FileNotFoundError(error)
    return Path(answer) if answer else None


# ---------------------------------------------------------------------- saving
class CheckpointManager:
    """Saves checkpoints atomically under ``root`` and keeps the last ``keep_last``."""

    def __init__(self, root: Path, ctx: DistContext, keep_last: int = 3, faults: Optional[FaultSwitch] = None):
        self.root, self.ctx, self.keep_last = Path(root), ctx, keep_last
        self.faults = faults  # testing: an injected ENOSPC inside this rank's write

    def save(self, step: int, shared: dict, local: dict,
             engine_save: Optional[Callable[[Path], None]] = None) -> Path:
        """Write one checkpoint (a collective: every rank calls it) and return its folder.

        ``shared`` is written by rank 0, ``local`` by every rank; ``engine_save(folder)``
        lets a DeepSpeed engine write its own files into the folder before it is published.
        """
        ctx = self.ctx
        name = checkpoint_name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        ctx.barrier()

        def write_local() -> None:
            if self.faults is not None:
                self.faults.on_save(step)
            save_file(local, tmp / rank_file(ctx.rank))

        # A write that fails on one rank (a full disk) fails the save on every rank, with that
        # rank's error, instead of leaving the others in the next collective.
        try:
            collective_verdict(ctx, f"write its part of checkpoint {name} in {self.root}", write_local)
        except RankFailure:
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if engine_save is not None:
            engine_save(tmp)
        ctx.barrier()
        if ctx.is_main:
            save_file(shared, tmp / SHARED)
            _fsync_dir(tmp)
            if final.exists():
                # The same step saved again (e.g. at the end): the old copy goes after the new one lands.
                old = self.root / f".tmp-old-{name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, name + "\n")
            self._prune()
        ctx.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- loading
def load_shared(path: Path) -> dict:
    """The rank-0 part of a checkpoint (read by every rank)."""
    try:
        return torch.load(Path(path) / SHARED, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {SHARED}: not a complete checkpoint") from None


def load_local(path: Path, rank: int) -> dict:
    """One rank's part of a checkpoint (classifier shard, RNG, loader state)."""
    file = Path(path) / rank_file(rank)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the checkpoint {path} is incomplete")
    return torch.load(file, map_location="cpu", weights_only=False)
