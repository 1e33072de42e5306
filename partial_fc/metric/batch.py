"""The global batch as the metric losses see it, its input checks, and how shares are added up.

Every metric loss gathers the features of all ranks (with gradient) and the labels (without),
computes the share of the global loss that belongs to this rank (its anchors, or the
classes whose centres it holds), and adds the shares up with one all-reduce of a detached
copy.  The value is then the global loss on every rank, while the backward of the share,
through :func:`partial_fc.comm.all_gather_with_grad`, gives each rank's local features
W × the single-process gradient of their rows (see ``partial_fc.comm``).

Input checks are collective: every rank learns about a bad input of any rank and raises
with it, so one rank's bad batch never leaves the others waiting in a collective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..checks import check_global_batch, check_mode
from ..comm import ProcessGroup, all_reduce, gather_batch, rank_and_world

# Codes of the local structural problems that one rank reports to all the others.
_OK, _BAD_EMBEDDING_SHAPE, _BAD_LABEL_SHAPE, _BAD_LABEL_DTYPE, _BAD_WIDTH = range(5)


@dataclass
class GlobalBatch:
    """This rank's view of the global batch (``N`` rows, in rank order)."""

    features: torch.Tensor
    """[N, D] features of every rank in the compute dtype (gradient flows to local rows)."""
    labels: torch.Tensor
    """[N] int64 labels of every rank."""
    offset: int
    """Global index of this rank's first row."""
    num_local: int
    """Number of this rank's rows (its local batch size)."""
    sizes: list[int]
    """Local batch size of every rank."""

    @property
    def local_rows(self) -> slice:
        """This rank's rows of the global batch."""
        return slice(self.offset, self.offset + self.num_local)


def without_autocast(device: torch.device) -> torch.autocast:
    """A context that turns autocast off: the losses compute in float32 (or float64) throughout.

    Under bf16/fp16 autocast, matmuls would otherwise run in half precision, too coarse for
    distance mining and for exponents scaled by γ = 256.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision features, the features' own dtype otherwise (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _local_problem(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: Optional[int]) -> tuple[int, str]:
    if embeddings.dim() != 2:
        return _BAD_EMBEDDING_SHAPE, (f"embeddings have shape {tuple(embeddings.shape)}, expected "
                                      "[batch, embedding_size]")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        return _BAD_WIDTH, (f"embeddings have width {embeddings.shape[1]}, expected embedding_size="
                            f"{embedding_size}: is the loss built with the backbone's embedding size?")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        return _BAD_LABEL_SHAPE, (f"labels have shape {tuple(labels.shape)}, expected [{embeddings.shape[0]}] "
                                  "(one label per embedding)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        return _BAD_LABEL_DTYPE, f"labels must be integer class ids, got dtype {labels.dtype}"
    if not torch.is_floating_point(embeddings):
        return _BAD_EMBEDDING_SHAPE, f"embeddings must be floating point, got dtype {embeddings.dtype}"
    return _OK, ""


def _shapes(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: Optional[int],
            group: ProcessGroup) -> list[int]:
    """Every rank's local batch size, after every rank's structural checks passed."""
    code, message = _local_problem(embeddings, labels, embedding_size)
    rank, world = rank_and_world(group)
    n = embeddings.shape[0] if embeddings.dim() >= 1 else 0
    width = embeddings.shape[1] if embeddings.dim() == 2 else -1
    if world == 1:
        if code != _OK:
            raise ValueError(message)
        return [n]
    # One collective carries the sizes, the widths and the verdicts of all ranks.
    mine = torch.tensor([n, width, code], dtype=torch.long, device=embeddings.device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    if code != _OK:
        raise ValueError(f"rank {rank}: {message}")
    for other, (_, _, other_code) in enumerate(table):
        if other_code != _OK:
            raise ValueError(f"rank {other} passed a bad batch to the metric loss (its error says which); "
                             "every rank stops with it")
    widths = sorted({w for _, w, _ in table})
    if len(widths) > 1:
        listed = ", ".join(f"rank {r}: {w}" for r, (_, w, _) in enumerate(table))
        raise ValueError(f"ranks pass embeddings of different widths ({listed}): every rank must run the "
                         "same backbone")
    return [s for s, _, _ in table]


def gather_global_batch(local_embeddings: torch.Tensor, local_labels: torch.Tensor, group: ProcessGroup,
                        embedding_size: Optional[int] = None, num_classes: Optional[int] = None,
                        check_inputs=True, sizes: Optional[Sequence[int]] = None) -> GlobalBatch:
    """Check the local batches of all ranks and gather them into the global batch.

    ``embedding_size``/``num_classes`` (when known) bound the width and the labels;
    ``check_inputs`` (strict/True, off/False; deferred is checked as strict here) adds the
    label range and finiteness checks (one host sync).  ``sizes``: every rank's local batch
    size when the caller knows them (the training step); the structural checks are then
    local and no sizes are exchanged.  Features and labels travel in one all-gather
    (:func:`partial_fc.comm.gather_batch`).
    """
    if sizes is None:
        sizes = _shapes(local_embeddings, local_labels, embedding_size, group)
    else:
        code, message = _local_problem(local_embeddings, local_labels, embedding_size)
        if code != _OK:
            raise ValueError(message)
        sizes = [int(n) for n in sizes]
    rank, _ = rank_and_world(group)
    features, labels = gather_batch(local_embeddings, local_labels, group, sizes)
    features = features.to(compute_dtype(features.dtype))
    batch = GlobalBatch(features=features, labels=labels, offset=sum(sizes[:rank]),
                        num_local=sizes[rank], sizes=sizes)
    if check_mode(check_inputs) != "off":
        check_global_batch(batch.features.detach(), batch.labels, batch.sizes, num_classes)
    return batch


def pair_masks(batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, N] positive mask without self-pairs, [n, N] negative mask) of local anchors × global batch."""
    local = batch.labels[batch.local_rows]
    same = local[:, None] == batch.labels[None, :]
    not_self = torch.ones_like(same)
    idx = torch.arange(batch.num_local, device=same.device)
    not_self[idx, idx + batch.offset] = False
    return same & not_self, ~same


def add_shares(local_sum: torch.Tensor, local_count: torch.Tensor,
               group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, global count): the global mean Σ sums / Σ counts, identical on every rank.

    The backward of the returned loss is that of this rank's share ``local_sum / global
    count``; the other ranks' shares enter as a constant.
    """
    both = torch.stack([local_sum.detach(), local_count.to(local_sum.dtype)])
    total_sum, total_count = all_reduce(both, "sum", group).unbind()
    denom = total_count.clamp_min(1.0)
    share = local_sum / denom
    # total + (share − share) rather than share + (total − share): the value is then the
    # all-reduced total to the last bit, the same on every rank.
    return (total_sum / denom) + (share - share.detach()), total_count.round().long()
