"""WebDataset and random-tensor loaders: round trip, exact epochs, resampling, resume, contract."""
from __future__ import annotations

import itertools
import logging
import math
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.epoch_plan import (
    even_split,
    exact_batches_per_rank,
    exact_worker_plan,
    last_batch_padding,
    spans_between,
)
from data_pipeline.loaders import build_loader
from shard_helpers import pil_reference, write_dataset

SIZES = [5, 4, 3, 3, 2]  # 17 samples in 5 shards: divides by neither 2 ranks nor 2x2 workers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, SIZES)  # label of sample i is i
    return root


def epoch(loader, e=0):
    loader.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in loader]


def real_labels(loader, batches):
    """The labels of an exact epoch without the padded tail of the last batch."""
    labels = torch.cat([y for _, y in batches]).tolist()
    return labels[:len(labels) - loader.last_batch_padding]


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_matches_pil(dataset, workers):
    loader = build_loader("webdataset", dataset, rank=0, world_size=1, batch_size=4,
                          workers=workers, mode="exact", flip=False)
    batches = epoch(loader)
    assert len(batches) == len(loader) == math.ceil(17 / 4)
    assert loader.num_classes == 17
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (4, 3, 16, 16)
        assert y.dtype == torch.int64
    labels = real_labels(loader, batches)
    assert sorted(labels) == list(range(17))
    images = torch.cat([x for x, _ in batches]).double().numpy()
    for image, label in zip(images, torch.cat([y for _, y in batches]).tolist()):
        np.testing.assert_allclose(image, pil_reference(label), atol=1e-6)


def test_flip_mirrors_some_images_and_only_horizontally(dataset):
    loader = build_loader("webdataset", dataset, rank=0, world_size=1, batch_size=17,
                          workers=0, mode="exact", flip=True)
    (x, y), = epoch(loader)
    flipped = 0
    for image, label in zip(x.double().numpy(), y.tolist()):
        ref = pil_reference(label)
        if np.allclose(image, ref[:, :, ::-1], atol=1e-6):
            flipped += 1
        else:
            np.testing.assert_allclose(image, ref, atol=1e-6)
    assert 0 < flipped < 17


def test_exact_epoch_covers_every_sample_once_over_ranks_and_workers(dataset):
    world, batch = 2, 3
    for e in (0, 1):
        seen, lengths, orders = [], set(), []
        for rank in range(world):
            loader = build_loader("webdataset", dataset, rank=rank, world_size=world,
                                  batch_size=batch, workers=2, mode="exact", shuffle_buffer=4)
            batches = epoch(loader, e)
            lengths.add(len(batches))
            assert len(batches) == len(loader)
            assert all(len(y) == batch for _, y in batches)
            labels = torch.cat([y for _, y in batches]).tolist()
            mine = real_labels(loader, batches)
            # The padding repeats samples this rank owns.
            assert set(labels[len(mine):]) <= set(mine)
            seen += mine
            orders.append(labels)
        assert lengths == {exact_batches_per_rank(17, world, batch)}
        assert sorted(seen) == list(range(17)), f"epoch {e}: {Counter(seen)}"
        if e == 0:
            first = orders
    assert orders != first  # a new epoch brings a new order


@pytest.mark.parametrize("n,world,batch,workers", [
    (17, 2, 3, 2), (9, 2, 4, 2), (5, 2, 4, 2), (23, 3, 2, 3), (7, 4, 1, 2), (40, 3, 5, 1)])
def test_exact_plan_partitions_positions(n, world, batch, workers):
    rng = np.random.default_rng(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [n]])).tolist()
    order = rng.permutation(len(sizes)).tolist()
    offsets = np.cumsum([0] + [sizes[i] for i in order])
    position_of = {}
    for k, shard in enumerate(order):
        for p in range(sizes[shard]):
            position_of[(shard, p)] = int(offsets[k]) + p
    covered = []
    for rank in range(world):
        lo, hi = even_split(n, world, rank)
        batches, real, pad = [], [], []
        for w in range(workers):
            plan = exact_worker_plan(sizes, order, rank=rank, world_size=world,
                                     batch_size=batch, workers=workers, worker=w)
            batches += plan.batches
            real += [position_of[(s.shard, p)] for s in plan.real for p in range(s.start, s.stop)]
            pad += [position_of[(s.shard, p)] for s in plan.padding for p in range(s.start, s.stop)]
        assert sorted(batches) == list(range(exact_batches_per_rank(n, world, batch)))
        assert sorted(real) == list(range(lo, hi))
        assert len(pad) == last_batch_padding(n, world, batch, rank) and set(pad) <= set(real)
        covered += real
    assert sorted(covered) == list(range(n))


