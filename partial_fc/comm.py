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
    """Local batch size of every rank, in rank order (one all-gather and one host read).

    Only for callers that cannot know the sizes: the training step passes them (equal
    batches, as its loader announces) and never pays for this exchange.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return [n_local]
    size = torch.tensor([n_local], dtype=torch.long, device=device)
    sizes = torch.empty(world, dtype=torch.long, device=device)
    _all_gather_single(sizes, size, group)
    return [int(s) for s in sizes.tolist()]  # host read: the sizes decide the buffer shapes


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group: ProcessGroup) -> None:
    # torch >= 2.10 names all_gather_into_tensor all_gather_single (the old name warns).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _reduce_scatter_single(out: torch.Tensor, x: torch.Tensor, group: ProcessGroup) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, group=group)


def _uses_gloo(group: ProcessGroup) -> bool:
    return dist.get_backend(group) == "gloo"


def _gather_rows(x: torch.Tensor, sizes: Sequence[int], group: ProcessGroup) -> torch.Tensor:
    """All-gather rows in one single-tensor all-gather; padded to the largest only when uneven."""
    rows = max(sizes)
    if x.shape[0] != rows:
        padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        x = padded
    out = x.new_empty((len(sizes) * rows,) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group)
    if all(n == rows for n in sizes):
        return out
    return torch.cat([out[r * rows: r * rows + n] for r, n in enumerate(sizes)], dim=0)


def _scatter_sum(grad: torch.Tensor, sizes: Sequence[int], rank: int, group: ProcessGroup) -> torch.Tensor:
    """Sum over ranks of every rank's gradient of my rows: one reduce-scatter (one all-reduce on gloo)."""
    rows = max(sizes)
    if any(n != rows for n in sizes):
        padded = grad.new_zeros((len(sizes) * rows,) + tuple(grad.shape[1:]))
        offset = 0
        for r, n in enumerate(sizes):
            padded[r * rows: r * rows + n] = grad[offset: offset + n]
            offset += n
        grad = padded
    grad = grad.contiguous()
    if _uses_gloo(group):
        # gloo has no reduce-scatter for every device (none for CUDA tensors): an all-reduce
        # of the stacked parts gives the same sums, and this rank keeps its own part.
        dist.all_reduce(grad, group=group)
        return grad[rank * rows: rank * rows + sizes[rank]]
    out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
    _reduce_scatter_single(out, grad, group)
    return out[: sizes[rank]]


def _resolve_sizes(n_local: int, device: torch.device, group: ProcessGroup,
                   sizes: Optional[Sequence[int]]) -> tuple[int, ...]:
    if sizes is None:
        return tuple(gather_sizes(n_local, device, group))
    sizes = tuple(int(s) for s in sizes)
    rank, world = rank_and_world(group)
    if len(sizes) != world or sizes[rank] != n_local:
        raise ValueError(f"sizes={list(sizes)} do not describe this batch: expected {world} local batch sizes "
                         f"with {n_local} at rank {rank}")
    return sizes


def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup = None,
                       sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows (labels, norms): the global batch, no gradient.

    ``sizes``: every rank's row count when the caller knows it (no size exchange then).
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = _resolve_sizes(x.shape[0], x.device, group, sizes)
    return _gather_rows(x.detach(), sizes, group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather rows of all ranks; backward: sum every rank's gradient of my rows, times W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's shard of the loss sent gradient to every global row; the reduce-scatter
        # adds them up so that each rank receives the total for its own rows.
        mine = _scatter_sum(grad, ctx.sizes, ctx.rank, ctx.group)
        return mine * len(ctx.sizes), None, None


def all_gather_with_grad(x: torch.Tensor, group: ProcessGroup = None,
                         sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows, keeping the gradient path to this rank's rows.

    Ranks may hold different numbers of rows (the last batch of an epoch); ``sizes`` gives
    them when known, otherwise they are exchanged first.  See the module docstring for why
    the backward multiplies by the world size.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    sizes = _resolve_sizes(x.shape[0], x.device, group, sizes)
    return _AllGatherWithGrad.apply(x, sizes, group)


def _label_columns(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Labels reinterpreted (bits, not values) as columns of ``dtype``, to travel with the features."""
    label_dtype = torch.int64 if torch.empty((), dtype=dtype).element_size() == 8 else torch.int32
    return labels.detach().to(label_dtype).unsqueeze(1).view(dtype)


def gather_batch(features: torch.Tensor, labels: torch.Tensor, group: ProcessGroup = None,
                 sizes: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(global features with gradient to the local rows, global int64 labels) in one all-gather.

    The labels' bits ride as extra columns of the features (an int32 label is one float32
    column), so the forward is a single ``all_gather_into_tensor`` and the backward a single
    reduce-scatter.  ``sizes`` as in :func:`all_gather_with_grad`.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return features, labels.long()
    width = features.shape[1]
    columns = _label_columns(labels, features.dtype)
    packed = all_gather_with_grad(torch.cat([features, columns], dim=1), group, sizes)
    label_dtype = torch.int64 if features.element_size() == 8 else torch.int32
    global_labels = packed[:, width:].detach().contiguous().view(label_dtype).squeeze(1).long()
    return packed[:, :width], global_labels
