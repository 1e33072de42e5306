"""Shard writing: manifest round trip, global shuffle, atomic resume, label checks, inspection."""
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.inspect import inspect_dataset
from data_pipeline.jpeg import jpeg_size
from data_pipeline.manifest import Manifest, ManifestError, ShardInfo
from data_pipeline.shards import SampleError, write_shards
from data_pipeline.tar_writer import write_tar_atomic
from shard_helpers import MemorySource, make_jpeg, read_dataset, read_shard

N, C, PER_SHARD = 60, 7, 16  # -> 4 shards of 15


def dataset(n=N, classes=C):
    rng = np.random.default_rng(1)
    return [(make_jpeg(i, 12), int(rng.integers(0, classes))) for i in range(n)]


def test_manifest_round_trip_and_errors(tmp_path):
    m = Manifest(num_samples=5, num_classes=3, image_size=(112, 96),
                 shards=[ShardInfo("train-000000.tar", 3, "ab" * 32), ShardInfo("train-000001.tar", 2, "cd" * 32)],
                 source="recordio:/x/train.rec", verification={"lfw": "lfw.bin"})
    m.save(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["format"] == "shardface-shards/1" and doc["image_size"] == [112, 96]
    assert doc["shards"][1] == {"path": "train-000001.tar", "num_samples": 2, "sha256": "cd" * 32}
    back = Manifest.load(tmp_path / "manifest.json")
    assert back == m and back.root == tmp_path
    assert back.shard_paths() == [tmp_path.resolve() / "train-000000.tar", tmp_path.resolve() / "train-000001.tar"]
    assert back.verification_paths() == {"lfw": tmp_path.resolve() / "lfw.bin"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left

    def broken(edit, match):
        d = json.loads(json.dumps(doc))
        edit(d)
        (tmp_path / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(ManifestError, match=match):
            Manifest.load(tmp_path)

    broken(lambda d: d["shards"][0].pop("sha256"), r"manifest.json: missing key 'shards\[0\].sha256'")
    broken(lambda d: d.update(format="other/2"), r"key 'format' is 'other/2'")
    broken(lambda d: d.update(num_samples=6), r"num_samples=6 but the shards hold 5")
    broken(lambda d: d["shards"][0].update(path="/abs/train.tar"), r"must be relative")
    broken(lambda d: d.update(num_classes="3"), r"key 'num_classes' is '3', expected int")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match=r"no manifest at .*nowhere"):
        Manifest.load(tmp_path / "nowhere")


def test_tar_writer_matches_tarfile_and_jpeg_size_matches_pil(tmp_path):
    members = [("000000000.jpg", make_jpeg(0, 12)), ("000000000.cls", b"0000000003"), ("x.jpg", b"")]
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            tar.addfile(info, io.BytesIO(data))
    sha = write_tar_atomic(tmp_path / "a.tar", members)
    assert (tmp_path / "a.tar").read_bytes() == reference.getvalue()
    assert sha == hashlib.sha256(reference.getvalue()).hexdigest()

    rgb = np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    variants = {"baseline": dict(), "progressive": dict(progressive=True), "exif": dict(exif=b"Exif\0\0" + bytes(300)),
                "subsampled": dict(subsampling=2, quality=50)}
    for what, kw in variants.items():
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="JPEG", **kw)
        assert jpeg_size(out.getvalue()) == (21, 34), what
    gray = io.BytesIO()
    Image.fromarray(rgb[:, :, 0]).save(gray, format="JPEG")
    assert jpeg_size(gray.getvalue()) == (21, 34)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    assert jpeg_size(png.getvalue()) is None and jpeg_size(b"\xff\xd8\xff") is None


def test_global_shuffle_keeps_every_sample_once(tmp_path):
    samples = dataset()
    m = write_shards(MemorySource(samples, C), tmp_path, samples_per_shard=PER_SHARD, progress=False)
    assert [s.num_samples for s in m.shards] == [15, 15, 15, 15]
    assert (m.num_samples, m.num_classes, m.image_size) == (N, C, (12, 12))
    got = read_dataset(Manifest.load(tmp_path))
    assert [k for k, _, _ in got] == [f"{k:09d}" for k in range(N)]
    index_of = {jpg: i for i, (jpg, _) in enumerate(samples)}
    order = [index_of[jpg] for _, jpg, _ in got]
    assert sorted(order) == list(range(N))  # every sample exactly once
    assert all(label == samples[i][1] for i, (_, _, label) in zip(order, got))
    # Really shuffled: position and source index are unrelated, and each shard draws from
    # the whole source rather than from one block of it.
    assert abs(np.corrcoef(np.arange(N), order)[0, 1]) < 0.4
    assert all(min(order[s:s + 15]) < N // 3 and max(order[s:s + 15]) >= 2 * N // 3 for s in range(0, N, 15))
    other = write_shards(MemorySource(samples, C), tmp_path / "seed1", samples_per_shard=PER_SHARD,
                         seed=1, progress=False)
    assert [index_of[j] for _, j, _ in read_dataset(other)] != order
    for path, info in zip(m.shard_paths(), m.shards):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds
    samples = dataset(20)
    m = write_shards(MemorySource(samples, C), tmp_path, samples_per_shard=8, progress=False)
    urls = [str(p) for p in m.shard_paths()]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted((s["jpg"], int(s["cls"])) for s in got) == sorted(samples)
    decoded = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert all(isinstance(s["cls"], int) and s["jpg"].size == (12, 12) for s in decoded)


def test_crash_then_resume_matches_uninterrupted_run(tmp_path):
    samples = dataset()
    clean = write_shards(MemorySource(samples, C), tmp_path / "clean", samples_per_shard=PER_SHARD, progress=False)

    out = tmp_path / "resumed"
    crashing = MemorySource(samples, C, fail_at=37)  # in the third shard (reads 30..44)
    with pytest.raises(SampleError, match=r"reading sample \d+ of source 'memory:test' failed: "
                                          r"RuntimeError: simulated crash"):
        write_shards(crashing, out, samples_per_shard=PER_SHARD, progress=False)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["train-000000.tar", "train-000001.tar"]  # no manifest, no half shard

    # A kill leaves a half-written temp file behind: it must not count as a shard.
    (out / "train-000002.tar.tmp").write_bytes((out / "train-000000.tar").read_bytes()[:5000])
    source = MemorySource(samples, C)
    resumed = write_shards(source, out, samples_per_shard=PER_SHARD, progress=False)
    assert len(source.reads) == N - 30  # only the two unfinished shards were read
    assert resumed == clean
    for a, b in zip(clean.shard_paths(), resumed.shard_paths()):
        assert a.read_bytes() == b.read_bytes()
    assert not list(out.glob("*.tmp"))

    # Damaged shards (truncated: a half-written file; one flipped byte) are rewritten, good ones kept.
    p1, p3 = resumed.shard_paths()[1], resumed.shard_paths()[3]
    p1.write_bytes(p1.read_bytes()[: p1.stat().st_size // 2])
    data = bytearray(p3.read_bytes())
    data[2000] ^= 0xFF
    p3.write_bytes(bytes(data))
    source = MemorySource(samples, C)
    again = write_shards(source, out, samples_per_shard=PER_SHARD, progress=False)
    assert len(source.reads) == 30 and again == clean
    assert p1.read_bytes() == clean.shard_paths()[1].read_bytes()

    # Other arguments: every shard is rewritten and the old extra shards are removed. While
    # that runs, no manifest describes the half-replaced directory.
    with pytest.raises(SampleError):
        write_shards(MemorySource(samples, C, fail_at=35), out, samples_per_shard=30, progress=False)
    assert not (out / "manifest.json").exists()
    fewer = write_shards(MemorySource(samples, C), out, samples_per_shard=30, progress=False)
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    assert sorted(j for _, j, _ in read_dataset(fewer)) == sorted(j for j, _ in samples)


def test_bad_inputs_give_clear_errors(tmp_path):
    samples = dataset(10)
    bad_label = samples[:4] + [(samples[4][0], C)] + samples[5:]
    with pytest.raises(ValueError, match=rf"label {C} of sample 4 .* is outside \[0, {C}\): is num_classes right"):
        write_shards(MemorySource(bad_label, C), tmp_path / "a", samples_per_shard=100, progress=False)
    png = io.BytesIO()
    Image.new("RGB", (12, 12)).save(png, format="PNG")
    with pytest.raises(SampleError, match=r"sample 3 of source 'memory:test' is not a JPEG .*\(PNG 12x12\)"):
        write_shards(MemorySource(samples[:3] + [(png.getvalue(), 0)], C), tmp_path / "b", progress=False)
    mixed = samples[:5] + [(make_jpeg(99, size=(16, 12)), 0)]
    with pytest.raises(ValueError, match=r"is 16x12 but earlier samples are 12x12"):
        write_shards(MemorySource(mixed, C), tmp_path / "c", samples_per_shard=100, progress=False)
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        write_shards(MemorySource(samples, C), tmp_path / "d", samples_per_shard=0)
    with pytest.raises(FileNotFoundError, match=r"verification set 'lfw': .*lfw.bin does not exist"):
        write_shards(MemorySource(samples, C), tmp_path / "e", verification={"lfw": "lfw.bin"})
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="choose an empty output directory"):
        write_shards(MemorySource(samples, C), tmp_path / "f", progress=False)


def test_inspect_finds_missing_corrupt_and_undecodable(tmp_path):
    samples = dataset(40)
    jpeg = samples[7][0]
    truncated = jpeg[: jpeg.find(b"\xff\xda") + 30]  # a valid header, then the scan data stops
    samples[7] = (truncated, samples[7][1])
    (tmp_path / "lfw.bin").write_bytes(b"pairs")
    m = write_shards(MemorySource(samples, C), tmp_path, samples_per_shard=10, progress=False,
                     verification={"lfw": "lfw.bin"})
    report = inspect_dataset(tmp_path, progress=False)
    assert report.ok and report.samples_read == 40
    assert report.shard_counts == {f"train-{s:06d}.tar": 10 for s in range(4)}
    deep = inspect_dataset(tmp_path, deep=True, progress=False)
    assert not deep.ok and deep.problem_counts == {"undecodable": 1}
    bad_key = next(k for k, j, _ in read_dataset(m) if j == truncated)
    assert [(p.shard, p.key) for p in deep.undecodable] == [(m.shards[int(bad_key) // 10].path, bad_key)]

    paths = m.shard_paths()
    os.unlink(paths[1])
    data = bytearray(paths[2].read_bytes())
    data[3000] ^= 0x01
    paths[2].write_bytes(bytes(data))
    (tmp_path / "train-000004.tar.tmp").write_bytes(b"half")
    os.unlink(tmp_path / "lfw.bin")
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["num_classes"] = 2  # now some labels are out of range
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    labels_over = sum(1 for s in (0, 2, 3) for _, _, c in read_shard(paths[s]) if int(c) >= 2)

    report = inspect_dataset(tmp_path, progress=False)
    assert report.missing_shards == ["train-000001.tar"]
    assert report.checksum_mismatches == ["train-000002.tar"]
    assert report.leftovers == ["train-000004.tar.tmp"]
    assert report.missing_verification == ["lfw"]
    assert report.problem_counts["label_out_of_range"] == labels_over > 0
    assert all(int(p.detail.split()[1]) >= 2 for p in report.label_violations)
    text = report.format()
    assert "1 missing shards: train-000001.tar" in text and "PROBLEMS FOUND" in text
    assert "1 checksum mismatches: train-000002.tar" in text
    quick = inspect_dataset(tmp_path, verify=False, progress=False)
    assert quick.missing_shards == ["train-000001.tar"] and quick.checksum_mismatches == []
