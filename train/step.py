"""One optimiser step: micro-steps of forward/backward, the finiteness vote, both optimisers.

A step whose loss or gradients are not finite on any rank is skipped by every rank: no
optimiser moves, the BatchNorm statistics of its forwards, the margin's running state and
the centres of a center loss are rolled back, and under fp16 the loss scale is backed off.
The caller counts skipped steps and stops the run after too many in a row.

Host reads: a step reads the device once (DDP, fp32/bf16, ``grad_accum`` 1, deferred or
no input checks): one all-reduce carries the vote and the sample count, and the reduced
vote travels to the host together with the loss, the gradient norm, the accuracy (logging
steps only) and the deferred input-check flags.  Deciding on the host whether to apply the
optimisers costs that one read; the alternative, masking every update on the device,
would need every optimiser (torch's, DeepSpeed's, the GradScaler) to take a device-side
condition and would still advance their step counters.  See docs/performance.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from partial_fc.checks import raise_from_report
from partial_fc.comm import all_reduce

from .distributed import DistContext
from .parallel import BackboneRunner, DDPRunner

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """What one optimiser step did."""

    loss: float
    """Global-batch loss, averaged over the micro-steps (NaN when not finite)."""
    accuracy: float
    """Top-1 accuracy of the classifier on the last micro-step's global batch, ranked by the loss's
    logits (margin included) over the classes sampled in the step (all at sample_rate 1); NaN
    when it is not trained, and on steps that do not log."""
    grad_norm: Optional[float]
    """Backbone gradient norm before clipping (None when not measured)."""
    applied: bool
    """False when the step was skipped (non-finite loss or gradient)."""
    loss_scale: float
    """Loss scale used by the step's backward (1 without fp16)."""
    samples: int
    """Samples of the global batch over all micro-steps."""
    stop: bool = False
    """Some rank asked to stop after this step (a preemption signal), agreed by the step's vote."""


