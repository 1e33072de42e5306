"""insightface .bin verification sets: writing, reading (their exact layout), batches, bad files."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.verification import VerificationSet, load_bin, verification_batches, write_bin
from shard_helpers import make_jpeg


def _jpegs(n: int, size: tuple[int, int] = (24, 20), seed: int = 0) -> list[bytes]:
    return [make_jpeg(seed * 1000 + i, size, quality=85) for i in range(n)]


def _decoded(jpeg: bytes) -> np.ndarray:
    """[3, H, W] uint8, decoded independently of the module under test."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1)


def test_write_then_load_round_trip(tmp_path):
    jpegs, issame = _jpegs(6), [True, False, True]
    path = tmp_path / "sub" / "pairs.bin"
    write_bin(path, jpegs, issame)
    vset = load_bin(path)
    assert vset.name == "pairs" and vset.num_pairs == 3 and vset.image_size == (24, 20)
    assert vset.images.dtype == torch.uint8 and vset.issame.dtype == torch.bool
    assert vset.issame.tolist() == issame
    for k, jpeg in enumerate(jpegs):
        assert np.array_equal(vset.images[k].numpy(), _decoded(jpeg))
    # The file is what insightface reads: a plain pickle of (list of bytes, list of bool).
    with open(path, "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert bins == jpegs and flags == issame
    assert not [p for p in os.listdir(tmp_path / "sub") if p != "pairs.bin"]  # no temp file left


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_reads_insightface_layout_including_numpy_variants(tmp_path, protocol):
    jpegs = _jpegs(4, seed=1)
    path = tmp_path / "lfw.bin"
    # As published sets are laid out: bytes (or uint8 buffers) in pair order, then the flags.
    bins = [jpegs[0], np.frombuffer(jpegs[1], dtype=np.uint8), jpegs[2], jpegs[3]]
    issame_list = [np.bool_(False), True]
    with open(path, "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=protocol)
    vset = load_bin(path, name="lfw")
    assert vset.name == "lfw" and vset.issame.tolist() == [False, True]
    for k, jpeg in enumerate(jpegs):
        assert np.array_equal(vset.images[k].numpy(), _decoded(jpeg))


def test_resizes_when_the_size_differs(tmp_path):
    jpegs = _jpegs(2, size=(30, 30))
    write_bin(tmp_path / "a.bin", jpegs, [True])
    vset = load_bin(tmp_path / "a.bin", image_size=(16, 12))
    assert tuple(vset.images.shape) == (2, 3, 16, 12)
    ref = np.asarray(Image.open(io.BytesIO(jpegs[1])).convert("RGB").resize((12, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(vset.images[1].numpy(), ref.transpose(2, 0, 1))
    assert load_bin(tmp_path / "a.bin", image_size=30).image_size == (30, 30)


def test_verification_batches_scale_and_flip():
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (10, 3, 4, 5), dtype=np.uint8))
    vset = VerificationSet(images=images, issame=torch.tensor([True, False, True, True, False]), name="t")
    batches = list(verification_batches(vset, batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    flipped = torch.cat([b[1] for b in batches])
    ref = images.numpy().astype(np.float64) / 255.0 * 2.0 - 1.0
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(flipped.numpy(), ref[..., ::-1], atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="batch_size"):
        next(verification_batches(vset, 0))


def test_missing_and_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(tmp_path / "nope.bin")

    good = tmp_path / "good.bin"
    write_bin(good, _jpegs(4), [True, False])
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match="truncated.bin"):
        load_bin(truncated)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match="garbage.bin"):
        load_bin(garbage)

    uneven = tmp_path / "uneven.bin"
    uneven.write_bytes(pickle.dumps((_jpegs(3), [True, False])))
    with pytest.raises(ValueError, match="3 images for 2 pairs"):
        load_bin(uneven)

    bad_image = tmp_path / "bad_image.bin"
    bad_image.write_bytes(pickle.dumps((_jpegs(1) + [b"\xff\xd8 not really a jpeg"], [True])))
    with pytest.raises(ValueError, match="image 1"):
        load_bin(bad_image)

    wrong_shape = tmp_path / "dict.bin"
    wrong_shape.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(ValueError, match="dict.bin"):
        load_bin(wrong_shape)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_pickles_that_reference_other_code(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(), b"x"], [True])))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_bin(path)


def test_write_bin_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="two images per pair"):
        write_bin(tmp_path / "x.bin", _jpegs(3), [True, False])
    with pytest.raises(TypeError, match="image 1"):
        write_bin(tmp_path / "x.bin", [b"abc", "text"], [True])
    assert not (tmp_path / "x.bin").exists()
