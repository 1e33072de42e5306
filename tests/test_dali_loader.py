"""The DALI loader on the CPU: same samples as the webdataset loader, resume, index, bad data."""
from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_pipeline import dali_index, dali_loader  # noqa: E402
from data_pipeline.bad_data import (  # noqa: E402
    BAD_LABEL,
    CORRUPT_JPEG,
    MISSING_CLS,
    MISSING_JPG,
    MISSING_SHARD,
    TRUNCATED_SHARD,
    UNREACHABLE_SHARD,
    WRONG_SIZE,
    BadSampleError,
)
from data_pipeline.dali_loader import labels_from_digits  # noqa: E402
from data_pipeline.loaders import build_loader  # noqa: E402
from shard_helpers import pil_reference, write_dataset  # noqa: E402

SIZES = [5, 4, 3, 3, 2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_shards")
    write_dataset(root, SIZES)  # label of sample i is i
    return root


def collect(loader, e=0):
    loader.set_epoch(e)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_labels_from_fixed_width_digits():
    cls = torch.tensor([list(b"0000012345"), list(b"0000000000"), list(b"2147483647")],
                       dtype=torch.uint8)
    assert labels_from_digits(cls).tolist() == [12345, 0, 2147483647]


def test_dali_cpu_matches_webdataset_per_rank(dataset):
    world, batch = 2, 3
    for rank in range(world):
        kw = dict(rank=rank, world_size=world, batch_size=batch, workers=1, mode="exact",
                  flip=False, shuffle_buffer=4)
        dali = build_loader("dali", dataset, **kw)
        wds = build_loader("webdataset", dataset, **kw)
        assert len(dali) == len(wds) and dali.last_batch_padding == wds.last_batch_padding
        got = {}
        for name, loader in (("dali", dali), ("wds", wds)):
            batches = collect(loader)
            assert len(batches) == len(loader)
            labels = torch.cat([y for _, y in batches]).tolist()
            images = torch.cat([x for x, _ in batches])
            assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
            real = len(labels) - loader.last_batch_padding
            got[name] = Counter(labels[:real])
            for image, label in zip(images.double().numpy(), labels):
                # Both decode with libjpeg-turbo; allow a little for decoder settings.
                np.testing.assert_allclose(image, pil_reference(label), atol=4 / 127.5)
        assert got["dali"] == got["wds"]
        assert all(v == 1 for v in got["dali"].values())


def test_dali_exact_epoch_covers_all_samples_and_flips(dataset):
    seen, flipped = [], 0
    for rank in range(2):
        loader = build_loader("dali", dataset, rank=rank, world_size=2, batch_size=4, workers=2,
                              mode="exact", flip=True)
        batches = collect(loader, 1)
        labels = torch.cat([y for _, y in batches]).tolist()
        seen += labels[:len(labels) - loader.last_batch_padding]
        for image, label in zip(torch.cat([x for x, _ in batches]).double().numpy(), labels):
            ref = pil_reference(label)
            if np.allclose(image, ref[:, :, ::-1], atol=4 / 127.5):
                flipped += 1
            else:
                np.testing.assert_allclose(image, ref, atol=4 / 127.5)
    assert sorted(seen) == list(range(17))
    assert 0 < flipped < 20


def test_dali_resume_and_epochs(dataset):
    kw = dict(rank=0, world_size=1, batch_size=4, workers=1, mode="resampled", seed=5,
              epoch_samples=16, shuffle_buffer=6)
    loader = build_loader("dali", dataset, **kw)
    full = collect(loader, 2)
    assert len(full) == 4
    resumed = build_loader("dali", dataset, **kw)
    resumed.load_state_dict({**loader.state_dict(), "batches_consumed": 1})
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == 3
    for (xa, ya), (xb, yb) in zip(full[1:], rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    other = torch.cat([y for _, y in collect(loader, 3)])
    assert not torch.equal(other, torch.cat([y for _, y in full]))


def test_index_is_cached_and_rebuilt_when_the_shard_changes(tmp_path):
    write_dataset(tmp_path, [3, 2])
    build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, workers=1)
    idx = tmp_path / "train-000000.dali.idx"
    lines = idx.read_text().splitlines()
    assert lines[0] == "v1.2 3" and lines[1].startswith("jpg ") and " cls " in lines[1]
    before = idx.stat().st_mtime_ns
    build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, workers=1)
    assert idx.stat().st_mtime_ns == before
    write_dataset(tmp_path, [2, 2])  # rewrites the tars (and the manifest)
    os.utime(tmp_path / "train-000000.tar", ns=(before + 10**9, before + 10**9))
    build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, workers=1)
    assert idx.read_text().splitlines()[0] == "v1.2 2"


