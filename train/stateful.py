"""What a checkpoint holds, as a mapping of named components that own their state.

Every component follows :class:`Stateful` (``state_dict()`` / ``load_state_dict(state)``,
the contract of torch modules and optimisers). The trainer hands the checkpoint manager two
mappings: the *shared* components, the same on every rank and written once by rank 0 into
``shared.pt``, and the *per-rank* ones, written by every rank into its ``rank_XXXXX.pt``.
A component whose restore depends on the checkpoint it comes from (the backbone runner
reads DeepSpeed's own files; the classifier shard is re-sliced at another world size)
also has ``restore(state, source)``; the manager calls that instead of
``load_state_dict`` and collects the notes it returns.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """Something a checkpoint saves and restores."""

    def state_dict(self) -> dict[str, Any]:
        """The state to save (plain Python objects and tensors)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Become what ``state_dict()`` returned."""


@runtime_checkable
class SourceAware(Protocol):
    """A component whose restore needs the checkpoint's folder or its saved world size."""

    def restore(self, state: Optional[dict[str, Any]], source: "SavedCheckpoint") -> list[str]:
        """Restore from ``state`` (None: this rank has no saved part of its own, e.g. at another
        world size); returns notes on anything not restored exactly."""


@dataclass
class SavedCheckpoint:
    """The checkpoint being restored, as a component that re-slices or reads side files sees it."""

    folder: Path
    """The step_* folder."""
    header: dict[str, Any]
    """shared.pt's header: format, step, world_size, num_classes, class_ranges, config."""
    world_size: int
    """The world size of the run that restores it."""
    read_rank: Callable[[int], dict[str, Any]] = field(repr=False, default=lambda r: {})
    """Reads saved rank ``r``'s file (memory-mapped)."""

    @property
    def saved_world_size(self) -> int:
        return int(self.header["world_size"])

    @property
    def same_world(self) -> bool:
        """True when every rank has a saved part of its own."""
        return self.saved_world_size == self.world_size


@dataclass
class TrainingProgress:
    """Where the run is: steps, epoch, skipped-step counters, W&B run id (a shared component)."""

    step: int = 0
    """Optimiser steps taken."""
    epoch: int = 0
    """The epoch the loader is in."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient, in total."""
    skipped_in_row: int = 0
    """... and in a row at the end."""
    wandb_run_id: Optional[str] = None
    """The W&B run a resume continues."""
    fresh_epoch: bool = True
    """True when the next batch starts ``epoch`` (set_epoch is due); False mid-epoch."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_row = int(state.get("skipped_in_row", 0))
        self.wandb_run_id = state.get("wandb_run_id")
        self.fresh_epoch = bool(state.get("fresh_epoch", False))


def to_host(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are CPU clones: a snapshot that training cannot change."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_host(v) for v in obj)
    return obj


def collect(components: dict[str, Any]) -> dict[str, Any]:
    """``{name: state}`` of a mapping whose values are :class:`Stateful` (or already plain values)."""
    return {name: c.state_dict() if isinstance(c, Stateful) else c for name, c in components.items()}


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (what a snapshot copies)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


__all__ = ["Stateful", "SourceAware", "SavedCheckpoint", "TrainingProgress", "to_host", "collect",
           "tensor_bytes"]
