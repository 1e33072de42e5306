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
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from partial_fc.generator_state import derived_seed

from .distributed import DistContext, broadcast_object
from .failure import RankFailure, collective_verdict, gather_objects
from .faults import FaultSwitch
from .stateful import SavedCheckpoint, SourceAware, Stateful, collect, to_host

SHARED = "shared.pt"
FORMAT = 2
"""The checkpoint layout this code writes; it reads formats 1 (flat keys) and 2."""
READABLE_FORMATS = (1, 2)
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
    return sorted(found, key=lambda p: _step_of(p.name))


def _step_of(name: str) -> int:
    """The step number in a checkpoint folder's name (``step_00000040`` → 40)."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not the name of a checkpoint folder")
    return int(match.group(1))


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


# ---------------------------------------------------------------------- storage
class CheckpointStorageError(RuntimeError):
    """A rank cannot see the checkpoint folder, or a node-local checkpoint cannot serve this resume."""


class CheckpointWriteError(RankFailure):
    """Some rank failed to write its part of a checkpoint; nothing was published."""


def node_of(ctx: DistContext) -> tuple[int, bool]:
    """(node index, is this rank its node's first?) from torchrun's LOCAL_WORLD_SIZE / GROUP_RANK."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size) or ctx.world_size)
    node = int(os.environ.get("GROUP_RANK", ctx.rank // max(local_world, 1)))
    return node, ctx.local_rank == 0 or ctx.world_size == 1


def _verdict(error: Optional[str], ctx: DistContext, what: str, group: Any = None,
             kind: type = CheckpointWriteError) -> None:
    """Raise on every rank when any rank had an ``error`` (its message names the rank)."""
    errors = [(r, e) for r, e in enumerate(gather_objects(error, ctx, group)) if e]
    if errors:
        r, e = errors[0]
        more = f" (and {len(errors) - 1} other rank(s))" if len(errors) > 1 else ""
        raise kind(f"{what} failed on rank {r}{more}: {e}")


# ---------------------------------------------------------------------- saving
STORAGES = ("shared", "node_local")
STALE = (".tmp-step_*", ".tmp-old-step_*", f".{LATEST}.tmp-*", ".probe-*")


class CheckpointManager:
    """Saves checkpoints atomically under ``root`` and keeps the last ``keep_last``.

    ``storage="shared"``: one folder every rank sees; rank 0 writes ``shared.pt`` and
    publishes. ``storage="node_local"``: the same path on every node names a disk of that
    node; each node's first rank writes its own ``shared.pt`` (the shared components are
    replicated, so every node has the same bytes) and publishes the node's folder, which
    holds the rank files of that node's ranks only.

    ``asynchronous``: :meth:`save` with ``background=True`` copies the state to host memory
    and returns; a writer thread writes and publishes it. Its cross-rank agreement runs on a
    gloo group of its own (created here, a collective), never on the training group, so the
    training collectives on the main thread never interleave with it.
    """

    def __init__(self, root: Path, ctx: DistContext, keep_last: int = 3, storage: str = "shared",
                 asynchronous: bool = False, faults: Optional[FaultSwitch] = None):
        if storage not in STORAGES:
            raise ValueError(f"checkpoint.storage={storage!r} is unknown: choose shared or node_local")
        self.root, self.ctx, self.keep_last, self.storage = Path(root), ctx, keep_last, storage
        self.faults = faults  # testing: an injected ENOSPC inside this rank's write
        self.node, node_leader = node_of(ctx)
        # The ranks that create, publish and prune the folder: one per filesystem.
        self.publisher = ctx.is_main if storage == "shared" else node_leader
        self.writer_group = None
        if asynchronous and ctx.backend != "none" and ctx.world_size > 1:
            self.writer_group = dist.new_group(backend="gloo")
        self._writer: Optional[threading.Thread] = None
        self._writer_error: Optional[BaseException] = None
        self.last_stall_s = 0.0

    # -- start-up ------------------------------------------------------------------------------
    def clean_stale(self) -> list[Path]:
        """Remove what a killed save left (temporary folders, pointer temp files); publishers only."""
        removed: list[Path] = []
        if self.publisher and self.root.is_dir():
            for pattern in STALE:
                for stale in self.root.glob(pattern):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
                    removed.append(stale)
        return removed

    def check_storage(self) -> None:
        """A collective: every rank must see the folder its publisher made (a probe file round trip)."""
        ctx, error = self.ctx, None
        if ctx.world_size == 1:
            return
        token = secrets.token_hex(8)
        probe = self.root / f".probe-{token}"
        if self.publisher:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                write_text_atomic(probe, token)
            except OSError as e:
                error = f"cannot write {probe}: {e}"
        _verdict(error, ctx, f"creating the checkpoint folder {self.root}", kind=CheckpointStorageError)
        # Every rank learns the token of its own publisher (rank 0, or its node's first rank).
        tokens = gather_objects((self.node, token if self.publisher else None), ctx)
        if self.storage == "shared":
            expected = tokens[0][1]
        else:
            expected = next(t for n, t in tokens if n == self.node and t)
        seen = self.root / f".probe-{expected}"
        try:
            ok = seen.read_text() == expected
        except OSError:
            ok = False
        blind = [r for r, (host, good) in enumerate(gather_objects((socket.gethostname(), ok), ctx)) if not good]
        ctx.barrier()
        if self.publisher:
            probe.unlink(missing_ok=True)
        if blind:
            hint = ("checkpoints need a filesystem that every node sees at this path, or "
                    "checkpoint.storage=node_local (each node keeps its own ranks' files)"
                    if self.storage == "shared" else "the node's ranks must share the node's folder")
            raise CheckpointStorageError(f"rank(s) {blind} do not see the checkpoint folder {self.root} "
                                         f"that {'rank 0' if self.storage == 'shared' else 'their node'} "
                                         f"created: {hint}")

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, shared: dict, local: dict,
             engine_save: Optional[Callable[[Path], None]] = None, background: bool = False) -> Path:
        """Write one checkpoint (a collective: every rank calls it) and return its folder.

        ``shared`` (written once per filesystem) and ``local`` (every rank) map names to
        :class:`~train.stateful.Stateful` components or plain values (header entries).
        ``engine_save(folder)`` lets a DeepSpeed engine write its own files into the folder
        before it is published. ``background``: return once the state is copied to host
        memory; a writer thread writes it (see the class docstring). Any earlier background
        save is waited for first (its failure is raised here).
        """
        t0 = time.perf_counter()
        self.wait()
        shared_payload = self._payload(step, shared, with_header=True) if self.publisher else {}
        local_payload = self._payload(step, local, with_header=False)
        final = self.root / checkpoint_name(step)
        if not background or self.ctx.world_size > 1 and self.writer_group is None and \
                self.ctx.backend != "none":
            self._write(step, shared_payload, local_payload, engine_save, self.ctx.group)
            self.last_stall_s = time.perf_counter() - t0
            return final
        if engine_save is not None:
            raise ValueError("a DeepSpeed engine writes its own files collectively: checkpoint.async_save "
                             "does not apply to parallel.strategy=deepspeed")
        shared_payload, local_payload = to_host(shared_payload), to_host(local_payload)
        self._writer = threading.Thread(target=self._background, name=f"checkpoint-writer-{step}",
                                        args=(step, shared_payload, local_payload), daemon=True)
        self._writer.start()
        self.last_stall_s = time.perf_counter() - t0
        return final

    def wait(self) -> None:
        """Block until a background save has been published (a no-op without one); raise its failure."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._writer_error = self._writer_error, None
        if error is not None:
            raise error

    @property
    def writing(self) -> bool:
        """True while a background save is being written."""
        return self._writer is not None and self._writer.is_alive()

    def _payload(self, step: int, components: dict, with_header: bool) -> dict:
        payload = collect(components)
        payload["components"] = [n for n, c in components.items() if isinstance(c, Stateful)]
        payload["format"] = FORMAT
        if with_header:
            payload.setdefault("step", step)
            payload.setdefault("world_size", self.ctx.world_size)
        else:
            payload.setdefault("rank", self.ctx.rank)
        return payload

    def _background(self, step: int, shared_payload: dict, local_payload: dict) -> None:
        try:
            self._write(step, shared_payload, local_payload, None, self.writer_group)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._writer_error = e

    def _write(self, step: int, shared_payload: dict, local_payload: dict,
               engine_save: Optional[Callable[[Path], None]], group: Any) -> None:
        """Prepare ``.tmp-…``, every rank writes and fsyncs its part, agree, publish, agree."""
        ctx = self.ctx
        name = checkpoint_name(step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        what = f"saving checkpoint {final}"
        error: Optional[str] = None
        if self.publisher:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.clean_stale()
                tmp.mkdir()
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        _verdict(error, ctx, what, group)

        def write_part() -> None:
            if self.faults is not None:
                self.faults.on_save(step)
            save_file(local_payload, tmp / rank_file(ctx.rank))
            if engine_save is not None:
                engine_save(tmp)

        # Every rank's part is on disk (fsynced) before any publisher renames the folder; a
        # write that fails on one rank (a full disk) fails the save on every rank, naming it.
        try:
            collective_verdict(ctx, f"write its part of checkpoint {name} in {self.root}", write_part,
                               group, CheckpointWriteError)
        except CheckpointWriteError:
            if self.publisher:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.publisher:
            try:
                save_file(shared_payload, tmp / SHARED)
                _fsync_dir(tmp)
                self._publish(tmp, final, name)
                self._prune()
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        _verdict(error, ctx, what, group)

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
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

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from, the same on every rank (see :func:`resolve_resume`).

        On node-local storage ``latest`` is the newest step that every rank finds complete
        on its own node, with its own rank file (a kill between two nodes' renames leaves
        the previous step, which every node still has).
        """
        if self.storage == "shared" or resume in ("none", ""):
            return resolve_resume(resume, self.root, self.ctx)
        ctx = self.ctx
        if resume == "latest":
            mine = {_step_of(p.name) for p in list_checkpoints(self.root)
                    if (p / rank_file(ctx.rank)).is_file()}
            every = gather_objects(sorted(mine), ctx)
            common = set(every[0]).intersection(*map(set, every[1:]))
            if not common:
                if any(every):
                    raise CheckpointStorageError(
                        f"no checkpoint step under {self.root} is complete on every node (steps per rank: "
                        f"{every}): resume on the same nodes, with the same ranks per node, as the run that wrote them")
                return None
            return self.root / checkpoint_name(max(common))
        path = Path(resume)
        error = None if (path / SHARED).is_file() and (path / rank_file(ctx.rank)).is_file() else \
            f"{path} has no {SHARED} and {rank_file(ctx.rank)} on this node"
        _verdict(error, ctx, f"checkpoint.resume={resume!r} (node_local storage)", kind=CheckpointStorageError)
        return path

    def load(self, folder: Path, shared: dict, local: dict,
             check: Optional[Callable[[dict], None]] = None) -> "LoadReport":
        """Restore the components of ``shared`` and ``local`` (names as at save) from ``folder``.

        ``check(header)`` runs before anything is restored (e.g. the class count). At another
        world size this rank has no saved part: components with ``restore`` get ``None`` (the
        classifier re-slices), the others are listed in ``report.skipped``.
        """
        folder = Path(folder)
        saved = read_checkpoint(folder)
        header = saved["header"]
        if check is not None:
            check(header)
        source = SavedCheckpoint(folder, header, self.ctx.world_size, lambda r: load_local(folder, r))
        if self.storage == "node_local" and not source.same_world:
            raise CheckpointStorageError(
                f"checkpoint {folder} was written by {source.saved_world_size} ranks on node-local storage; "
                f"re-sharding it for {self.ctx.world_size} ranks needs every rank's file: copy the "
                f"{folder.name} folders of every node into one folder and resume from it with "
                "checkpoint.storage=shared")
        local_states = read_rank_states(folder, self.ctx.rank, header) if source.same_world else None
        report = LoadReport(header=header)
        for name, component in [*shared.items(), *local.items()]:
            if not isinstance(component, Stateful):
                continue  # a header value (class count, config), checked by ``check``
            states = saved["shared"] if name in shared else local_states
            if states is not None and name not in states:
                raise ValueError(f"checkpoint {folder} has no {name!r} state (it has {sorted(states)}): "
                                 "it was written by another kind of run")
            state = None if states is None else states[name]
            if isinstance(component, SourceAware):
                report.notes.extend(component.restore(state, source))
            elif state is None:
                report.skipped.append(name)
            else:
                component.load_state_dict(state)
        return report


@dataclass
class LoadReport:
    """What :meth:`CheckpointManager.load` did."""

    header: dict
    """shared.pt's header (step, world_size, num_classes, class_ranges, config, format)."""
    notes: list[str] = field(default_factory=list)
    """Things restored other than exactly (re-sliced shards, changed settings)."""
    skipped: list[str] = field(default_factory=list)
    """Per-rank components that had no saved state for this rank (another world size)."""


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


class CheckpointFormatError(ValueError):
    """A checkpoint of a layout this code cannot read (written by a newer shardface, or not one)."""


def check_format(payload: Any, file: Path) -> int:
    """The payload's format version; a clear error for one this code cannot read."""
    version = payload.get("format", 1) if isinstance(payload, dict) else None
    if version not in READABLE_FORMATS:
        raise CheckpointFormatError(
            f"{file} has checkpoint format {version!r}; this shardface reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: resume it with the version that wrote it")
    return int(version)


def _upgrade_format1(shared: dict, local: Optional[dict]) -> tuple[dict, dict, Optional[dict]]:
    """(header, shared states, rank states) of a format-1 checkpoint (flat keys)."""
    header = {k: shared[k] for k in ("step", "world_size", "num_classes", "config", "class_ranges") if k in shared}
    header["format"] = 1
    progress = {"step": shared["step"], "epoch": shared["epoch"],
                "skipped_steps": shared.get("skipped_steps", 0), "skipped_in_row": shared.get("skipped_in_row", 0),
                "wandb_run_id": shared.get("wandb_run_id"),
                "fresh_epoch": bool(local.get("fresh_epoch", False)) if local is not None else True}
    runner = {k: shared[k] for k in ("backbone", "optimizer", "scaler", "deepspeed") if k in shared}
    states = {"progress": progress, "schedule": shared["schedule"], "runner": runner}
    rank_states = None if local is None else {k: local[k] for k in ("classifier", "rng", "loader") if k in local}
    return header, states, rank_states


def read_checkpoint(folder: Path) -> dict:
    """``{"header", "shared"}`` of a checkpoint folder: its header and its shared components' states."""
    payload = load_shared(folder)
    if check_format(payload, Path(folder) / SHARED) == 1:
        local = load_local(folder, 0) if (Path(folder) / rank_file(0)).is_file() else None
        header, states, _ = _upgrade_format1(payload, local)
        return {"header": header, "shared": states}
    names = payload.get("components", [])
    return {"header": {k: v for k, v in payload.items() if k not in names},
            "shared": {k: payload[k] for k in names}}


def read_rank_states(folder: Path, rank: int, header: dict) -> dict:
    """The per-rank components' states in rank ``rank``'s file."""
    payload = load_local(folder, rank)
    if check_format(payload, Path(folder) / rank_file(rank)) == 1:
        states = _upgrade_format1({**header, "epoch": 0, "schedule": {}}, payload)[2]
        return states or {}
    return {k: payload[k] for k in payload.get("components", [])}