def damaged(tmp_path):
    """Shards with one case of each bad-data kind that DALI's index check catches."""
    def members(i, jpg, cls):
        key = f"{i:09d}"
        return {1: [(f"{key}.jpg", jpg[:40]), (f"{key}.cls", cls)],
                3: [(f"{key}.cls", cls)],
                6: [(f"{key}.jpg", jpg)],
                8: [(f"{key}.jpg", jpg), (f"{key}.cls", b"0000000099")]}.get(
            i, [(f"{key}.jpg", jpg), (f"{key}.cls", cls)])
    write_dataset(tmp_path, [4, 4, 4, 4], num_classes=16, members=members)
    (tmp_path / "train-000003.tar").unlink()
    path = tmp_path / "train-000002.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember("000000009.jpg")
    path.write_bytes(path.read_bytes()[:member.offset_data + member.size // 2])


def test_dali_skips_and_counts_bad_data(tmp_path, caplog):
    damaged(tmp_path)
    with caplog.at_level(logging.WARNING, logger="shardface.data"):
        loader = build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, workers=1,
                              mode="exact")
        labels = torch.cat([y for _, y in loader]).tolist()
    assert loader.stats == {CORRUPT_JPEG: 1, MISSING_JPG: 1, MISSING_CLS: 1, BAD_LABEL: 1,
                            TRUNCATED_SHARD: 3, MISSING_SHARD: 4, WRONG_SIZE: 0, "corrupt_record": 0,
                            UNREACHABLE_SHARD: 0}
    # 16 manifest samples make 8 batches on one rank; the 5 good ones fill them by repetition.
    assert set(labels) == {0, 2, 4, 5, 7} and len(labels) == 16
    assert any("train-000000.tar" in m and "000000001" in m for m in caplog.messages)


def test_dali_strict_names_the_first_bad_sample(tmp_path):
    damaged(tmp_path)
    with pytest.raises(BadSampleError, match=r"corrupt_jpeg.*train-000000\.tar.*000000001"):
        build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, strict=True)


def _undecodable_dataset(tmp_path, monkeypatch):
    def members(i, jpg, cls):
        return [(f"{i:09d}.jpg", jpg[:40] if i == 2 else jpg), (f"{i:09d}.cls", cls)]
    write_dataset(tmp_path, [3, 3], members=members)
    # An image whose header passes the quick check but which DALI cannot decode.
    monkeypatch.setattr(dali_index, "check_header", lambda data, size: None)


def test_decode_failure_stops_at_once_and_the_restart_decides_it_while_indexing(tmp_path, monkeypatch):
    _undecodable_dataset(tmp_path, monkeypatch)
    kw = dict(rank=0, world_size=1, batch_size=2, workers=1, mode="exact", shuffle_buffer=0)
    loader = build_loader("dali", tmp_path, **kw)
    assert loader.stats[CORRUPT_JPEG] == 0
    scans = []
    real_scan = dali_index._scan
    monkeypatch.setattr(dali_index, "_scan", lambda *a: scans.append(a[0].name) or real_scan(*a))
    # No PIL scan of the dataset on this rank mid-epoch (the others would wait for it): an error.
    with pytest.raises(RuntimeError, match=r"could not decode an image on rank 0 \(epoch 0, batch \d.*Restart"):
        list(loader)
    assert scans == []
    marker = tmp_path / dali_loader.DECODE_MARKER
    assert marker.is_file()
    restarted = build_loader("dali", tmp_path, **kw)  # the marker makes indexing decode every image
    assert restarted.stats[CORRUPT_JPEG] == 1 and sorted(scans) == ["train-000000.tar", "train-000001.tar"]
    assert not marker.exists()
    labels = torch.cat([y for _, y in restarted]).tolist()
    assert set(labels) == {0, 1, 3, 4, 5} and len(labels) == 6


