"""insightface RecordIO: framing against hand-built bytes and DALI's reader, conversion to shards."""
import struct

import numpy as np
import pytest

from data_pipeline.convert import convert
from data_pipeline.recordio import (
    RecordIOError,
    RecordIOSource,
    frame_record,
    pack_payload,
    read_index,
    rebuild_index,
    write_recordio,
)
from shard_helpers import make_jpeg, read_dataset

MAGIC = struct.pack("<I", 0xCED7230A)


def lrec(cflag, length):
    return MAGIC + struct.pack("<I", cflag << 29 | length)


def jpeg_with_aligned_magic(seed):
    """A JPEG followed by a trailer holding the RecordIO magic at a 4-byte-aligned offset."""
    jpeg = make_jpeg(seed, 12)
    jpeg += b"\0" * (-len(jpeg) % 4)
    return jpeg + MAGIC + b"tail"


def samples_and_classes(n=30, classes=6):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, classes - 1, n)  # the last class has no images
    samples = [(make_jpeg(i, 12), int(labels[i])) for i in range(n)]
    samples[4] = (jpeg_with_aligned_magic(100), samples[4][1])
    return samples, classes


def test_framing_and_header_match_hand_built_bytes():
    assert frame_record(b"hello") == lrec(0, 5) + b"hello" + b"\0\0\0"
    # The writer splits at aligned magic numbers (first/middle/last parts), never at unaligned ones.
    data = b"abcd" + MAGIC + b"efgh" + MAGIC + b"z"
    assert frame_record(data) == lrec(1, 4) + b"abcd" + lrec(2, 4) + b"efgh" + lrec(3, 1) + b"z\0\0\0"
    assert frame_record(b"ab" + MAGIC + b"cd") == lrec(0, 8) + b"ab" + MAGIC + b"cd"
    assert pack_payload(3, b"JPEG", id=7) == struct.pack("<IfQQ", 0, 3.0, 7, 0) + b"JPEG"
    assert pack_payload([2.0, 5.0], b"J") == struct.pack("<IfQQff", 2, 0.0, 0, 0, 2.0, 5.0) + b"J"


def test_reader_agrees_with_dali(tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    samples, classes = samples_and_classes()
    rec, idx = write_recordio(tmp_path / "train.rec", samples, num_classes=classes)
    source = RecordIOSource(rec, progress=False)
    n = len(samples)
    assert (len(source), source.num_classes) == (n, classes)
    # One record was split in two parts where its JPEG trailer holds the magic number.
    assert rec.read_bytes().count(MAGIC) == (1 + n + classes) + 1

    @dali.pipeline_def(batch_size=1 + n + classes, num_threads=1, device_id=None)
    def pipe():
        data, labels = fn.readers.mxnet(path=[str(rec)], index_path=[str(idx)])
        return data, labels

    p = pipe()
    p.build()
    data, labels = p.run()
    records = [(bytes(np.asarray(data.at(i)).tobytes()), tuple(np.asarray(labels.at(i)).tolist()))
               for i in range(len(data))]
    images = sorted((d, lab[0]) for d, lab in records if d)
    assert images == sorted((source[i][0], float(source[i][1])) for i in range(n))
    assert images == sorted((j, float(lbl)) for j, lbl in samples)
    # Header (a, b): images are keys 1..a-1, identities a..b-1 with their image-key ranges.
    counts = np.bincount([lbl for _, lbl in samples], minlength=classes)
    starts = 1 + np.concatenate([[0], np.cumsum(counts)])
    expected = [(n + 1.0, n + 1.0 + classes)] + [(float(starts[c]), float(starts[c + 1])) for c in range(classes)]
    assert sorted(lab for d, lab in records if not d) == sorted(expected)


def test_recordio_to_shards_bit_for_bit(tmp_path):
    samples, classes = samples_and_classes()
    src = tmp_path / "ms1m"
    src.mkdir()
    write_recordio(src / "train.rec", samples, num_classes=classes, label_arrays=True)
    (src / "lfw.bin").write_bytes(b"verification pairs")
    m = convert("recordio", src, tmp_path / "out", samples_per_shard=8, progress=False)
    assert (m.num_samples, m.num_classes, len(m.shards)) == (len(samples), classes, 4)
    assert m.source == f"recordio:{(src / 'train.rec').resolve()}"
    got = read_dataset(m)
    assert sorted((j, lbl) for _, j, lbl in got) == sorted(samples)
    assert m.verification == {"lfw": "lfw.bin"}
    assert m.verification_paths()["lfw"].read_bytes() == b"verification pairs"


def test_without_header_classes_come_from_labels(tmp_path):
    samples, _ = samples_and_classes(12, classes=6)
    rec, _ = write_recordio(tmp_path / "t.rec", samples, identity_header=False, label_arrays=True)
    source = RecordIOSource(rec, progress=False)
    assert source.num_classes == max(lbl for _, lbl in samples) + 1
    assert [source[i] for i in range(len(source))] == samples  # no header: file order kept


def test_bad_inputs_give_clear_errors(tmp_path):
    samples, classes = samples_and_classes(10)
    rec, idx = write_recordio(tmp_path / "train.rec", samples, num_classes=classes)
    index = read_index(idx)
    idx.rename(tmp_path / "saved.idx")
    with pytest.raises(FileNotFoundError, match=r"train.idx does not exist: pass idx_path=.*rebuild_index"):
        RecordIOSource(rec)
    assert read_index(rebuild_index(rec, progress=False)) == index
    assert len(RecordIOSource(rec, tmp_path / "saved.idx", progress=False)) == 10

    (tmp_path / "bad.idx").write_text("0\t0\n1 eleven\n")
    with pytest.raises(RecordIOError, match=r"bad.idx:2: expected 'key<TAB>offset'"):
        RecordIOSource(rec, tmp_path / "bad.idx")

    raw = bytearray(rec.read_bytes())
    raw[index[3]:index[3] + 4] = b"\0\0\0\0"
    (tmp_path / "magic.rec").write_bytes(bytes(raw))
    source = RecordIOSource(tmp_path / "magic.rec", idx, progress=False)
    with pytest.raises(RecordIOError, match=rf"record key 3\): bad magic 0x00000000 at byte {index[3]}"):
        source[2]

    (tmp_path / "cut.rec").write_bytes(rec.read_bytes()[: index[5] + 40])
    source = RecordIOSource(tmp_path / "cut.rec", idx, progress=False)
    assert source[3] == samples_sorted(samples)[3]
    with pytest.raises(RecordIOError, match=r"record key 5\): truncated record"):
        source[4]

    write_recordio(tmp_path / "few.rec", samples, num_classes=2)  # labels reach 4
    with pytest.raises(ValueError, match=r"label [2-4] of sample \d+ .* is outside \[0, 2\)"):
        convert("recordio", tmp_path / "few.rec", tmp_path / "out", progress=False)
    with pytest.raises(TypeError, match=r"unknown option\(s\) skip_bad"):
        convert("recordio", rec, tmp_path / "out", skip_bad=True)


def samples_sorted(samples):
    """The image order write_recordio uses with an identity header: grouped by label, stable."""
    return sorted(samples, key=lambda s: s[1])
