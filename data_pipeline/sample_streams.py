"""The undecoded sample stream of one loader worker, for exact and resampled epochs.

A stream is a sequence of shuffle windows (:func:`data_pipeline.epoch_plan.group_spans`).
Each window hands out exactly as many samples as the manifest counts in its spans, in a
permutation seeded by the window's place in the stream: a bad sample gives way to a repeat of
one of the window's good ones. So sample ``s`` of a stream is found from the shard counts
alone, and ``skip`` starts a stream there without opening the shards of the windows before.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .bad_data import SkipLog
from .epoch_plan import (
    Span,
    derive_seed,
    exact_worker_plan,
    group_spans,
    shard_order,
    spans_between,
    window_permutation,
)
from .tar_reader import RawSample, ShardRef, read_span

# Tags keep the random streams of different purposes apart under the same (seed, epoch, ...).
SHUFFLE_TAG, RESAMPLE_TAG = 0x5348, 0x5253


@dataclass(frozen=True)
class Window:
    """Spans read together and handed out in one permutation (``seed``; None: in order)."""

    spans: tuple[Span, ...]
    seed: int | None
    report: bool = True   # False: its bad samples are reported by the worker that owns them

    @property
    def size(self) -> int:
        return sum(s.stop - s.start for s in self.spans)


def _read_spans(shards: list[ShardRef], spans: Iterable[Span], num_classes: int,
                log: SkipLog) -> Iterator[RawSample]:
    for span in spans:
        yield from read_span(shards[span.shard], span.start, span.stop, num_classes, log)


def _filler(shards: list[ShardRef], order: list[int], start: int, num_classes: int
            ) -> Iterator[RawSample]:
    # Samples read again to make up for bad data: their problems were reported by the
    # worker that owns them, so this log is never looked at.
    sizes = [s.num_samples for s in shards]
    total = sum(sizes)
    while True:
        got = 0
        for sample in _read_spans(shards, spans_between(order, sizes, start, start + total),
                                  num_classes, SkipLog(strict=False)):
            got += 1
            yield sample
        if got == 0:
            raise RuntimeError(f"no readable sample in any of the {len(shards)} data shards "
                               f"(first: {shards[0].path}); check the shard directory")


def _window_samples(shards: list[ShardRef], window: Window, num_classes: int, log: SkipLog,
                    refill: Callable[[], Iterator[RawSample]]) -> list[RawSample]:
    good = list(_read_spans(shards, window.spans, num_classes, log))
    if not good:
        # Nothing readable (a missing shard): borrow samples, always the same ones.
        good = list(itertools.islice(refill(), window.size))
    # Repeats keep the window at its manifest count, so that every later sample stays where
    # a resume, which counts, expects it.
    samples = good + [good[k % len(good)] for k in range(window.size - len(good))]
    if window.seed is None:
        return samples
    return [samples[i] for i in window_permutation(len(samples), window.seed)]


def window_stream(shards: list[ShardRef], windows: Iterable[Window], *, skip: int,
                  num_classes: int, log: SkipLog, refill: Callable[[], Iterator[RawSample]]
                  ) -> Iterator[RawSample]:
    """The samples of ``windows`` from the ``skip``-th on; earlier windows are never opened."""
    for window in windows:
        if skip >= window.size:
            skip -= window.size
            continue
        # A window already begun before a resume was reported when it was first read.
        fresh = window.report and skip == 0
        samples = _window_samples(shards, window, num_classes,
                                  log if fresh else SkipLog(strict=False), refill)
        yield from samples[skip:]
        skip = 0


def worker_windows(spans: Iterable[Span], buffer_size: int, seed_parts: tuple[int, ...]
                   ) -> Iterator[Window]:
    """``spans`` as shuffle windows of at least ``buffer_size`` samples (0 or 1: in order)."""
    if buffer_size <= 1:
        for span in spans:
            yield Window((span,), None)
        return
    for k, group in enumerate(group_spans(spans, buffer_size)):
        yield Window(tuple(group), derive_seed(*seed_parts, k, SHUFFLE_TAG))


def exact_stream(shards: list[ShardRef], *, num_classes: int, seed: int, epoch: int, rank: int,
                 world_size: int, batch_size: int, workers: int, worker: int, buffer_size: int,
                 log: SkipLog, skip: int = 0) -> tuple[list[int], Iterator[RawSample]]:
    """The worker's batch indices and its samples from the ``skip``-th on: its shuffled
    share, padding, then filler."""
    sizes = [s.num_samples for s in shards]
    order = shard_order(len(shards), seed, epoch)
    plan = exact_worker_plan(sizes, order, rank=rank, world_size=world_size,
                             batch_size=batch_size, workers=workers, worker=worker)
    windows = itertools.chain(
        worker_windows(plan.real, buffer_size, (seed, epoch, rank, worker)),
        # Padding repeats samples whose problems their owner reports.
        [Window(tuple(plan.padding), None, report=False)] if plan.padding else [])

    def refill() -> Iterator[RawSample]:
        return _filler(shards, order, plan.filler_start, num_classes)

    stream = itertools.chain(
        window_stream(shards, windows, skip=skip, num_classes=num_classes, log=log,
                      refill=refill),
        refill())
    return plan.batches, stream


def resampled_stream(shards: list[ShardRef], *, num_classes: int, seed: int, epoch: int,
                     rank: int, worker: int, buffer_size: int, log: SkipLog, skip: int = 0
                     ) -> Iterator[RawSample]:
    """An endless stream of whole shards drawn with replacement (by size), shuffled in
    windows, from the ``skip``-th sample on."""
    rng = random.Random(derive_seed(seed, epoch, rank, worker, RESAMPLE_TAG))
    weights = [s.num_samples for s in shards]

    def draws() -> Iterator[Span]:
        # The draws depend on the seeds only, so skipped windows are drawn but never read.
        while True:
            shard = rng.choices(range(len(shards)), weights=weights)[0]
            yield Span(shard, 0, shards[shard].num_samples)

    def refill() -> Iterator[RawSample]:
        return _filler(shards, list(range(len(shards))), 0, num_classes)

    return window_stream(shards, worker_windows(draws(), buffer_size, (seed, epoch, rank, worker)),
                         skip=skip, num_classes=num_classes, log=log, refill=refill)
