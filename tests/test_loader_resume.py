"""Resume without replay (windowed shuffle) and loader workers that live across epochs."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import tar_reader
from data_pipeline.bad_data import MISSING_CLS, SkipLog
from data_pipeline.epoch_plan import Span, exact_worker_plan, group_spans, shard_order
from data_pipeline.loaders import build_loader
from data_pipeline.sample_streams import exact_stream, resampled_stream
from data_pipeline.tar_reader import shard_refs
from shard_helpers import write_dataset


@pytest.fixture
def opens(monkeypatch, tmp_path):
    """Every shard open, as ``(pid, shard name)``, from this process and forked workers."""
    path = tmp_path / "opens.log"
    real = tar_reader.open_shard

    def counting(shard):
        with open(path, "a") as f:  # one short append per line: atomic between processes
            f.write(f"{os.getpid()} {shard.name}\n")
        return real(shard)

    monkeypatch.setattr(tar_reader, "open_shard", counting)

    def read(clear=True):
        lines = path.read_text().split() if path.exists() else []
        if clear:
            path.unlink(missing_ok=True)
        return [(int(lines[k]), lines[k + 1]) for k in range(0, len(lines), 2)]
    return read


def batches_of(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_group_spans_keeps_large_spans_alone_and_gathers_small_ones():
    spans = [Span(0, 2, 10), Span(1, 0, 3), Span(2, 0, 3), Span(3, 0, 4), Span(4, 0, 9), Span(5, 0, 1)]
    groups = [[s.shard for s in g] for g in group_spans(spans, 5)]
    # 8 alone; 3+3 reach 5; 4 is cut short by the large 9, which is alone; the tail stays.
    assert groups == [[0], [1, 2], [3], [4], [5]]
    assert [[s.shard for s in g] for g in group_spans(spans, 1)] == [[k] for k in range(6)]


def test_windows_shuffle_within_and_across_small_shards(tmp_path):
    # Label of sample i is i.
    shards = shard_refs(write_dataset(tmp_path, [3] * 6))
    kw = dict(num_classes=18, seed=2, epoch=0, rank=0, world_size=1, batch_size=18, workers=1,
              worker=0, log=SkipLog(True))
    _, stream = exact_stream(shards, buffer_size=9, **kw)
    labels = [next(stream).label for _ in range(18)]
    _, plain = exact_stream(shards, buffer_size=0, **kw)
    in_order = [next(plain).label for _ in range(18)]
    assert sorted(labels) == list(range(18))
    # Windows of three shards: each window holds the same samples as the unshuffled order's
    # nine, permuted, so samples of different shards mix.
    for w in range(2):
        window = labels[9 * w:9 * w + 9]
        assert sorted(window) == sorted(in_order[9 * w:9 * w + 9]) and window != in_order[9 * w:9 * w + 9]
        assert len({label // 3 for label in window[:3]}) > 1 or len({label // 3 for label in window[3:6]}) > 1


def _exact_windows(sizes, seed, epoch, rank, world, batch, workers, worker, buffer):
    """The worker's windows as lists of shard indices with their sample counts (from the plan)."""
    plan = exact_worker_plan(sizes, shard_order(len(sizes), seed, epoch), rank=rank, world_size=world,
                             batch_size=batch, workers=workers, worker=worker)
    windows = [(g, sum(s.stop - s.start for s in g)) for g in group_spans(plan.real, buffer)]
    if plan.padding:
        windows.append((plan.padding, sum(s.stop - s.start for s in plan.padding)))
    return [([s.shard for s in g], n) for g, n in windows]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_stream_resume_opens_only_the_windows_of_the_next_batch(tmp_path, opens, mode):
    sizes = [9, 8, 12, 8, 9, 10, 11, 9]  # every shard holds at least a window's worth
    m = write_dataset(tmp_path, sizes)
    shards = shard_refs(m)
    batch, buffer, world, workers, seed, epoch = 3, 8, 2, 2, 4, 1
    checked = one_shard = 0
    for rank in range(world):
        for worker in range(workers):
            common = dict(num_classes=m.num_classes, seed=seed, epoch=epoch, rank=rank, worker=worker,
                          buffer_size=buffer, log=SkipLog(True))
            shape = dict(world_size=world, batch_size=batch, workers=workers)

            def stream(skip, common=common, shape=shape):
                if mode == "exact":
                    return exact_stream(shards, skip=skip, **common, **shape)[1]
                return resampled_stream(shards, skip=skip, **common)

            # The worker's own samples: its batches' worth.
            count = batch * len(exact_stream(shards, **common, **shape)[0])
            whole = stream(0)
            reference = [next(whole) for _ in range(count)]
            windows = _exact_windows(sizes, seed, epoch, rank, world, batch, workers, worker, buffer)
            opens()
            for skip in range(0, count, batch):
                it = stream(skip)  # a fresh stream per resume point
                got = [next(it) for _ in range(batch)]
                opened = [name for _, name in opens()]
                assert [(s.key, s.label) for s in got] == [(s.key, s.label) for s in reference[skip:skip + batch]]
                if mode == "exact":
                    # Exactly the shards of the windows the batch's samples lie in, each once.
                    expected, lo = [], 0
                    for names, n in windows:
                        if lo < skip + batch and skip < lo + n:
                            expected += [shards[k].name for k in names]
                        lo += n
                    assert opened == expected, (rank, worker, skip)
                else:
                    # Each draw (a whole shard) is a window by itself.
                    assert set(opened) <= {s.shard for s in got} and 1 <= len(opened) <= 2
                    expected = opened if len({s.shard for s in got}) == 1 else []
                one_shard += len(expected) == 1
                checked += 1
    assert checked and one_shard > checked // 2


