"""Small pieces shared by the backbones: input checks, stride arithmetic, checkpointed block runs."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def strided_size(size: int, num_strides: int) -> int:
    """Side length after ``num_strides`` stride-2 convolutions with kernel 3 and padding 1."""
    for _ in range(num_strides):
        size = (size + 1) // 2
    return size


def check_input_size(input_size: int, minimum: int, multiple_of: int = 1) -> None:
    """Reject an input side the backbone cannot be built for, naming the value and the fix."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < minimum:
        raise ValueError(f"input_size={input_size!r} is too small or not an integer: use at least {minimum} "
                         f"(112 for aligned faces, 56 for the CPU variants)")
    if input_size % multiple_of:
        raise ValueError(f"input_size={input_size} is not a multiple of {multiple_of} (the patch size): "
                         f"use e.g. 112 or 56")


def check_dropout(dropout: float) -> float:
    """Validate a dropout probability."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout!r} is outside [0, 1): use e.g. 0.0 or 0.4")
    return float(dropout)


def check_images(x: torch.Tensor, input_size: int, model: str) -> None:
    """Fail with a clear message when a batch is not ``[B, 3, input_size, input_size]``."""
    if torch.jit.is_tracing():  # the ONNX exporter traces with a valid example; the check is eager-only
        return
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(f"{model} was built for images [B, 3, {input_size}, {input_size}] but got "
                         f"{list(x.shape)}: resize the images or build it with input_size={x.shape[-1]}")


def init_conv_bn(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorms at identity: the IResNet family's initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _once_per_step(block: nn.Module):
    """``block`` as a function whose repeated calls (checkpoint's recomputation) leave the
    BatchNorm running statistics as the first call left them.

    The recomputation runs the block in train mode again: without this, every BatchNorm
    would fold the batch into its running mean and variance twice per step (and count it
    twice).  The outputs are unchanged either way (train mode normalises by the batch).
    """
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.training]
    calls = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1 or not norms:
            return block(x)
        saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
        try:
            return block(x)
        finally:  # also when the recomputation stops early (torch stops once it has what it needs)
            with torch.no_grad():
                for m, state in zip(norms, saved):
                    for b, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), state):
                        b.copy_(value)
    return run


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Apply blocks in order; with ``checkpointing`` (and gradients on) recompute each in backward.

    The recomputation does not update BatchNorm running statistics a second time.
    """
    recompute = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        # Non-reentrant checkpointing keeps gradients flowing to inputs that do not require grad.
        x = checkpoint(_once_per_step(block), x, use_reentrant=False) if recompute else block(x)
    return x
