"""One optimiser step: micro-steps of forward/backward, the finiteness vote, both optimisers.

A step whose loss or gradients are not finite on any rank is skipped by every rank: no
optimiser moves, the BatchNorm statistics of its forwards, the margin's running state and
the centres of a center loss are rolled back, and under fp16 the loss scale is backed off.
The caller counts skipped steps and stops the run after too many in a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from partial_fc.comm import all_reduce

from .distributed import DistContext
from .parallel import BackboneRunner

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """What one optimiser step did."""

    loss: float
    """Global-batch loss, averaged over the micro-steps (NaN when not finite)."""
    accuracy: float
    """Top-1 accuracy of the classifier on the last micro-step's global batch (NaN when it is not trained)."""
    grad_norm: Optional[float]
    """Backbone gradient norm before clipping (None when not measured)."""
    applied: bool
    """False when the step was skipped (non-finite loss or gradient)."""
    loss_scale: float
    """Loss scale used by the step's backward (1 without fp16)."""
    samples: int
    """Samples of the global batch over all micro-steps."""


class TrainStep:
    """Runs optimiser steps of backbone (data-parallel) and classifier shard (model-parallel)."""

    def __init__(self, runner: BackboneRunner, head: nn.Module, head_optimizer: torch.optim.Optimizer,
                 ctx: DistContext, grad_accum: int = 1, clip_grad_norm: float = 0.0,
                 metric_loss: Optional[nn.Module] = None, metric_weight: float = 0.0,
                 channels_last: bool = False, use_classifier: bool = True):
        if not use_classifier and metric_loss is None:
            raise ValueError("use_classifier=False needs a metric_loss: without either there is nothing to train")
        self.runner, self.head, self.head_optimizer, self.ctx = runner, head, head_optimizer, ctx
        self.grad_accum, self.clip = grad_accum, clip_grad_norm
        self.metric_loss, self.metric_weight = metric_loss, metric_weight
        self.channels_last = channels_last
        self.use_classifier = use_classifier

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from partial_fc import NonFiniteEmbeddingError
        features = embeddings.float()
        try:
            loss = self.head(features, labels) if self.use_classifier else None
            if self.metric_loss is not None:
                metric = self.metric_weight * self.metric_loss(features, labels)
                loss = metric if loss is None else loss + metric
        except NonFiniteEmbeddingError:
            # Every rank raises together.  A NaN loss tied to the backbone's graph keeps the
            # backward (and DDP's/DeepSpeed's gradient synchronisation) identical on all
            # ranks; the vote below then skips the step.
            loss = features.sum() * float("nan")
        return loss

    def __call__(self, batches: Iterator[Batch]) -> StepResult:
        """One optimiser step over ``grad_accum`` local batches drawn from ``batches``."""
        device = self.ctx.device
        # What a skipped step must put back: the backbone's BatchNorm statistics, the margin's
        # running state (scalars) and, through its journal, the centre rows a metric loss moves.
        buffers = [b.detach().clone() for b in self.runner.module.buffers()]
        head_buffers = [b.detach().clone() for b in self.head.buffers()]
        journal = getattr(self.metric_loss, "record_updates", None)
        if journal is not None:
            journal()
        losses, local_samples = [], 0
        accuracy = torch.zeros(())
        for micro in range(self.grad_accum):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            last = micro == self.grad_accum - 1
            with self.runner.accumulate(last):
                embeddings = self.runner.forward(images)
                loss = self._loss(embeddings, labels)
                self.runner.backward(loss, self.grad_accum, last)
            losses.append(loss.detach().float())
            # Without the classifier there is no top-1 to report (its rows are never used).
            accuracy = self.head.accuracy if self.use_classifier else torch.tensor(float("nan"))
            local_samples += images.shape[0]

        scale = self.runner.loss_scale
        backbone_ok, grad_norm = self.runner.check_grads(self.clip)
        mean_loss = torch.stack(losses).mean()
        head_ok = self.head_optimizer.grads_finite()
        bad = torch.tensor([0.0 if (backbone_ok and head_ok and bool(torch.isfinite(mean_loss))) else 1.0,
                            float(local_samples)], device=device)
        # Ranks vote: one non-finite rank skips the step everywhere; the same reduce counts samples.
        flags = all_reduce(bad[:1].clone(), "max", self.ctx.group)
        samples = all_reduce(bad[1:].clone(), "sum", self.ctx.group)
        ok = bool(flags.item() == 0.0)
        applied = self.runner.step(apply=ok)
        if ok and applied:
            self.head_optimizer.step(grad_scale=1.0 / scale)
        self.head_optimizer.zero_grad()
        if not (ok and applied):
            with torch.no_grad():
                for b, saved in zip(list(self.runner.module.buffers()) + list(self.head.buffers()),
                                    buffers + head_buffers):
                    b.copy_(saved)
        if journal is not None:
            (self.metric_loss.commit_updates if ok and applied else self.metric_loss.rollback_updates)()
        if grad_norm is None:
            grad_norm = self.runner.grad_norm_after_step()
        return StepResult(loss=float(mean_loss), accuracy=float(accuracy), grad_norm=grad_norm,
                          applied=ok and applied, loss_scale=scale, samples=int(samples.item()))