def _setup(root):
    write_dataset(root, [8, 8, 8, 8])
    # 16 batches of 2; worker 0 makes the even ones from its 16 samples (two shards), worker 1
    # the odd ones; windows of 8 are whole shards.
    return dict(rank=0, world_size=1, batch_size=2, workers=2, mode="exact", seed=7, shuffle_buffer=8)


def test_resume_opens_at_most_one_shard_per_worker(tmp_path, opens):
    kw = _setup(tmp_path)
    full = build_loader("webdataset", tmp_path, **kw)
    full.set_epoch(1)
    reference = batches_of(full)
    per_worker = Counter(pid for pid, _ in opens())
    assert len(per_worker) == 2 and set(per_worker.values()) == {2}
    for start in (5, 11):
        resumed = build_loader("webdataset", tmp_path, **kw)
        resumed.load_state_dict({**full.state_dict(), "epoch": 1, "batches_consumed": start})
        rest = batches_of(resumed)
        assert_same(rest, reference[start:])
        # Batch 11 is the sixth of worker 1 (samples 10-11 of 16): in its second shard. Batch 12,
        # worker 0's next, is in its second shard too. Batch 5 and 6 are in the first shards.
        opened = opens()
        per_worker = Counter(pid for pid, _ in opened)
        assert len(per_worker) == 2
        assert set(per_worker.values()) == ({1} if start == 11 else {2}), opened
        resumed.close()
    full.close()


def test_resume_after_bad_data_gives_the_same_batches_and_counts(tmp_path):
    def members(i, jpg, cls):
        return [(f"{i:09d}.jpg", jpg)] if i in (3, 13) else [(f"{i:09d}.jpg", jpg), (f"{i:09d}.cls", cls)]
    write_dataset(tmp_path, [6, 6, 6, 6], members=members)
    kw = dict(rank=0, world_size=1, batch_size=2, workers=0, mode="exact", seed=1, shuffle_buffer=6)
    full = build_loader("webdataset", tmp_path, **kw)
    reference = batches_of(full)
    assert full.stats[MISSING_CLS] == 2
    for start in (1, 4, 7, 10):
        first = build_loader("webdataset", tmp_path, **kw)
        it = iter(first)
        for _ in range(start):
            next(it)
        resumed = build_loader("webdataset", tmp_path, **kw)
        resumed.load_state_dict(first.state_dict())
        assert_same(batches_of(resumed), reference[start:])
        assert resumed.stats == full.stats, start


def test_workers_live_across_epochs(tmp_path):
    kw = _setup(tmp_path)
    loader = build_loader("webdataset", tmp_path, **kw)
    pids, epochs = [], []
    for e in range(3):
        loader.set_epoch(e)
        it = iter(loader)
        epochs.append([next(it)])
        pids.append(loader.worker_pids)
        epochs[-1] += batches_of(it)
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    assert all(p != os.getpid() for p in pids[0])
    # The same batches as workers started for that epoch alone.
    for e in (1, 2):
        fresh = build_loader("webdataset", tmp_path, **kw)
        fresh.set_epoch(e)
        assert_same(epochs[e], batches_of(fresh))
        assert fresh.worker_pids and set(fresh.worker_pids).isdisjoint(pids[0])
        fresh.close()
    labels = [torch.cat([y for _, y in ep]).tolist() for ep in epochs]
    assert sorted(labels[0]) == sorted(labels[1]) == list(range(32)) and labels[0] != labels[1]
    # An epoch left in the middle (the workers hold prefetched batches of it), then another one.
    loader.set_epoch(0)
    it = iter(loader)
    next(it), next(it)
    loader.set_epoch(1)
    assert_same(batches_of(loader), epochs[1])
    assert loader.worker_pids == pids[0]
    loader.close()
    assert loader.worker_pids == []


def test_dali_resume_lists_only_the_remaining_samples(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from data_pipeline import dali_loader
    write_dataset(tmp_path, [6, 6, 6, 6])
    kw = dict(rank=0, world_size=1, batch_size=2, workers=1, mode="exact", seed=3, shuffle_buffer=6)
    listed = []
    real = dali_loader.DaliLoader._view_indexes

    def recording(self, entries, folder):
        paths, index_paths = real(self, entries, folder)
        listed.append((paths, [Path(p).read_text().splitlines() for p in index_paths]))
        return paths, index_paths

    monkeypatch.setattr(dali_loader.DaliLoader, "_view_indexes", recording)
    full = build_loader("dali", tmp_path, **kw)
    full.set_epoch(1)
    reference = batches_of(full)
    (paths, views), = listed
    assert len(paths) == 4 and [len(v) - 1 for v in views] == [6] * 4  # whole shards, in windows
    listed.clear()
    resumed = build_loader("dali", tmp_path, **kw)
    resumed.load_state_dict({**full.state_dict(), "batches_consumed": 4})  # sample 8: shard 2 of 4
    assert_same(batches_of(resumed), reference[4:])
    (rest, rest_views), = listed
    # The reader is given the shards from the current one on, the current one from the resume
    # point: it opens no consumed shard and reads none of the consumed samples.
    assert rest == paths[1:]
    assert [len(v) - 1 for v in rest_views] == [4, 6, 6]
    assert rest_views[0][1:] == views[1][3:]
