"""A clear error, on its first step, for a torch optimiser that cannot update a sampled shard.

With ``sample_rate < 1`` or bfloat16 rows, :class:`partial_fc.PartialFC` gives the chosen
rows their gradient as a small ``[rows, D]`` tensor and leaves ``weight.grad`` empty, so
``torch.optim.SGD(head.parameters())`` (insightface's pattern) would step over nothing,
silently, forever.  Parameters in that situation are tagged, and a step pre-hook checks
each optimiser once, at its first step: one that holds a tagged parameter and is not a
row optimiser of :mod:`partial_fc.optim` raises.

The hook is process-wide (``torch.optim.optimizer.register_optimizer_step_pre_hook``): a
per-optimiser hook cannot be attached to an optimiser the classifier never sees.  It is
registered when the first such shard is built, and after an optimiser's first step it
costs one set lookup per step.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_TAG = "_partial_fc_row_gradients"
_checked: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_handle = None


def tag_row_gradient_params(params: Iterable[torch.nn.Parameter]) -> None:
    """Mark ``params`` as receiving their gradients as rows (never in ``.grad``)."""
    global _handle
    for p in params:
        setattr(p, _TAG, True)
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_check_first_step)


def _check_first_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _checked:
        return
    if not getattr(optimizer, "updates_partial_fc_rows", False):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if getattr(p, _TAG, False):
                    raise TypeError(
                        f"{type(optimizer).__name__} holds a PartialFC weight of shape {tuple(p.shape)} whose "
                        "gradient arrives as sampled rows (sample_rate < 1 or bfloat16 rows), never in .grad: "
                        "it would update nothing. Use partial_fc.build_head_optimizer(head, 'sgd' | 'adamw', "
                        "...) for the classifier and keep its parameters out of this optimiser")
    _checked.add(optimizer)


__all__ = ["tag_row_gradient_params"]