def test_decode_verification_from_the_start(tmp_path, monkeypatch):
    _undecodable_dataset(tmp_path, monkeypatch)
    kw = dict(rank=0, world_size=1, batch_size=2, workers=1, mode="exact", shuffle_buffer=0)
    loader = build_loader("dali", tmp_path, dali_verify="decode", **kw)
    assert loader.stats[CORRUPT_JPEG] == 1 and loader._indexes[0].decode_verified
    assert set(torch.cat([y for _, y in loader]).tolist()) == {0, 1, 3, 4, 5}
    for p in tmp_path.glob("*.dali.*"):
        p.unlink()
    with pytest.raises(BadSampleError, match=r"corrupt_jpeg.*000000002"):
        build_loader("dali", tmp_path, dali_verify="decode", strict=True, **kw)
    with pytest.raises(ValueError, match="verify='pixels' is not one of header, decode"):
        build_loader("dali", tmp_path, dali_verify="pixels", **kw)


def test_one_vote_decides_the_verification_for_every_rank(tmp_path):
    write_dataset(tmp_path, [2, 2])
    votes = []
    loader = build_loader("dali", tmp_path, rank=1, world_size=2, batch_size=2, local_rank=1,
                          any_rank=lambda flag: votes.append(flag) or True)
    assert votes == [False] and all(ix.decode_verified for ix in loader._indexes)


def test_local_rank_zero_builds_the_indexes_before_the_barrier(tmp_path, monkeypatch):
    write_dataset(tmp_path, [3, 2, 2])
    events = []
    real_build = dali_index._build
    monkeypatch.setattr(dali_index, "_build", lambda shard, *a: events.append(("build", shard.name)) or
                        real_build(shard, *a))

    def barrier():
        events.append(("barrier", len(list(tmp_path.glob("*.dali.idx")))))

    build_loader("dali", tmp_path, rank=0, world_size=2, batch_size=2, local_rank=0, barrier=barrier)
    assert [e[0] for e in events] == ["build"] * 3 + ["barrier"] and events[-1] == ("barrier", 3)
    events.clear()
    # Another rank of the node waits first, then only reads what rank 0 wrote.
    other = build_loader("dali", tmp_path, rank=1, world_size=2, batch_size=2, local_rank=1, barrier=barrier)
    assert events == [("barrier", 3)] and [ix.num_listed for ix in other._indexes] == [3, 2, 2]
    # Where local rank 0 wrote nothing (no local rank 0 here), a rank builds what is missing itself.
    (tmp_path / "train-000001.dali.idx").unlink()
    events.clear()
    build_loader("dali", tmp_path, rank=1, world_size=2, batch_size=2, local_rank=1, barrier=barrier)
    assert events == [("barrier", 2), ("build", "train-000001.tar")]


def test_a_failed_build_on_local_rank_zero_still_reaches_the_barrier(tmp_path, monkeypatch):
    write_dataset(tmp_path, [2, 2])

    def broken(*a):
        raise OSError("disk full")

    monkeypatch.setattr(dali_index, "_build", broken)
    waited = []
    with pytest.raises(OSError, match="disk full"):
        build_loader("dali", tmp_path, rank=0, world_size=2, batch_size=2, local_rank=0,
                     barrier=lambda: waited.append(1))
    assert waited == [1]


def test_shards_are_indexed_in_parallel_with_the_serial_result(tmp_path, monkeypatch):
    import threading
    m = write_dataset(tmp_path, [3, 2, 4, 1, 2])
    from data_pipeline.tar_reader import shard_refs
    serial = dali_index.index_shards(shard_refs(m), m.num_classes, m.image_size, workers=1)
    for p in tmp_path.glob("*.dali.*"):
        p.unlink()
    threads = set()
    real_build = dali_index._build
    monkeypatch.setattr(dali_index, "_build", lambda *a: threads.add(threading.current_thread().name) or
                        real_build(*a))
    parallel = dali_index.index_shards(shard_refs(m), m.num_classes, m.image_size, workers=3)
    assert [(ix.shard.name, ix.num_listed) for ix in parallel] == [(ix.shard.name, ix.num_listed) for ix in serial]
    assert all(name.startswith("dali-index") for name in threads) and threads
    assert [p.read_text() for p in sorted(tmp_path.glob("*.dali.idx"))] == \
        [ix.index_path.read_text() for ix in serial]


