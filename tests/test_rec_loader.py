"""Training straight from insightface RecordIO: layouts, exact epochs against the shard loaders,
ranks, workers, resume without re-reading, bad records, the DALI path on CPU, a tiny training run."""
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.bad_data import BadSampleError
from data_pipeline.convert import convert
from data_pipeline.formats.recordio import (
    RecordIOError,
    frame_record,
    pack_payload,
    read_index,
    write_recordio,
)
from data_pipeline.loaders import build_loader
from data_pipeline.loaders.rec_loader import RecordFile, epoch_permutation
from data_pipeline.sources.rec_dataset import RecDataset, open_dataset
from shard_helpers import make_jpeg

REPO = Path(__file__).resolve().parent.parent
N, CLASSES = 37, 6  # the last class has no images: the header says 6, the labels reach 4


def samples(n=N, size=(12, 12)):
    labels = np.random.default_rng(5).integers(0, CLASSES - 1, n)
    return [(make_jpeg(i, size), int(labels[i])) for i in range(n)]


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    """The same images as an MS1M-layout folder and as a plain (shuffled, headerless) .rec."""
    root = tmp_path_factory.mktemp("rec")
    data = samples()
    (root / "ms1m").mkdir()
    write_recordio(root / "ms1m" / "train.rec", data, num_classes=CLASSES, label_arrays=True)
    (root / "ms1m" / "lfw.bin").write_bytes(b"pairs")
    (root / "plain").mkdir()
    order = np.random.default_rng(9).permutation(N)
    write_recordio(root / "plain" / "train.rec", [data[i] for i in order], identity_header=False)
    (root / "plain" / "property").write_text(f"{CLASSES},12,12\n")
    return root, data