def test_spans_wrap_around_the_epoch_order():
    # Order: shard 1 (3 samples, positions 0-2), then shard 0 (2 samples, positions 3-4).
    spans = spans_between([1, 0], [2, 3], 2, 7)
    assert [(s.shard, s.start, s.stop) for s in spans] == [(1, 2, 3), (0, 0, 2), (1, 0, 2)]


def test_resampled_is_deterministic_by_seed_and_epoch(dataset):
    def run(seed, e, rank=0):
        loader = build_loader("webdataset", dataset, rank=rank, world_size=2, batch_size=4,
                              workers=2, seed=seed, mode="resampled", epoch_samples=24,
                              shuffle_buffer=5)
        assert len(loader) == 3  # ceil(24 / (2 * 4))
        return epoch(loader, e)

    a, b = run(0, 0), run(0, 0)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    labels = lambda bs: torch.cat([y for _, y in bs]).tolist()  # noqa: E731
    assert labels(run(0, 1)) != labels(a)
    assert labels(run(1, 0)) != labels(a)
    assert labels(run(0, 0, rank=1)) != labels(a)
    assert set(labels(a)) <= set(range(17))


@pytest.mark.parametrize("mode,workers,stop", [("exact", 2, 3), ("resampled", 2, 1),
                                               ("exact", 0, 2)])
