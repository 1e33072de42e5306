"""Learning-rate schedule: linear warm-up, then polynomial, cosine or constant, by optimiser step."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "poly",
                  power: float = 2.0, min_ratio: float = 0.0) -> float:
    """Factor of the peak learning rate for optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly to 1 at step ``warmup_steps - 1`` (so step 0 already moves the
    weights); the decay then goes from 1 towards ``min_ratio`` at the end of training.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be positive")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "poly":
        shape = (1.0 - progress) ** power
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule={schedule!r} is not one of poly, cosine, constant")
    return min_ratio + (1.0 - min_ratio) * shape


class LRSchedule:
    """Sets ``lr = peak × lr_multiplier(step)`` in every param group of several optimisers.

    Each param group's learning rate when the schedule is built is its peak, so the
    backbone's and the classifier's peaks may differ.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], total_steps: int,
                 warmup_steps: int = 0, schedule: str = "poly", power: float = 2.0, min_ratio: float = 0.0):
        self.optimizers = list(optimizers)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.schedule, self.power, self.min_ratio = schedule, power, min_ratio
        lr_multiplier(0, total_steps, warmup_steps, schedule, power, min_ratio)  # validates the arguments
        # Peaks are kept here, not in the param groups, so that loading an optimiser's state
        # (whose groups carry the learning rate of the run that saved it) cannot change them.
        self.peaks = [[float(group["lr"]) for group in opt.param_groups] for opt in self.optimizers]
        self.last_multiplier = 0.0

    def set_step(self, step: int) -> float:
        """Apply the learning rates of optimiser step ``step``; returns the multiplier."""
        mult = lr_multiplier(step, self.total_steps, self.warmup_steps, self.schedule, self.power,
                             self.min_ratio)
        for opt, peaks in zip(self.optimizers, self.peaks):
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * mult
        self.last_multiplier = mult
        return mult

    def state_dict(self) -> dict:
        """The schedule's settings (the rates themselves follow from the step)."""
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "schedule": self.schedule,
                "power": self.power, "min_ratio": self.min_ratio, "last_multiplier": self.last_multiplier}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpointed schedule's position; the horizon stays the current config's.

        Resuming with a larger ``max_steps`` therefore stretches the remaining decay.
        """
        self.last_multiplier = float(state.get("last_multiplier", 0.0))

    def changed_settings(self, state: dict) -> list[str]:
        """Settings that differ from a checkpointed schedule's, as "name: old -> new"."""
        return [f"{k}: {state[k]} -> {getattr(self, k)}" for k in
                ("total_steps", "warmup_steps", "schedule", "power", "min_ratio")
                if k in state and state[k] != getattr(self, k)]
