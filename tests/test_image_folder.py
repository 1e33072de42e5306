"""Image folders: labels from sorted identities, JPEG pass-through, re-encoding, bad files, workers."""
import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.convert import convert
from data_pipeline.image_folder import BadImageError, ImageFolderSource
from data_pipeline.manifest import Manifest
from data_pipeline.shards import SampleError
from shard_helpers import make_jpeg, read_dataset


def pixels(seed, mode="RGB"):
    shape = (12, 12, 3) if mode == "RGB" else (12, 12)
    # Smooth images, so JPEG error stays small enough to compare pixels.
    base = np.random.default_rng(seed).integers(40, 200, 3 if mode == "RGB" else 1)
    img = np.broadcast_to(base, (12, 12, base.size)).reshape(shape)
    return Image.fromarray(img.astype(np.uint8), mode)


def build_folder(root):
    """bob: 2 JPEGs; alice: a PNG and a grayscale JPEG; carol: 1 JPEG; empty/: nothing."""
    files = {}
    seed = 0
    for ident, names in {"bob": ["a.jpg", "b.JPEG"], "alice": ["x.png", "y.jpg"], "carol": ["z.jpg"]}.items():
        (root / ident).mkdir(parents=True)
        for name in names:
            path = root / ident / name
            if name == "x.png":
                pixels(5).save(path, format="PNG")
            elif ident == "alice":
                pixels(6, "L").save(path, format="JPEG")
            else:
                seed += 1
                path.write_bytes(make_jpeg(seed, 12))
            files[path] = path.read_bytes()
    (root / "empty").mkdir()
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "bob" / ".hidden.jpg").write_bytes(b"editor backup")
    return files


def test_labels_passthrough_and_reencoding(tmp_path):
    files = build_folder(tmp_path / "faces")
    source = ImageFolderSource(tmp_path / "faces", progress=False)
    assert source.identities == ["alice", "bob", "carol"] and source.num_classes == 3
    by_path = {p.relative_to(tmp_path / "faces").as_posix(): source[i] for i, p in enumerate(source.paths)}
    assert sorted(by_path) == ["alice/x.png", "alice/y.jpg", "bob/a.jpg", "bob/b.JPEG", "carol/z.jpg"]
    assert [by_path[k][1] for k in sorted(by_path)] == [0, 0, 1, 1, 2]
    for name in ("bob/a.jpg", "bob/b.JPEG", "carol/z.jpg"):  # RGB JPEGs: byte for byte
        assert by_path[name][0] == files[tmp_path / "faces" / name]
    for name, original in (("alice/x.png", pixels(5)), ("alice/y.jpg", pixels(6, "L").convert("RGB"))):
        im = Image.open(io.BytesIO(by_path[name][0]))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (12, 12))
        err = np.abs(np.asarray(im, np.int16) - np.asarray(original, np.int16)).max()
        assert err <= 3, (name, err)


def test_folder_to_shards_with_workers(tmp_path):
    build_folder(tmp_path / "faces")
    serial = convert("folder", tmp_path / "faces", tmp_path / "one", samples_per_shard=2, progress=False)
    parallel = convert("folder", tmp_path / "faces", tmp_path / "two", samples_per_shard=2, workers=2,
                       progress=False)
    assert parallel == serial and len(serial.shards) == 3
    for a, b in zip(serial.shard_paths(), parallel.shard_paths()):
        assert a.read_bytes() == b.read_bytes()
    source = ImageFolderSource(tmp_path / "faces", progress=False)
    assert sorted((j, lbl) for _, j, lbl in read_dataset(Manifest.load(tmp_path / "two"))) == \
        sorted(source[i] for i in range(len(source)))
    assert (tmp_path / "two" / "identities.txt").read_text().splitlines() == ["alice", "bob", "carol"]


def test_unreadable_images_error_or_are_skipped(tmp_path):
    build_folder(tmp_path / "faces")
    bad = tmp_path / "faces" / "bob" / "c.jpg"
    good = make_jpeg(1, 12)
    bad.write_bytes(good[: good.find(b"\xff\xda") + 30])  # truncated inside the scan data
    with pytest.raises(SampleError, match=r"cannot read image .*bob/c.jpg: .*skip_bad=True") as err:
        convert("folder", tmp_path / "faces", tmp_path / "out", progress=False)
    assert isinstance(err.value.__cause__, BadImageError)
    m = convert("folder", tmp_path / "faces", tmp_path / "out2", skip_bad=True, progress=False)
    assert m.num_samples == 5 and m.num_classes == 3
    assert (tmp_path / "out2" / "skipped_images.txt").read_text().startswith(f"{bad}\t")
    source = ImageFolderSource(tmp_path / "faces", skip_bad=True, progress=False)
    assert [p for p, _ in source.skipped] == [bad]
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "face.jpg").write_bytes(good)
    with pytest.raises(ValueError, match=r"holds images directly \(face.jpg, ...\): expected root/<identity>"):
        ImageFolderSource(tmp_path / "loose")
    with pytest.raises(ValueError, match="unknown conversion kind 'zip'"):
        convert("zip", tmp_path / "faces", tmp_path / "out3")
