"""Collectives used by the sharded classifier and the metric losses.

Vocabulary used across the project: *rank* and *world size* are those of the process
group passed in (``group=None`` means the default group when torch.distributed is
initialised, and a single process otherwise); the *local batch* is this rank's samples,
the *global batch* the concatenation of every rank's local batch in rank order.

Gradient convention: every loss term is written as this rank's *share* of the global
loss (the shares add up to the global loss over ranks).  The backward of
:func:`all_gather_with_grad` sums the gradients that all ranks' shares send to a rank's
rows and multiplies them by the world size, because data-parallel training (DDP,
DeepSpeed) *averages* backbone gradients over ranks; the average then equals the exact
gradient of the global loss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when torch.distributed is initialised (the group then has a meaning)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: ProcessGroup = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without torch.distributed."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup = None) -> torch.Tensor:
    """In-place all-reduce (``op`` in sum/max/min); a no-op in a single process."""
    if is_distributed(group) and dist.get_world_size(group) > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def gather_sizes(n_local: int, device: torch.device, group: ProcessGroup = None) -> list[int]:
    """Local batch size of every rank, in rank order."""
    _, world = rank_and_world(group)
    if world == 1:
        return [n_local]
    size = torch.tensor([n_local], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup) -> torch.Tensor:
    """All-gather rows of unequal counts: pad to the largest, gather, strip the padding."""
    rows = max(sizes)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup = None,
                       sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows (labels, norms): the global batch, no gradient."""
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = list(sizes) if sizes is not None else gather_sizes(x.shape[0], x.device, group)
    return _gather_padded(x.detach(), sizes, group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather rows of all ranks; backward: sum every rank's gradient of my rows, times W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, group, rank = ctx.sizes, ctx.group, ctx.rank
        grad = grad.contiguous()
        rows = max(sizes)
        # Each rank's shard of the loss sent gradient to every global row; reduce-scatter
        # adds them up so that each rank receives the total for its own rows.
        parts = []
        offset = 0
        for n in sizes:
            part = grad.new_zeros((rows,) + tuple(grad.shape[1:]))
            part[:n] = grad[offset: offset + n]
            parts.append(part)
            offset += n
        out = torch.empty_like(parts[0])
        if grad.device.type == "cpu" and dist.get_backend(group) == "gloo":
            # gloo has no reduce_scatter: an all-reduce of the stacked parts does the same.
            stacked = torch.stack(parts)
            dist.all_reduce(stacked, group=group)
            out = stacked[rank]
        else:
            dist.reduce_scatter(out, parts, group=group)
        return out[: sizes[rank]] * len(sizes), None, None


def all_gather_with_grad(x: torch.Tensor, group: ProcessGroup = None,
                         sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows, keeping the gradient path to this rank's rows.

    Ranks may hold different numbers of rows (the last batch of an epoch).  See the module
    docstring for why the backward multiplies by the world size.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = tuple(sizes) if sizes is not None else tuple(gather_sizes(x.shape[0], x.device, group))
    return _AllGatherWithGrad.apply(x, sizes, group)
