"""Remote data shards: HTTP and S3 (moto) servers on 127.0.0.1, cut connections, unreachable shards."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from data_pipeline.bad_data import REASONS, UNREACHABLE_SHARD, BadSampleError
from data_pipeline.byte_streams import RemoteOptions, ResumingReader, is_url, join, open_stream
from data_pipeline.loaders import build_loader
from data_pipeline.manifest import Manifest, ManifestError
from remote_servers import copy_tree, http_server, s3_server, upload_dir
from shard_helpers import write_dataset

SIZES = [5, 4, 6]  # 15 samples, label of sample i is i
FAST = RemoteOptions(retries=3, backoff_s=0.01)  # tests do not wait for real back-off


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, SIZES)
    return root


@pytest.fixture(scope="module")
def s3():
    """One S3-compatible server for the module's tests (starting one costs about a second)."""
    with s3_server() as endpoint:
        yield endpoint


def epoch_labels(manifest, *, mode="exact", workers=0, world=1, rank=0, epoch=0, batch=5,
                 remote=FAST, strict=False, **kw):
    loader = build_loader("webdataset", manifest, rank=rank, world_size=world, batch_size=batch,
                          workers=workers, mode=mode, flip=False, seed=3, shuffle_buffer=4,
                          strict=strict, remote=remote, **kw)
    loader.set_epoch(epoch)
    batches = list(loader)
    return (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]).tolist(),
            loader.stats)


def test_url_helpers():
    assert is_url("s3://b/x") and is_url("http://h/x") and is_url("pipe:cat x")
    assert not is_url("/data/x") and not is_url("data/x.tar") and not is_url("file:///x")
    assert join("s3://b/data/", "train-0.tar") == "s3://b/data/train-0.tar"
    assert join("s3://b/data", "http://h/y.tar") == "http://h/y.tar"


@pytest.mark.parametrize("ranges", [True, False])
def test_stream_resumes_after_cuts_without_losing_or_repeating_bytes(tmp_path, ranges):
    blob = bytes(range(256)) * 4000  # 1 MB
    (tmp_path / "blob.bin").write_bytes(blob)
    with http_server(tmp_path, ranges=ranges) as server:
        server.cuts["blob.bin"] = [300_001, 900_000]
        raw = ResumingReader(f"{server.url}/blob.bin", FAST)
        got = bytearray()
        while chunk := raw.read(70_000):
            got += chunk
        raw.close()
    assert bytes(got) == blob and server.cuts["blob.bin"] == []
    assert raw.retried == 2 and len(server.requests) == 3
    # Each new request asks from a byte not handed on yet (the client may have received
    # more than it handed on before the failure showed); the first asks for the whole file.
    starts = [int(r[len("bytes="):-1]) if r else 0 for _, r in server.requests]
    assert starts[0] == 0 and starts[1] <= 300_001 and 0 < starts[2] <= 900_000


def test_http_manifest_and_shards_read_the_same_samples_as_local(dataset):
    local_x, local_y, _ = epoch_labels(dataset)
    assert sorted(local_y) == list(range(15))
    with http_server(dataset) as server:
        m = Manifest.load(f"{server.url}/manifest.json", FAST)
        assert m.is_remote and m.shard_paths()[0] == f"{server.url}/train-000000.tar"
        x, y, stats = epoch_labels(m)
        assert y == local_y and torch.equal(x, local_x)
        assert sum(stats.values()) == 0
        # The directory URL works too, and loader workers (separate processes) stream as well.
        _, y2, _ = epoch_labels(f"{server.url}/", workers=2)
        _, y2_local, _ = epoch_labels(dataset, workers=2)
        assert y2 == y2_local