def test_indexes_written_ahead_are_only_read(tmp_path, monkeypatch, capsys):
    write_dataset(tmp_path, [2, 3])
    assert dali_index.main([str(tmp_path), "--decode", "--workers", "2"]) == 0
    assert "2 shards indexed: 5 samples listed, 0 left out" in capsys.readouterr().out

    def no_build(*a):
        raise AssertionError("an index was rebuilt")

    monkeypatch.setattr(dali_index, "_build", no_build)
    loader = build_loader("dali", tmp_path, rank=0, world_size=1, batch_size=2, dali_verify="decode")
    assert [ix.num_listed for ix in loader._indexes] == [2, 3]


def _node_of_two(rank, world, root):
    """Two ranks of one node: local rank 0 builds, rank 1 only reads after the barrier."""
    import torch.distributed as dist

    from train.distributed import DistContext
    ctx = DistContext(rank, world, rank, torch.device("cpu"), dist.group.WORLD, "gloo")
    built = []
    real_build = dali_index._build
    dali_index._build = lambda shard, *a: built.append(shard.name) or real_build(shard, *a)
    # Only rank 1 asks for decode verification (as if only its node had seen a failure): both decode.
    loader = build_loader("dali", root, rank=rank, world_size=world, batch_size=2, local_rank=ctx.local_rank,
                          barrier=ctx.barrier, any_rank=lambda flag: ctx.any_rank(flag or rank == 1), mode="exact")
    labels = torch.cat([y for _, y in loader]).tolist()
    return built, labels[:len(labels) - loader.last_batch_padding], loader._indexes[0].decode_verified


@pytest.mark.slow
def test_two_ranks_of_a_node_share_one_index_build(tmp_path):
    from distributed_harness import run_distributed
    write_dataset(tmp_path, [3, 3, 2])
    (b0, l0, v0), (b1, l1, v1) = run_distributed(_node_of_two, 2, str(tmp_path))
    assert sorted(b0) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"] and b1 == []
    assert sorted(l0 + l1) == list(range(8))
    assert v0 and v1


def test_the_trainer_hands_the_dali_loader_its_node_barrier(tmp_path):
    from train.builders import build_data, load_manifest
    from train.config import TrainConfig
    from train.distributed import DistContext
    write_dataset(tmp_path, [2, 2])
    cfg = TrainConfig.load("cpu_tiny", [f"data.manifest={tmp_path / 'manifest.json'}", "data.loader=dali",
                                        "data.dali_verify=decode", "data.batch_size=2"])
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None, "none")
    loader = build_data(cfg.data, ctx, load_manifest(cfg.data), cfg.seed)
    assert loader.barrier == ctx.barrier and loader.any_rank == ctx.any_rank and loader.verify == "decode"
    assert all(ix.decode_verified for ix in loader._indexes)


def test_dali_cuda_without_cuda_is_a_clear_error(dataset):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_loader("dali", dataset, rank=0, world_size=1, batch_size=2, device="cuda")


def test_missing_dali_is_a_clear_error(dataset, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        build_loader("dali", dataset, rank=0, world_size=1, batch_size=2)


def test_index_goes_to_the_cache_when_the_shard_directory_is_read_only(tmp_path, monkeypatch):
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    write_dataset(shards, [2, 2])
    real_access = os.access
    monkeypatch.setattr(dali_index.os, "access",
                        lambda p, mode: False if Path(p) == shards else real_access(p, mode))
    monkeypatch.setattr(dali_index, "cache_dir", lambda: cache)
    loader = build_loader("dali", shards, rank=0, world_size=1, batch_size=2, mode="exact")
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == [0, 1, 2, 3]
    assert not list(shards.glob("*.dali.*"))
    assert len(list(cache.glob("*/*.dali.idx"))) == 2