def test_state_dict_resume_gives_the_same_next_batches(dataset, mode, workers, stop):
    kw = dict(rank=1, world_size=2, batch_size=2, workers=workers, mode=mode, seed=3,
              shuffle_buffer=4)
    full = epoch(build_loader("webdataset", dataset, **kw), 1)
    first = build_loader("webdataset", dataset, **kw)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == stop
    resumed = build_loader("webdataset", dataset, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop does before iterating; keeps the position
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(full) - stop
    for (xa, ya), (xb, yb) in zip(full[stop:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert resumed.state_dict()["batches_consumed"] == len(full)
    # The next iteration starts the epoch over.
    assert len(list(resumed)) == len(full)


def test_resume_with_other_settings_is_refused_or_continues_by_samples(dataset, caplog):
    a = build_loader("webdataset", dataset, rank=0, world_size=2, batch_size=2, workers=2)
    state = {**a.state_dict(), "epoch": 1, "batches_consumed": 3}
    b = build_loader("webdataset", dataset, rank=0, world_size=2, batch_size=3, workers=1)
    with pytest.raises(ValueError, match="workers: saved 2, now 1"):
        b.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        b.load_state_dict(state, strict=False)
    assert "differ" in caplog.text
    # 3 batches x 2 samples x 2 ranks = 12 samples = 2 batches of 3 x 2 ranks.
    assert b.epoch == 1 and len(list(b)) == len(b) - 2


def test_random_tensor_loader_contract_and_exact_coverage():
    kw = dict(world_size=3, batch_size=4, mode="exact", num_samples=10, num_classes=7,
              image_size=(8, 6))
    seen = []
    for rank in range(3):
        loader = build_loader("random_tensors", None, rank=rank, **kw)
        assert len(loader) == 1 and loader.num_classes == 7
        batches = epoch(loader)
        for x, y in batches:
            assert x.shape == (4, 3, 8, 6) and x.dtype == torch.float32
            assert -1 <= x.min() and x.max() <= 1 and 0 <= y.min() and y.max() < 7
        seen += real_labels(loader, batches)
        again = epoch(build_loader("random_tensors", None, rank=rank, **kw))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(batches, again))
        table = loader._labels.tolist()
    assert Counter(seen) == Counter(table)


def test_random_tensor_resampled_length_and_resume():
    kw = dict(rank=0, world_size=2, batch_size=8, mode="resampled", num_samples=100,
              num_classes=5, image_size=(4, 4), epoch_samples=80)
    loader = build_loader("random_tensors", None, **kw)
    assert len(loader) == 5
    full = epoch(loader, 2)
    resumed = build_loader("random_tensors", None, **kw)
    resumed.load_state_dict({**loader.state_dict(), "batches_consumed": 3})
    rest = list(resumed)
    assert len(rest) == 2 and all(torch.equal(a[1], b[1]) for a, b in zip(full[3:], rest))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="imagenet"), "unknown"),
    (dict(mode="sequential"), "mode"),
    (dict(rank=2), "rank=2"),
    (dict(batch_size=0), "batch_size"),
    (dict(workers=-1), "workers"),
    (dict(mode="exact", epoch_samples=10), "epoch_samples"),
    (dict(manifest=None), "manifest"),
])
def test_bad_arguments_name_the_value(dataset, kwargs, match):
    args = dict(kind="webdataset", manifest=dataset, rank=0, world_size=2, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_loader(args.pop("kind"), args.pop("manifest"), **args)


def test_exact_mode_needs_a_sample_per_rank(tmp_path):
    write_dataset(tmp_path, [2])
    with pytest.raises(ValueError, match="fewer than world_size"):
        build_loader("webdataset", tmp_path, rank=0, world_size=3, batch_size=1, mode="exact")


def test_batches_per_rank_is_equal_on_all_ranks():
    for n, world, batch in itertools.product([1, 7, 16, 17], [1, 2, 3], [1, 4, 5]):
        if n < world:
            continue
        per_rank = [math.ceil((even_split(n, world, r)[1] - even_split(n, world, r)[0]) / batch)
                    for r in range(world)]
        assert exact_batches_per_rank(n, world, batch) == max(per_rank)


class _Source:
    """A tiny SampleSource: sample i is make_jpeg(i) with label i % 5."""

    num_classes, name = 5, "loader-test"

    def __len__(self):
        return 11

    def __getitem__(self, i):
        from shard_helpers import make_jpeg
        return make_jpeg(i), i % 5


def test_shards_from_write_shards_load_in_both_file_loaders(tmp_path):
    from data_pipeline.shards import write_shards
    manifest = write_shards(_Source(), tmp_path, samples_per_shard=4, progress=False)
    kinds = ["webdataset"]
    try:
        import nvidia.dali  # noqa: F401
        kinds.append("dali")
    except ImportError:
        pass
    for kind in kinds:
        loader = build_loader(kind, manifest, rank=0, world_size=1, batch_size=11, workers=1,
                              mode="exact", flip=False)
        (x, y), = epoch(loader)
        assert sorted(y.tolist()) == sorted(i % 5 for i in range(11)), kind
        assert x.shape == (11, 3, 16, 16)


def test_fast_tar_path_reads_what_tarfile_reads(dataset):
    from data_pipeline.tar_members import library_members, plain_members
    path = dataset / "train-000000.tar"
    with open(path, "rb") as a, open(path, "rb") as b:
        fast = list(plain_members(a, lambda name: True))
        slow = list(library_members(b, lambda name: True))
    assert len(fast) == 2 * SIZES[0] and fast == slow


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_fall_back_to_the_library_reader(tmp_path, fmt):
    from data_pipeline.bad_data import SkipLog
    from data_pipeline.tar_members import NotPlainTar, plain_members
    from data_pipeline.tar_reader import ShardRef, read_span
    from shard_helpers import add_member, make_jpeg
    path = tmp_path / "long.tar"
    prefix = "some/deep/" + "d" * 120 + "/"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(3):
            add_member(tar, f"{prefix}{i:09d}.jpg", make_jpeg(i))
            add_member(tar, f"{prefix}{i:09d}.cls", f"{i:010d}".encode())
    with open(path, "rb") as f, pytest.raises(NotPlainTar):
        list(plain_members(f, lambda name: True))
    log = SkipLog(strict=True)
    samples = list(read_span(ShardRef(path, "long.tar", 3), 1, 3, 10, log))
    assert [(s.key, s.label) for s in samples] == [(f"{prefix}{i:09d}", i) for i in (1, 2)]
    assert samples[0].jpg == make_jpeg(1)
