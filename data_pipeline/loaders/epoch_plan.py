"""Which samples each rank and loader worker reads in an epoch, and the seeds for its randomness.

Exact mode puts the data shards in a per-epoch order (shared by all ranks) and treats them as
one concatenated sequence of ``N`` sample positions. Rank ``r`` owns positions
``[N*r//R, N*(r+1)//R)``; its batches ``0..L-1`` (``L`` equal on every rank) are filled in
order with its samples, so only the last batch can hold padding: the ``L*B - n_r`` repeats
of the rank's first samples. Batch ``j`` belongs to worker ``j % K`` (the order in which a
DataLoader collects from its workers), and each worker reads the contiguous piece of the
rank's positions that its batches need.

Shuffling works on *windows*: a worker's spans grouped so that each window holds at least
``min_size`` samples (a span that large is a window by itself). A window's samples come out
in a seeded permutation of their own, so where sample ``s`` of a worker's stream lies follows
from the shard counts alone: a resume skips the windows before it without opening them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, rank, ...): equal parts give equal seeds."""
    words = [int(p) & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Span:
    """Positions ``[start, stop)`` of data shard ``shard`` (an index into the manifest's list)."""

    shard: int
    start: int
    stop: int


def even_split(n: int, parts: int, i: int) -> tuple[int, int]:
    """The ``i``-th of ``parts`` contiguous, near-equal pieces of ``range(n)``, as (start, stop)."""
    return n * i // parts, n * (i + 1) // parts


def exact_batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch in exact mode: enough for the largest rank's samples."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def resampled_batches_per_rank(epoch_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch in resampled mode."""
    return math.ceil(epoch_samples / (world_size * batch_size))


def batches_per_rank(mode: str, num_samples: int, world_size: int, batch_size: int,
                     epoch_samples: int | None = None) -> int:
    """Batches per rank per epoch: every sample once (``exact``) or ``epoch_samples`` draws (``resampled``)."""
    if mode == "exact":
        return exact_batches_per_rank(num_samples, world_size, batch_size)
    return resampled_batches_per_rank(epoch_samples or num_samples, world_size, batch_size)


def worker_batches(num_batches: int, workers: int, worker: int) -> list[int]:
    """The rank's batch indices that worker ``worker`` of ``workers`` produces."""
    return list(range(worker, num_batches, workers))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The per-epoch order of the data shards, the same on every rank."""
    rng = np.random.default_rng(derive_seed(seed, epoch, 0x5A4D))
    return [int(i) for i in rng.permutation(num_shards)]


def spans_between(order: list[int], sizes: list[int], start: int, stop: int) -> list[Span]:
    """Positions ``[start, stop)`` of the shards concatenated in ``order``, wrapping around."""
    total = sum(sizes)
    spans: list[Span] = []
    if total == 0 or stop <= start:
        return spans
    offsets = np.cumsum([0] + [sizes[i] for i in order])
    pos = start
    while pos < stop:
        at = pos % total
        k = int(np.searchsorted(offsets, at, side="right")) - 1
        shard = order[k]
        lo = at - int(offsets[k])
        take = min(sizes[shard] - lo, stop - pos)
        spans.append(Span(shard, lo, lo + take))
        pos += take
    return spans


@dataclass(frozen=True)
class ExactWorkerPlan:
    """What one worker of one rank reads in an exact epoch."""

    batches: list[int]        # the rank's batch indices this worker produces, ascending
    real: list[Span]          # its share of the rank's samples (shuffled by the worker)
    padding: list[Span]       # repeats appended after them (only for the last batch's worker)
    filler_start: int         # global position to read on from if bad data leaves it short
    num_samples: int          # total positions in the epoch order


def exact_worker_plan(sizes: list[int], order: list[int], *, rank: int, world_size: int,
                      batch_size: int, workers: int, worker: int) -> ExactWorkerPlan:
    """The exact-epoch plan of ``worker`` on ``rank`` (see the module docstring)."""
    n = sum(sizes)
    num_batches = exact_batches_per_rank(n, world_size, batch_size)
    rank_start, rank_stop = even_split(n, world_size, rank)
    n_rank = rank_stop - rank_start

    def real_in(j: int) -> int:
        return max(0, min(batch_size, n_rank - j * batch_size))

    pos = rank_start
    mine: tuple[int, int] = (pos, pos)
    for w in range(workers):
        count = sum(real_in(j) for j in worker_batches(num_batches, workers, w))
        if w == worker:
            mine = (pos, pos + count)
        pos += count
    batches = worker_batches(num_batches, workers, worker)
    pad = num_batches * batch_size - n_rank if batches and batches[-1] == num_batches - 1 else 0
    return ExactWorkerPlan(
        batches=batches,
        real=spans_between(order, sizes, *mine),
        padding=spans_between(order, sizes, rank_start, rank_start + pad),
        filler_start=rank_start + pad,
        num_samples=n,
    )


def last_batch_padding(num_samples: int, world_size: int, batch_size: int, rank: int) -> int:
    """How many trailing samples of the rank's last exact-mode batch repeat earlier ones."""
    start, stop = even_split(num_samples, world_size, rank)
    return exact_batches_per_rank(num_samples, world_size, batch_size) * batch_size - (stop - start)


def group_spans(spans: Iterable[Span], min_size: int) -> Iterator[list[Span]]:
    """``spans`` (possibly endless) grouped into shuffle windows of at least ``min_size`` samples.

    A span of ``min_size`` or more is a window by itself, so that with shards of at least that
    size a window never reaches into a second shard; smaller spans (small shards, or the
    pieces of a shard at the ends of a worker's share) are gathered until they reach it. A
    group still short when a large span or the end comes stays a window as it is.
    """
    group: list[Span] = []
    size = 0
    for span in spans:
        n = span.stop - span.start
        if group and (n >= min_size or size >= min_size):
            yield group
            group, size = [], 0
        group.append(span)
        size += n
    if group:
        yield group


def window_permutation(size: int, seed: int) -> list[int]:
    """The order in which a shuffle window of ``size`` samples is handed out."""
    return [int(i) for i in np.random.default_rng(seed).permutation(size)]