def pixels(batch_images):
    """Model input [-1, 1] back to uint8 bytes per image (lossless for the loaders' mapping)."""
    u8 = torch.round((batch_images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return [bytes(x.numpy().tobytes()) for x in u8]


def epoch_samples(loader, epoch=0, strip_padding=True):
    loader.set_epoch(epoch)
    out = []
    for images, labels in loader:
        out += list(zip(pixels(images), labels.tolist()))
    return out[:len(out) - loader.last_batch_padding] if strip_padding else out


def test_layouts_give_samples_classes_size_and_bins(recs, tmp_path):
    root, data = recs
    ms1m = open_dataset(root / "ms1m")
    plain = open_dataset(root / "plain" / "train.rec")
    assert isinstance(ms1m, RecDataset) and (ms1m.layout, plain.layout) == ("header", "plain")
    assert (ms1m.num_samples, ms1m.num_classes, ms1m.image_size) == (N, CLASSES, (12, 12))
    assert (plain.num_samples, plain.num_classes) == (N, CLASSES)  # from the property file
    assert ms1m.verification_paths() == {"lfw": root / "ms1m" / "lfw.bin"}
    assert ms1m.keys.tolist() == list(range(1, N + 1))  # header and identity records left out
    assert sorted(RecordFile(ms1m).read(i) for i in range(N)) == sorted((j, float(lbl)) for j, lbl in data)
    # Without a property file: data.num_classes, else one pass over the labels.
    bare = tmp_path / "bare.rec"
    write_recordio(bare, data[:9], identity_header=False)
    assert RecDataset.open(bare, num_classes=8).num_classes == 8
    assert RecDataset.open(bare).num_classes == max(lbl for _, lbl in data[:9]) + 1
    assert RecDataset.open(bare, scan_labels=False).num_classes is None
    # Disagreements and damage are one clear line.
    (tmp_path / "property").write_text("7,12,12")
    hdr = tmp_path / "train.rec"
    write_recordio(hdr, data[:9], num_classes=CLASSES)
    with pytest.raises(RecordIOError, match=r"property says 7 classes, the header record .* says 6"):
        RecDataset.open(hdr)
    (tmp_path / "property").write_text("seven")
    with pytest.raises(RecordIOError, match=r"property: expected '<classes>,<height>,<width>'"):
        RecDataset.open(hdr)
    (tmp_path / "property").unlink()
    with pytest.raises(RecordIOError, match=r"data.num_classes=9 but .* holds 6 classes"):
        RecDataset.open(hdr, num_classes=9)
    (tmp_path / "bad.idx").write_text("0\t0\n1\tx\n")
    with pytest.raises(RecordIOError, match=r"bad.idx: expected 'key<TAB>offset'"):
        RecDataset.open(hdr, tmp_path / "bad.idx")


@pytest.mark.parametrize("layout", ["ms1m", "plain"])
def test_exact_epoch_is_the_shard_loaders_multiset_over_two_ranks(recs, tmp_path, layout):
    root, data = recs
    shards = convert("recordio", root / layout / "train.rec", tmp_path / "shards", samples_per_shard=8,
                     progress=False)
    kw = dict(world_size=2, batch_size=5, mode="exact", seed=3, flip=False, workers=0)
    got, ref = Counter(), Counter()
    for rank in range(2):
        rec = build_loader("rec", root / layout, rank=rank, **kw)
        wds = build_loader("webdataset", shards, rank=rank, **kw)
        assert (len(rec), rec.last_batch_padding, rec.num_classes) == (len(wds), wds.last_batch_padding, CLASSES)
        mine = epoch_samples(rec)
        got.update(mine)
        ref.update(epoch_samples(wds))
    assert got == ref and sum(got.values()) == N and max(got.values()) == 1  # disjoint and covering
    assert sorted(lbl for _, lbl in got) == sorted(lbl for _, lbl in data)


def test_permutation_is_global_and_new_each_epoch(recs):
    root, _ = recs
    loaders = [build_loader("rec", root / "ms1m", rank=r, world_size=2, batch_size=4, mode="exact", seed=1,
                            flip=False, workers=0) for r in range(2)]
    e0 = [set(epoch_samples(x, 0)) for x in loaders]
    e1 = [set(epoch_samples(x, 1)) for x in loaders]
    assert e0[0] | e0[1] == e1[0] | e1[1] and not e0[0] & e0[1]
    assert e0[0] != e1[0]  # rank 0 reads other records in epoch 1, not its old part reshuffled
    # Rank 0's part is not a contiguous range of the file (as DALI's reader would read it).
    file = RecordFile(loaders[0].data)
    by_file_order = {}
    for i in range(N):
        _, lbl = file.read(i)
        by_file_order[i] = int(lbl)
    perm = epoch_permutation(N, 1, 0)
    assert sorted(perm.tolist()) == list(range(N))
    part = sorted(perm[:N // 2].tolist())
    assert part != list(range(part[0], part[0] + len(part)))
    assert Counter(lbl for _, lbl in e0[0]) == Counter(by_file_order[i] for i in perm[:N // 2].tolist())


def test_workers_give_the_same_batches_across_epochs(recs):
    root, _ = recs
    kw = dict(rank=1, world_size=2, batch_size=4, mode="exact", seed=2)
    inline = build_loader("rec", root / "plain", workers=0, **kw)
    pooled = build_loader("rec", root / "plain", workers=2, **kw)
    for e in range(2):
        assert epoch_samples(pooled, e, strip_padding=False) == epoch_samples(inline, e, strip_padding=False)
    flipped = epoch_samples(inline, 0)
    plain = epoch_samples(build_loader("rec", root / "plain", workers=0, flip=False, **kw), 0)
    assert [lbl for _, lbl in flipped] == [lbl for _, lbl in plain] and flipped != plain


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_equals_uninterrupted_and_reads_nothing_consumed(recs, monkeypatch, mode):
    root, _ = recs
    kw = dict(rank=0, world_size=2, batch_size=3, mode=mode, seed=4, workers=0)
    full = build_loader("rec", root / "ms1m", **kw)
    full.set_epoch(1)
    expected = [(pixels(x), y.tolist()) for x, y in full]
    first = build_loader("rec", root / "ms1m", **kw)
    first.set_epoch(1)
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    reads = []
    original = RecordFile.read
    monkeypatch.setattr(RecordFile, "read", lambda self, i: reads.append(i) or original(self, i))
    resumed = build_loader("rec", root / "ms1m", **kw)
    resumed.load_state_dict(state)
    rest = [(pixels(x), y.tolist()) for x, y in resumed]
    assert rest == expected[2:]
    assert len(reads) == (len(expected) - 2) * 3
    resumed.set_epoch(2)
    assert [(pixels(x), y.tolist()) for x, y in resumed] != expected


def test_resampled_length_and_determinism(recs):
    root, _ = recs
    kw = dict(rank=0, world_size=2, batch_size=4, workers=0, epoch_samples=20)
    a = build_loader("rec", root / "ms1m", seed=1, **kw)
    assert len(a) == 3
    assert epoch_samples(a, 0) == epoch_samples(build_loader("rec", root / "ms1m", seed=1, **kw), 0)
    assert epoch_samples(a, 0) != epoch_samples(a, 1)


def damaged_rec(folder: Path, data):
    """A plain .rec: record 3 is not a JPEG, record 6 has a broken frame, record 8's label is too big."""
    folder.mkdir()
    data = list(data)
    data[8] = (data[8][0], CLASSES + 3)
    rec, idx = write_recordio(folder / "train.rec", data, identity_header=False)
    raw = bytearray(rec.read_bytes())
    offsets = read_index(idx)
    raw[offsets[6]:offsets[6] + 4] = b"\0\0\0\0"
    broken = frame_record(pack_payload(float(data[3][1]), b"\xff\xd8 not really a jpeg"))
    raw = raw[:offsets[3]] + broken + raw[offsets[4]:]
    shift = len(broken) - (offsets[4] - offsets[3])
    rec.write_bytes(bytes(raw))
    idx.write_text("".join(f"{k}\t{o + (shift if k > 3 else 0)}\n" for k, o in sorted(offsets.items())))
    (folder / "property").write_text(f"{CLASSES},12,12")
    return rec


@pytest.mark.parametrize("kind", ["rec", "dali"])
def test_bad_records_are_skipped_and_counted_or_raise_when_strict(recs, tmp_path, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    _, data = recs
    rec = damaged_rec(tmp_path / "bad", data[:12])
    kw = dict(rank=0, world_size=1, batch_size=4, mode="exact", workers=1, seed=0, flip=False)
    loader = build_loader(kind, rec, **kw)
    batches = [(x, y) for x, y in loader]
    assert [len(y) for _, y in batches] == [4, 4, 4]
    stats = loader.stats
    assert (stats["corrupt_jpeg"], stats["corrupt_record"], stats["bad_label"]) == (1, 1, 1)
    assert sum(stats.values()) == 3
    good = {lbl for i, (_, lbl) in enumerate(data[:12]) if i not in (3, 6, 8)}
    assert {int(v) for _, y in batches for v in y} <= good
    with pytest.raises(BadSampleError, match=r"(corrupt_jpeg|corrupt_record|bad_label).*train.rec.*key [368]"):
        list(build_loader(kind, rec, strict=True, **kw))


def test_dali_on_cpu_matches_the_python_reader_and_resumes(recs):
    pytest.importorskip("nvidia.dali")
    root, _ = recs
    kw = dict(rank=1, world_size=2, batch_size=4, mode="exact", seed=6, workers=1)
    dali = build_loader("dali", root / "ms1m", **kw)
    python = build_loader("rec", root / "ms1m", **kw)
    assert type(dali).__name__ == "RecDaliLoader" and len(dali) == len(python)
    for e in range(2):
        dali.set_epoch(e)
        python.set_epoch(e)
        # Read side by side: the Python reader's worker forks while a DALI pipeline runs.
        pairs = list(zip(dali, python))
        assert len(pairs) == len(python)
        for (xd, yd), (xp, yp) in pairs:
            assert torch.equal(yd, yp) and xd.shape == xp.shape and xd.dtype == torch.float32
            assert (xd - xp).abs().mean() < 0.02  # libjpeg decoders; flips are the same
    dali.set_epoch(1)
    expected = [y.tolist() for _, y in dali]
    it = iter(dali)
    next(it)
    state = dali.state_dict()
    again = build_loader("dali", root / "ms1m", **kw)
    again.load_state_dict(state)
    assert [y.tolist() for _, y in again] == expected[1:]


def test_wrong_kind_for_the_data_is_one_clear_error(recs, tmp_path):
    root, _ = recs
    with pytest.raises(ValueError, match=r"train.rec is RecordIO: loader kind 'webdataset' .* kind='rec'"):
        build_loader("webdataset", root / "ms1m", rank=0, world_size=1, batch_size=2)
    shards = convert("recordio", root / "ms1m", tmp_path / "s", samples_per_shard=16, progress=False)
    with pytest.raises(ValueError, match=r"kind 'rec' reads an insightface train.rec.*shard directory"):
        build_loader("rec", shards, rank=0, world_size=1, batch_size=2)


@pytest.mark.slow
def test_shardface_train_from_a_rec(tmp_path):
    data = tmp_path / "faces"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_recordio(data / "train.rec", [(make_jpeg(i, (56, 56)), int(rng.integers(0, 8))) for i in range(48)],
                   num_classes=8)
    sets = ["max_steps=4", "device=cpu", f"data.manifest={data}", "data.loader=rec", "data.batch_size=8",
            "data.workers=1", "data.mode=exact", "data.image_size=56", "model.backbone=iresnet_tiny",
            "model.embedding_size=16", "eval.bins=[]", "log.wandb=false", "log.progress=false",
            f"output_dir={tmp_path / 'run'}", "checkpoint.every_steps=4", "checkpoint.export=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--nproc-per-node", "1",
                          *[x for s in sets for x in ("--set", s)]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "steps 4 (6 per epoch" in run.stdout, run.stdout  # 48 records / 8 per batch, read from the .rec
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir(), run.stderr[-2000:]


def test_sample_transform_runs_after_decode_with_its_own_seed(recs):
    root, _ = recs
    kw = dict(rank=0, world_size=1, batch_size=4, mode="exact", seed=2, workers=0)
    base = build_loader("rec", root / "plain", **kw)
    hooked = build_loader("rec", root / "plain", **kw)
    seen = []

    def invert(image, rng):
        seen.append(rng.integers(1 << 30))
        return 255 - image

    hooked.reader.sample_transform = invert
    for (xb, yb), (xh, yh) in zip(base, hooked):
        assert torch.equal(yb, yh) and torch.allclose(xh, -xb, atol=1e-6)
    assert len(seen) == len(base) * 4 and len(set(seen)) == len(seen)


def test_dalis_own_recordio_reader_keeps_file_order_whatever_the_index_order(tmp_path):
    """Why the DALI path feeds records itself: fn.readers.mxnet sorts the .idx offsets."""
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn
    rec, idx = write_recordio(tmp_path / "t.rec", [(make_jpeg(i, 12), i) for i in range(6)], identity_header=False)
    offsets = read_index(idx)
    (tmp_path / "perm.idx").write_text("".join(f"{k}\t{offsets[k]}\n" for k in [4, 1, 5, 0, 3, 2]))

    @dali.pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipe():
        return fn.readers.mxnet(path=[str(rec)], index_path=[str(tmp_path / "perm.idx")])[1]

    p = pipe()
    p.build()
    (labels,) = p.run()
    assert [float(np.asarray(labels.at(i))[0]) for i in range(6)] == [0, 1, 2, 3, 4, 5]


FORK_AFTER_DALI = r'''
import gc, sys
from data_pipeline.bad_data import BadSampleError
from data_pipeline.loaders import build_loader
from data_pipeline.loaders.rec_loader import RecLoader
from data_pipeline.sources.rec_dataset import open_dataset

good, bad, phases = sys.argv[1:4]
kw = dict(rank=0, world_size=1, batch_size=4, mode="exact", seed=0, flip=False)
gc.disable()  # nothing is collected in this process unless asked


collected = []


def collect(image, rng):
    if not collected:  # a worker's first collection, which would otherwise come at any allocation
        collected.append(gc.collect())
    return image


def plain_epoch(tag):
    loader = RecLoader(open_dataset(good), workers=1, strict=False, device="cpu", epoch_samples=None,
                       sample_transform=collect, **kw)
    print(tag, sum(len(y) for _, y in loader), flush=True)


if "1" in phases:  # a pipeline up, its epoch half read, held only by garbage (an iterator in a cycle)
    it = iter(build_loader("dali", good, workers=2, **kw))
    next(it)
    cycle = [it]
    cycle.append(cycle)
    del it, cycle
    plain_epoch("garbage")
if "2" in phases:  # an epoch ended by an error, its traceback (and the epoch's frames) garbage
    try:
        list(build_loader("dali", bad, workers=2, strict=True, **kw))
    except BadSampleError as e:
        kept = [e]
        kept.append(kept)
    del kept
    plain_epoch("failed")
if "3" in phases:  # a pipeline running while the plain loader starts its worker
    for _ in zip(build_loader("dali", good, workers=2, **kw), range(1)):
        plain_epoch("running")
'''


def test_a_plain_loader_forks_safely_after_dali_pipelines(recs, tmp_path):
    """A DataLoader worker forked while a DALI pipeline is up but unreachable (or kept by a
    traceback) used to finalise it in the child and wait there forever for DALI's threads."""
    pytest.importorskip("nvidia.dali")
    root, data = recs
    bad = damaged_rec(tmp_path / "bad", data[:12])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    try:
        run = subprocess.run([sys.executable, "-c", FORK_AFTER_DALI, str(root / "plain"), str(bad), "123"],
                             env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung after {e.output!r}: a forked worker waits on a DALI pipeline")
    assert run.returncode == 0, run.stderr[-3000:]
    n = -(-N // 4) * 4  # an exact epoch of batches of 4, padded
    assert run.stdout.split() == ["garbage", str(n), "failed", str(n), "running", str(n)]
