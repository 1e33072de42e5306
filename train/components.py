"""The trainer's stateful components as a checkpoint sees them (see :mod:`train.stateful`).

Thin adapters where a component's own methods need more than its state: the backbone
runner (DeepSpeed reads its own files), the classifier shard (re-sliced at another world
size), the learning-rate schedule (notes a changed schedule), the loader (a typed
settings mismatch continues at the same sample count), the RNG streams.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from data_pipeline.loaders.loader_base import LoaderSettingsMismatch

from .checkpoint import capture_rng, restore_rng
from .reshard import classifier_state, load_classifier
from .schedule import LRSchedule
from .stateful import SavedCheckpoint


class RunnerState:
    """The backbone side: weights, optimiser, loss scaler (or DeepSpeed's engine files)."""

    def __init__(self, runner: Any):
        self.runner = runner

    def state_dict(self) -> dict[str, Any]:
        return self.runner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise TypeError("the backbone runner restores through restore(state, source)")

    def restore(self, state: Optional[dict[str, Any]], source: SavedCheckpoint) -> list[str]:
        return self.runner.load_state_dict(state or {}, source.folder, source.same_world)


class ClassifierState:
    """This rank's classifier shard, its row optimiser, a class-sharded metric loss and the margin."""

    def __init__(self, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 metric: Optional[torch.nn.Module] = None):
        self.head, self.optimizer, self.metric = head, optimizer, metric

    def state_dict(self) -> dict[str, Any]:
        return classifier_state(self.head, self.optimizer, self.metric)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise TypeError("the classifier restores through restore(state, source)")

    def restore(self, state: Optional[dict[str, Any]], source: SavedCheckpoint) -> list[str]:
        local = {"classifier": state} if state is not None else None
        if load_classifier(self.head, self.optimizer, source.folder, source.header, local, self.metric):
            return [f"classifier shards re-sliced from world size {source.saved_world_size} to "
                    f"{source.world_size}; negative sampling restarts from fresh generators"]
        return []


class ScheduleState:
    """The learning-rate schedule; a resume with other schedule settings says so."""

    def __init__(self, schedule: LRSchedule):
        self.schedule = schedule

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)

    def restore(self, state: Optional[dict[str, Any]], source: SavedCheckpoint) -> list[str]:
        if state is None:
            return []
        changed = self.schedule.changed_settings(state)
        self.schedule.load_state_dict(state)
        return ["learning-rate schedule differs from the checkpoint's: " + "; ".join(changed)] if changed else []


class RngState:
    """Python, NumPy, torch (and CUDA) generator states of this process."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return capture_rng(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state, self.device)


class LoaderState:
    """The loader's position; saved under other data settings it continues at the same sample count."""

    def __init__(self, loader: Any):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def restore(self, state: Optional[dict[str, Any]], source: SavedCheckpoint) -> list[str]:
        if state is None:
            return []
        try:
            self.loader.load_state_dict(state)
        except LoaderSettingsMismatch as err:
            # Data settings changed on purpose (batch size, shards): keep the position in
            # samples and go on in the new order rather than refuse to resume.
            self.loader.load_state_dict(state, strict=False)
            return [f"data order: loader settings differ ({err.detail}); epoch {state['epoch']} "
                    "continues at the same sample count in a new order"]
        return []
