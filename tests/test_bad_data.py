"""Bad data in the webdataset loader: skipped, counted and named, or an error when strict."""
from __future__ import annotations

import logging
import tarfile

import pytest
import torch

from data_pipeline.bad_data import (
    BAD_LABEL,
    CORRUPT_JPEG,
    MISSING_CLS,
    MISSING_JPG,
    MISSING_SHARD,
    REASONS,
    TRUNCATED_SHARD,
    WRONG_SIZE,
    BadSample,
    BadSampleError,
    SkipReport,
)
from data_pipeline.loaders import build_loader
from shard_helpers import make_jpeg, write_dataset

SIZES = [4, 4, 4]  # samples 0-3 in shard 0, 4-7 in shard 1, 8-11 in shard 2; label of i is i
BAD = 5           # the damaged sample (shard 1, key 000000005)


def damage(kind):
    """``members`` hook for write_dataset that damages sample BAD in the way ``kind`` says."""
    def members(i, jpg, cls):
        parts = [(f"{i:09d}.jpg", jpg), (f"{i:09d}.cls", cls)]
        if i != BAD:
            return parts
        if kind == "corrupt":
            return [(f"{i:09d}.jpg", jpg[: len(jpg) // 2]), parts[1]]
        if kind == "not_jpeg":
            return [(f"{i:09d}.jpg", b"this is not an image"), parts[1]]
        if kind == "size":
            return [(f"{i:09d}.jpg", make_jpeg(i, size=12)), parts[1]]
        if kind == "no_jpg":
            return [parts[1]]
        if kind == "no_cls":
            return [parts[0]]
        if kind == "label":
            return [parts[0], (f"{i:09d}.cls", f"{len(SIZES) * 4:010d}".encode())]
        if kind == "text_label":
            return [parts[0], (f"{i:09d}.cls", b"five")]
        raise AssertionError(kind)
    return members


CASES = [("corrupt", CORRUPT_JPEG), ("not_jpeg", CORRUPT_JPEG), ("size", WRONG_SIZE),
         ("no_jpg", MISSING_JPG), ("no_cls", MISSING_CLS), ("label", BAD_LABEL),
         ("text_label", BAD_LABEL)]


def run_epoch(root, strict=False, workers=0, world=1):
    labels, stats = [], {r: 0 for r in REASONS}
    for rank in range(world):
        loader = build_loader("webdataset", root, rank=rank, world_size=world, batch_size=3,
                              workers=workers, mode="exact", strict=strict, flip=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(x.shape[0] == 3 and len(y) == 3 for x, y in batches)
        labels += torch.cat([y for _, y in batches]).tolist()
        for k, v in loader.stats.items():
            stats[k] += v
    return labels, stats


@pytest.mark.parametrize("kind,reason", CASES)
def test_bad_sample_is_skipped_counted_and_named(tmp_path, caplog, kind, reason):
    write_dataset(tmp_path, SIZES, num_classes=12, members=damage(kind))
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        labels, stats = run_epoch(tmp_path)
    assert stats == {r: int(r == reason) for r in REASONS}
    assert set(labels) == set(range(12)) - {BAD}
    assert any("train-000001.tar" in m and f"{BAD:09d}" in m and reason in m
               for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("kind,reason", CASES)
def test_bad_sample_is_an_error_when_strict(tmp_path, kind, reason):
    write_dataset(tmp_path, SIZES, num_classes=12, members=damage(kind))
    with pytest.raises(BadSampleError, match=rf"{reason}.*train-000001\.tar.*{BAD:09d}"):
        run_epoch(tmp_path, strict=True)


def truncate(root, inside_member=True):
    """Cut shard 1 at sample 6's .jpg: in the middle of its data, or just before its header."""
    path = root / "train-000001.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{6:09d}.jpg")
    cut = member.offset_data + member.size // 2 if inside_member else member.offset
    path.write_bytes(path.read_bytes()[:cut])


@pytest.mark.parametrize("inside_member", [True, False])
def test_truncated_shard_loses_only_its_tail(tmp_path, caplog, inside_member):
    write_dataset(tmp_path, SIZES)
    truncate(tmp_path, inside_member)
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        labels, stats = run_epoch(tmp_path, world=2)
    assert stats == {r: 2 * (r == TRUNCATED_SHARD) for r in REASONS}
    assert set(labels) == set(range(12)) - {6, 7}
    # The first lost sample is named by key when its header was read, else by position.
    first_lost = "000000006" if inside_member else "#2"
    assert any("train-000001.tar" in m and TRUNCATED_SHARD in m and first_lost in m
               for m in caplog.messages), caplog.messages


def test_damaged_member_header_loses_the_rest_of_the_shard(tmp_path, caplog):
    write_dataset(tmp_path, SIZES)
    path = tmp_path / "train-000001.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmember(f"{6:09d}.cls").offset
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0xFF  # inside the name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        labels, stats = run_epoch(tmp_path)
    assert stats == {r: 2 * (r == TRUNCATED_SHARD) for r in REASONS}
    assert set(labels) == set(range(12)) - {6, 7}
    assert any("train-000001.tar" in m and "000000006" in m and "checksum" in m
               for m in caplog.messages), caplog.messages


def test_truncated_shard_is_an_error_when_strict(tmp_path):
    write_dataset(tmp_path, SIZES)
    truncate(tmp_path)
    with pytest.raises(BadSampleError, match=r"truncated_shard.*train-000001\.tar"):
        run_epoch(tmp_path, strict=True)


def test_missing_shard_is_skipped_and_counted(tmp_path, caplog):
    write_dataset(tmp_path, SIZES)
    (tmp_path / "train-000002.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        labels, stats = run_epoch(tmp_path, world=2, workers=2)
    assert stats[MISSING_SHARD] == 4 and sum(stats.values()) == 4
    assert set(labels) == set(range(8))
    assert any("train-000002.tar" in m and "does not exist" in m for m in caplog.messages)


def test_missing_shard_is_an_error_when_strict_across_worker_processes(tmp_path):
    write_dataset(tmp_path, SIZES)
    (tmp_path / "train-000002.tar").unlink()
    with pytest.raises(BadSampleError, match=r"missing_shard.*train-000002\.tar"):
        run_epoch(tmp_path, strict=True, workers=2)


def test_resampled_mode_survives_a_missing_shard(tmp_path):
    write_dataset(tmp_path, SIZES)
    (tmp_path / "train-000000.tar").unlink()
    loader = build_loader("webdataset", tmp_path, rank=0, world_size=1, batch_size=4,
                          workers=0, mode="resampled", epoch_samples=40)
    labels = torch.cat([y for _, y in loader]).tolist()
    assert len(labels) == 40 and set(labels) <= set(range(4, 12))
    assert loader.stats[MISSING_SHARD] > 0 and loader.stats[MISSING_SHARD] % 4 == 0


def test_no_readable_shard_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, [2, 2])
    for p in tmp_path.glob("*.tar"):
        p.unlink()
    loader = build_loader("webdataset", tmp_path, rank=0, world_size=1, batch_size=2,
                          workers=0, mode="resampled")
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(loader)


def test_warnings_are_rate_limited(caplog):
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        report.add(BadSample(CORRUPT_JPEG, "train-000000.tar", f"{i:09d}", "bad")
                   for i in range(1000))
    # Five in full, then one each at the 10th, 100th and 1000th event.
    assert len(caplog.records) == 8
    assert report.as_dict()[CORRUPT_JPEG] == 1000