def test_cut_mid_shard_gives_the_same_samples_as_local(dataset):
    _, local_y, _ = epoch_labels(dataset, world=2, rank=1)
    with http_server(dataset) as server:
        for i in range(len(SIZES)):
            name = f"train-{i:06d}.tar"
            server.cuts[name] = [(dataset / name).stat().st_size // 2 + 7]
        _, y, stats = epoch_labels(f"{server.url}/manifest.json", world=2, rank=1)
        assert sum(not c for c in server.cuts.values()) >= 2  # the cuts happened
    assert y == local_y and sum(stats.values()) == 0


def test_a_server_without_range_support_is_resumed_by_skipping(dataset):
    _, local_y, _ = epoch_labels(dataset, mode="resampled", epoch_samples=12)
    with http_server(dataset, ranges=False) as server:
        name = "train-000002.tar"
        server.cuts[name] = [(dataset / name).stat().st_size // 3]
        _, y, stats = epoch_labels(f"{server.url}/manifest.json", mode="resampled", epoch_samples=12)
    assert y == local_y and sum(stats.values()) == 0


def _unreachable_manifest(dataset, tmp_path):
    """A copy of the dataset whose manifest points shard 1 at a port where nothing listens."""
    doc = json.loads((dataset / "manifest.json").read_text())
    doc["shards"][1]["path"] = "http://127.0.0.1:9/train-000001.tar"
    root = copy_tree(dataset, tmp_path / "d")
    (root / "manifest.json").write_text(json.dumps(doc))
    return root


def test_unreachable_shard_is_skipped_and_counted_with_its_url(dataset, tmp_path, caplog):
    with http_server(_unreachable_manifest(dataset, tmp_path)) as server:
        with caplog.at_level(logging.WARNING, logger="shardface.data"):
            _, y, stats = epoch_labels(f"{server.url}/manifest.json")
    # Exact epoch: the 4 samples of shard 1 (labels 5..8) are lost and counted; the rest are read.
    assert stats[UNREACHABLE_SHARD] == SIZES[1] and sum(stats.values()) == SIZES[1]
    assert sorted(y[:11]) == sorted(set(range(15)) - {5, 6, 7, 8}) and len(y) == 15
    assert any("http://127.0.0.1:9/train-000001.tar" in m and "unreachable" in m
               for m in caplog.messages)


def test_unreachable_shard_is_a_clear_error_when_strict(dataset, tmp_path):
    with pytest.raises(BadSampleError, match=r"unreachable_shard.*http://127\.0\.0\.1:9/train-000001\.tar"):
        epoch_labels(_unreachable_manifest(dataset, tmp_path), strict=True, workers=2)


def test_missing_remote_shard_and_manifest(dataset, tmp_path):
    root = copy_tree(dataset, tmp_path / "d")
    (root / "train-000000.tar").unlink()
    with http_server(root) as server:
        _, y, stats = epoch_labels(f"{server.url}/manifest.json")
        with pytest.raises(ManifestError, match=r"cannot read the manifest .*/nope/manifest\.json"):
            Manifest.load(f"{server.url}/nope/", FAST)
    assert stats["missing_shard"] == SIZES[0] and set(y) == set(range(5, 15))
    assert set(stats) == set(REASONS)


def test_pipe_shards(dataset, tmp_path):
    doc = json.loads((dataset / "manifest.json").read_text())
    for s in doc["shards"]:
        s["path"] = f"pipe:cat {dataset / s['path']}"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    _, local_y, _ = epoch_labels(dataset)
    _, y, stats = epoch_labels(tmp_path)
    assert y == local_y and sum(stats.values()) == 0


def test_s3_through_the_users_configuration(dataset, s3):
    _, local_y, _ = epoch_labels(dataset, world=2, rank=0, workers=2)
    upload_dir(dataset, "s3://faces/wf/")
    m = Manifest.load("s3://faces/wf/manifest.json")  # endpoint and keys from the environment
    _, y, stats = epoch_labels(m, world=2, rank=0, workers=2)
    with open_stream("s3://faces/wf/train-000001.tar", FAST) as f:
        assert f.read() == (dataset / "train-000001.tar").read_bytes()
    assert y == local_y and sum(stats.values()) == 0


def test_inspect_over_http(dataset, tmp_path):
    from data_pipeline.inspect import inspect_dataset
    root = copy_tree(dataset, tmp_path / "d")
    with http_server(root) as server:
        good = inspect_dataset(f"{server.url}/manifest.json", progress=False)
        from launch.cli import main as shardface
        assert shardface(["data", "inspect", f"{server.url}/manifest.json"]) == 0
        quick = inspect_dataset(f"{server.url}/", verify=False, progress=False)
        (root / "train-000001.tar").write_bytes(b"damaged")
        (root / "train-000002.tar").unlink()
        bad = inspect_dataset(f"{server.url}/manifest.json", progress=False)
    assert good.ok and good.samples_read == 15 and quick.ok, good.format()
    assert bad.missing_shards == ["train-000002.tar"] and not bad.ok
    assert bad.checksum_mismatches + bad.unreadable_shards == ["train-000001.tar"]


def test_convert_to_s3_writes_shards_then_the_manifest(tmp_path, monkeypatch, s3):
    from PIL import Image

    from data_pipeline import remote_writes
    from data_pipeline.convert import convert
    folder = tmp_path / "faces"
    for ident in range(3):
        (folder / f"id{ident}").mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (16, 16), (40 * ident, 20 * k, 90)).save(folder / f"id{ident}" / f"{k}.jpg")
    import tempfile
    from pathlib import Path
    staging = lambda: set(Path(tempfile.gettempdir()).glob("shardface-upload-*"))  # noqa: E731
    before = staging()
    uploads = []
    real_put = remote_writes.put_file
    monkeypatch.setattr(remote_writes, "put_file",
                        lambda local, url, options=None: (uploads.append(url.rsplit("/", 1)[-1]),
                                                          real_put(local, url, options)))
    import fsspec
    fsspec.filesystem("s3").mkdir("out-bucket")
    m = convert("folder", folder, "s3://out-bucket/faces", samples_per_shard=4, progress=False)
    assert m.root == "s3://out-bucket/faces" and len(m.shards) == 3
    assert uploads[-1] == "manifest.json" and uploads[:3] == [s.path for s in m.shards]
    assert "identities.txt" in uploads
    again = Manifest.load("s3://out-bucket/faces/")
    _, y, stats = epoch_labels(again, batch=3)
    assert sorted(y) == sorted(i // 3 for i in range(9)) and sum(stats.values()) == 0
    assert staging() == before  # the staging folder is gone


def test_http_output_is_refused():
    from data_pipeline.convert import convert
    with pytest.raises(ValueError, match="read-only"):
        convert("folder", "/nonexistent", "http://127.0.0.1:9/x", progress=False)


def test_train_config_reads_a_remote_manifest(dataset):
    from train.builders import load_manifest
    from train.config import TrainConfig
    with http_server(dataset) as server:
        cfg = TrainConfig.load("cpu_tiny", [f"data.manifest={server.url}/manifest.json", "data.retries=2",
                                            "data.retry_backoff_s=0", "data.storage_options={s3: {anon: true}}"])
        m = load_manifest(cfg.data)
    assert m.remote.storage_options == {"s3": {"anon": True}}
    assert m.num_samples == 15 and m.remote.retries == 2 and m.is_remote



def test_dali_stages_remote_shards_into_a_bounded_cache(dataset, tmp_path):
    pytest.importorskip("nvidia.dali")
    kw = dict(rank=0, world_size=1, batch_size=5, workers=1, mode="exact", flip=False, shuffle_buffer=0)
    local = build_loader("dali", copy_tree(dataset, tmp_path / "local"), **kw)
    local_y = torch.cat([y for _, y in local]).tolist()
    cache = RemoteOptions(retries=1, backoff_s=0.0, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    with http_server(dataset) as server:
        loader = build_loader("dali", f"{server.url}/manifest.json", remote=cache, **kw)
        y = torch.cat([y for _, y in loader]).tolist()
        staged = sorted((tmp_path / "cache" / "shards").glob("*.tar"))
        def shard_gets():
            return sum(name.endswith(".tar") for name, _ in server.requests)
        assert len(staged) == len(SIZES) and shard_gets() == len(SIZES)
        build_loader("dali", f"{server.url}/manifest.json", remote=cache, **kw)
        assert shard_gets() == len(SIZES)  # a second start finds the copies
        tiny = RemoteOptions(cache_dir=str(tmp_path / "tiny"), cache_gb=1e-6)
        with pytest.raises(ValueError, match=r"loader=dali reads local files.*data\.cache_gb"):
            build_loader("dali", f"{server.url}/manifest.json", remote=tiny, **kw)
    assert y == local_y
    names = {s.sha256 for s in Manifest.load(dataset).shards}
    assert {p.stem for p in staged} == names


def test_resume_mid_epoch_over_http_gives_the_remaining_batches(dataset):
    kw = dict(rank=0, world_size=1, batch_size=3, workers=2, mode="exact", flip=False, seed=5,
              remote=FAST)
    with http_server(dataset) as server:
        url = f"{server.url}/manifest.json"
        full = [y.tolist() for _, y in build_loader("webdataset", url, **kw)]
        first = build_loader("webdataset", url, **kw)
        it = iter(first)
        head = [next(it)[1].tolist() for _ in range(2)]
        state = first.state_dict()
        del it
        resumed = build_loader("webdataset", url, **kw)
        resumed.load_state_dict(state)
        tail = [y.tolist() for _, y in resumed]
    assert head + tail == full and len(full) == 5


def test_a_dead_url_is_tried_once_on_later_opens(monkeypatch):
    from data_pipeline import byte_streams
    waits = []
    url = "http://127.0.0.1:9/gone.tar"
    byte_streams._dead_since.pop(url, None)
    opts = RemoteOptions(retries=3, backoff_s=1.0)
    for _ in range(2):
        with pytest.raises(byte_streams.SourceUnreachable, match="attempts in a row failed"):
            ResumingReader(url, opts, sleep=waits.append)
    assert len(waits) == 3  # the back-off of the first open only
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0 and 2.0 <= waits[2] <= 4.0


def test_a_protocol_without_its_client_is_a_clear_error_at_once():
    from data_pipeline.byte_streams import RemoteSetupError
    with pytest.raises(RemoteSetupError, match=r"nosuch:// is not a protocol fsspec knows"):
        open_stream("nosuch://bucket/x.tar", RemoteOptions(retries=3, backoff_s=10.0))


def test_remote_verification_sets_are_fetched_into_the_cache(dataset, tmp_path):
    root = copy_tree(dataset, tmp_path / "d")
    (root / "lfw.bin").write_bytes(b"pairs")
    doc = json.loads((root / "manifest.json").read_text())
    doc["verification"] = {"lfw": "lfw.bin", "gone": "gone.bin"}
    (root / "manifest.json").write_text(json.dumps(doc))
    opts = RemoteOptions(retries=0, cache_dir=str(tmp_path / "cache"))
    with http_server(root) as server:
        paths = Manifest.load(f"{server.url}/manifest.json", opts).verification_paths()
    assert paths["lfw"].read_bytes() == b"pairs" and tmp_path / "cache" in paths["lfw"].parents
    assert not paths["gone"].exists()  # reported missing by its callers, like a local one


def test_synth_command_writes_to_s3_with_the_manifest_last(s3, monkeypatch):
    import fsspec

    from data_pipeline import remote_writes
    from launch.cli import main as shardface
    uploads = []
    real_put = remote_writes.put_file
    monkeypatch.setattr(remote_writes, "put_file",
                        lambda local, url, options=None: (uploads.append(url.rsplit("/", 1)[-1]),
                                                          real_put(local, url, options)))
    fsspec.filesystem("s3").mkdir("synth-out")
    assert shardface(["data", "synth", "--out", "s3://synth-out/tiny", "--identities", "3",
                      "--images-per-identity", "2", "--heldout-identities", "2", "--pairs", "4",
                      "--image-size", "32", "--samples-per-shard", "4", "--workers", "1"]) == 0
    m = Manifest.load("s3://synth-out/tiny")
    assert m.num_samples == 6 and len(m.shards) == 2 and uploads[-1] == "manifest.json"
    assert set(uploads) >= {s.path for s in m.shards} | {"synthetic_heldout.bin"}


@pytest.mark.parametrize("ranges", [True, False])
def test_seeking_forward_and_back(tmp_path, ranges):
    blob = bytes(range(251)) * 40_000  # 10 MB, 251 so that offsets show in the bytes
    (tmp_path / "big.bin").write_bytes(blob)
    with http_server(tmp_path, ranges=ranges) as server:
        with open_stream(f"{server.url}/big.bin", FAST) as f:
            assert f.read(1000) == blob[:1000]
            f.seek(3000, 1)  # a short skip: read past on the same connection
            assert f.read(10) == blob[4000:4010]
            f.seek(6_000_000)  # a long one: a new request from there (where Range works)
            assert f.read(100) == blob[6_000_000:6_000_100]
            f.seek(10)  # back: a new request
            assert f.read(5) == blob[10:15] and f.tell() == 15
    # The client asks the same either way; a server without Range answers from byte 0 and
    # the client drops what comes before the position (the bytes above are right both ways).
    assert [r for _, r in server.requests] == ["", "bytes=6000000-", "bytes=10-"]


def _samples_whole_before(path, cut):
    """How many samples of the tar ``path`` have every member's data before byte ``cut``."""
    import tarfile
    ends: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.rsplit(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    whole = 0
    for end in ends.values():  # in tar order
        if end > cut:
            break
        whole += 1
    return whole


@pytest.mark.parametrize("where", ["middle", "start"])
def test_a_shard_cut_on_every_attempt_counts_the_samples_after_the_cut(dataset, where):
    name = "train-000002.tar"  # samples 9..14
    cut = (dataset / name).stat().st_size // 2 if where == "middle" else 0
    before = _samples_whole_before(dataset / name, cut)
    assert (before > 0) == (where == "middle")  # the middle cut leaves whole samples before it
    with http_server(dataset) as server:
        server.cuts[name] = [cut] * 100  # cut at the same byte every time
        _, y, stats = epoch_labels(f"{server.url}/manifest.json", remote=RemoteOptions(retries=2, backoff_s=0))
    read = set(y) & set(range(9, 15))
    lost = stats[UNREACHABLE_SHARD]
    # The samples before the cut are read once (whether the client saw the bytes before the
    # connection's error or after); exactly the rest of the shard is counted as lost.
    assert read == set(range(9, 9 + before)) and lost == 6 - before
    assert sum(stats.values()) == lost and set(range(9)) <= set(y)


def test_bytes_received_before_a_cut_are_handed_on(tmp_path):
    # The client waits until the cut answer has arrived whole, so that the connection's error
    # is already known at the first read: the bytes before it must still be handed on.
    import time
    blob = bytes(range(256)) * 400
    (tmp_path / "blob.bin").write_bytes(blob)
    with http_server(tmp_path) as server:
        server.cuts["blob.bin"] = [40_000]
        raw = ResumingReader(f"{server.url}/blob.bin", RemoteOptions(retries=0))
        time.sleep(0.3)
        got = bytearray()
        while chunk := raw.read(1 << 20):
            got += chunk
        raw.close()
    assert bytes(got) == blob and raw.retried == 1
    assert [r for _, r in server.requests] == ["", "bytes=40000-"]