class TrainStep:
    """Runs optimiser steps of backbone (data-parallel) and classifier shard (model-parallel)."""

    def __init__(self, runner: BackboneRunner, head: nn.Module, head_optimizer: torch.optim.Optimizer,
                 ctx: DistContext, grad_accum: int = 1, clip_grad_norm: float = 0.0,
                 metric_loss: Optional[nn.Module] = None, metric_weight: float = 0.0,
                 channels_last: bool = False, use_classifier: bool = True, equal_batches: bool = False):
        if not use_classifier and metric_loss is None:
            raise ValueError("use_classifier=False needs a metric_loss: without either there is nothing to train")
        self.runner, self.head, self.head_optimizer, self.ctx = runner, head, head_optimizer, ctx
        self.grad_accum, self.clip = grad_accum, clip_grad_norm
        self.metric_loss, self.metric_weight = metric_loss, metric_weight
        self.channels_last = channels_last
        self.use_classifier = use_classifier
        # The loader announces that every rank's batch has the same size (its last batch
        # padded): no sizes are exchanged.  A batch may still announce its own per-rank sizes
        # as a third element; otherwise (an unknown loader) the losses exchange them.
        self.equal_batches = equal_batches

    def _sizes(self, n: int, announced: Optional[Sequence[int]]) -> Optional[list[int]]:
        if announced is not None:
            return [int(s) for s in announced]
        if self.equal_batches:
            return [n] * self.ctx.world_size
        return None

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor, sizes: Optional[list[int]],
              accuracy: bool) -> torch.Tensor:
        from partial_fc import NonFiniteEmbeddingError
        features = embeddings.float()
        try:
            loss = self.head(features, labels, sizes=sizes, accuracy=accuracy) if self.use_classifier else None
            if self.metric_loss is not None:
                metric = self.metric_weight * self.metric_loss(features, labels, sizes=sizes)
                loss = metric if loss is None else loss + metric
        except NonFiniteEmbeddingError:
            # Every rank raises together.  A NaN loss tied to the backbone's graph keeps the
            # backward (and DDP's/DeepSpeed's gradient synchronisation) identical on all
            # ranks; the vote below then skips the step.
            loss = features.sum() * float("nan")
        return loss

    def _backbone_norm(self) -> Optional[torch.Tensor]:
        """Backbone gradient norm (clipping when configured) as a device tensor, no host read.

        DDP (and the bare module): unscale under fp16, then the norm on the device.  Other
        runners (DeepSpeed) measure it themselves, with their own host reads.
        """
        runner = self.runner
        if not isinstance(runner, DDPRunner):
            ok, value = runner.check_grads(self.clip)
            if value is None:
                return None if ok else torch.full((), math.nan, device=self.ctx.device)
            return torch.tensor(value if ok else math.nan, device=self.ctx.device)
        if runner.scaler.is_enabled():
            runner.scaler.unscale_(runner.optimizer)
        params = [p for g in runner.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.ctx.device)
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        if self.clip > 0 or total_norm is None:
            return torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip > 0 else math.inf)
        return total_norm([p.grad for p in params])

    def _head_finite(self) -> torch.Tensor:
        """True (a device tensor) when the classifier's row gradients are finite."""
        finite = getattr(self.head, "row_grads_finite", None)
        if finite is not None:  # PartialFC: checks without completing a deferred row correction
            return finite()
        row_grads = getattr(self.head, "row_grads", None)
        if row_grads is None:
            return torch.tensor(bool(self.head_optimizer.grads_finite()), device=self.ctx.device)
        _, w, b = row_grads()
        ok = torch.ones((), dtype=torch.bool, device=self.ctx.device)
        for g in (w, b):
            if g is not None:
                ok = ok & torch.isfinite(g).all()
        return ok

    def __call__(self, batches: Iterator[Batch], log: bool = True, step: Optional[int] = None,
                 stop_requested: bool = False) -> StepResult:
        """One optimiser step over ``grad_accum`` local batches drawn from ``batches``.

        ``log``: this step's metrics are logged; otherwise the accuracy is not computed.
        ``step``: the step's number, for the deferred input-check error.
        ``stop_requested``: this rank was asked to stop (a preemption signal); the vote tells
        every rank, so all stop after the same step without a collective of their own.
        """
        device = self.ctx.device
        # What a skipped step must put back: the backbone's BatchNorm statistics, the margin's
        # running state (scalars) and, through its journal, the centre rows a metric loss moves.
        buffers = [b.detach().clone() for b in self.runner.module.buffers()]
        head_buffers = [b.detach().clone() for b in self.head.buffers()]
        journal = getattr(self.metric_loss, "record_updates", None)
        if journal is not None:
            journal()
        losses, local_samples = [], 0
        accuracy = torch.full((), math.nan, device=device)
        for micro in range(self.grad_accum):
            batch = next(batches)
            images, labels = batch[0], batch[1]
            sizes = self._sizes(images.shape[0], batch[2] if len(batch) > 2 else None)
            images = images.to(device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            last = micro == self.grad_accum - 1
            with self.runner.accumulate(last):
                embeddings = self.runner.forward(images)
                loss = self._loss(embeddings, labels, sizes, accuracy=log and last)
                self.runner.backward(loss, self.grad_accum, last)
            losses.append(loss.detach().float())
            # Without the classifier there is no top-1 to report (its rows are never used).
            if self.use_classifier and log and last:
                accuracy = self.head.accuracy
            local_samples += images.shape[0]

        scale = self.runner.loss_scale  # a host read under fp16 only (the GradScaler's scale)
        norm = self._backbone_norm()
        mean_loss = torch.stack(losses).mean()
        finite = torch.isfinite(mean_loss) & self._head_finite()
        if norm is not None:
            finite = finite & torch.isfinite(norm)
        # Ranks vote: one non-finite rank skips the step everywhere; the same SUM counts samples.
        # (torch.full, not torch.tensor: a Python number copied to a GPU waits for the copy.)
        vote = torch.stack([(~finite).to(torch.float64),
                            torch.full((), float(local_samples), dtype=torch.float64, device=device),
                            torch.full((), float(stop_requested), dtype=torch.float64, device=device)])
        all_reduce(vote, "sum", self.ctx.group)
        # Deferred input checks describe the gathered global batch, the same on every rank:
        # they need no reduction and ride to the host with the vote.
        reports = self.head.take_input_reports() if hasattr(self.head, "take_input_reports") else []
        nan = torch.full((1,), math.nan, dtype=torch.float64, device=device)
        packed = torch.cat([vote, mean_loss.double().view(1), nan if norm is None else norm.double().view(1),
                            accuracy.double().view(1).to(device)] + [r.double() for r, _ in reports])
        # The step's one host read: the vote decides on the host whether the optimisers step.
        values = packed.tolist()
        bad, samples, stop, loss_value, norm_value, accuracy_value = values[:6]
        input_error = None
        for i, (_, sizes) in enumerate(reports):
            first_bad = values[6 + 3 * i]
            if first_bad < sum(sizes):
                input_error = (values[6 + 3 * i: 9 + 3 * i], sizes)
                break
        ok = bad == 0.0 and input_error is None
        applied = self.runner.step(apply=ok)
        if ok and applied:
            self.head_optimizer.step(grad_scale=1.0 / scale)
        self.head_optimizer.zero_grad()
        if not (ok and applied):
            with torch.no_grad():
                for b, saved in zip(list(self.runner.module.buffers()) + list(self.head.buffers()),
                                    buffers + head_buffers):
                    b.copy_(saved)
        if journal is not None and self.metric_loss is not None:
            (self.metric_loss.commit_updates if ok and applied else self.metric_loss.rollback_updates)()
        if input_error is not None:
            report, sizes = input_error
            where = f"step {step}" if step is not None else "this step"
            raise_from_report(report, sum(sizes), sizes, getattr(self.head, "num_classes", None), where)
        grad_norm = None if norm is None else norm_value
        if grad_norm is None:
            grad_norm = self.runner.grad_norm_after_step()
        return StepResult(loss=loss_value, accuracy=accuracy_value, grad_norm=grad_norm,
                          applied=ok and applied, loss_scale=scale, samples=int(round(samples)),
                          stop=stop > 0.0)
