"""The synthetic face generator: determinism, identity structure, open-set split, dataset files."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline.manifest import Manifest
from data_pipeline.synthetic import SynthConfig, SyntheticFaces, heldout_faces, render_jpegs
from data_pipeline.synthetic_dataset import heldout_pairs, make_synthetic_dataset
from data_pipeline.verification import load_bin


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_same_seed_same_bytes_in_any_order_and_after_pickling():
    cfg = SynthConfig(num_identities=5, images_per_identity=3, image_size=48, seed=7)
    a = SyntheticFaces(cfg)
    forward = [a[i] for i in range(len(a))]
    b = SyntheticFaces(SynthConfig(num_identities=5, images_per_identity=3, image_size=48, seed=7))
    backward = {i: b[i] for i in reversed(range(len(b)))}
    c = pickle.loads(pickle.dumps(a))
    assert forward == [backward[i] for i in range(len(a))]
    assert [c[i] for i in (11, 0, 4)] == [forward[11], forward[0], forward[4]]
    assert [lab for _, lab in forward] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    other = SyntheticFaces(SynthConfig(num_identities=5, images_per_identity=3, image_size=48, seed=8))
    assert other[0][0] != forward[0][0]


def test_an_image_depends_only_on_its_identity_and_sample():
    """Identity 3 looks the same whichever list of identities renders it."""
    cfg = SynthConfig(num_identities=4, images_per_identity=2, image_size=48)
    full = SyntheticFaces(cfg)
    subset = SyntheticFaces(cfg, identities=[3, 1])
    assert subset[0] == (full[6][0], 0)
    assert subset[3] == (full[3][0], 1)
    assert subset.locate(1) == (0, 3, 1)


def test_images_are_jpegs_of_the_configured_size():
    src = SyntheticFaces(SynthConfig(num_identities=2, images_per_identity=2, image_size=(64, 48)))
    jpeg, _ = src[3]
    img = Image.open(io.BytesIO(jpeg))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 64)
    with pytest.raises(IndexError, match="outside"):
        src[4]


def _pixel_distances(difficulty: float) -> tuple[float, float]:
    """Mean RMS distance of the face region between images of one identity and of different ones."""
    ids, per = 10, 5
    src = SyntheticFaces(SynthConfig(num_identities=ids, images_per_identity=per, image_size=48,
                                     difficulty=difficulty, seed=3))
    x = np.stack([_decode(src[i][0])[12:36, 12:36].astype(np.float64).ravel() for i in range(len(src))])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    label = np.repeat(np.arange(ids), per)
    same = label[:, None] == label[None]
    return d[same & ~np.eye(len(x), dtype=bool)].mean(), d[~same].mean()


def test_identities_differ_more_than_samples_and_difficulty_closes_the_gap():
    ratios = []
    for difficulty in (0.0, SynthConfig().difficulty, 1.0):
        within, between = _pixel_distances(difficulty)
        ratios.append(within / between)
    assert ratios[1] < 0.8, ratios  # the default still separates identities in plain pixels
    assert ratios[0] < ratios[1] < ratios[2], ratios


def test_identity_parameters_are_fixed_per_identity_and_differ_between_identities():
    cfg = SynthConfig(num_identities=3, images_per_identity=2)
    a, b = SyntheticFaces(cfg), SyntheticFaces(cfg)
    assert a.identity_params(2) == b.identity_params(2)
    assert a.identity_params(1) != a.identity_params(2)
    nz0, _ = a.nuisance(1, 0)
    nz1, _ = a.nuisance(1, 1)
    assert nz0 != nz1


def test_heldout_identities_are_disjoint_and_pairs_are_labelled_right():
    cfg = SynthConfig(num_identities=30, images_per_identity=4, heldout_identities=8, heldout_pairs=41)
    train, held = SyntheticFaces(cfg), heldout_faces(cfg)
    assert set(train.identities).isdisjoint(held.identities)
    assert min(held.identities) == cfg.num_identities and len(held.identities) == 8
    indices, issame = heldout_pairs(cfg)
    assert len(indices) == 82 and len(issame) == 41 and sum(issame) == 20
    for k, same in enumerate(issame):
        (_, ia, sa), (_, ib, sb) = held.locate(indices[2 * k]), held.locate(indices[2 * k + 1])
        assert ia in held.identities and ib in held.identities
        assert (ia == ib) == same
        if same:
            assert sa != sb  # two different photos, never the same image twice
    # Every consecutive couple holds one same and one different pair: 10-fold splits stay balanced.
    assert all(issame[2 * k] != issame[2 * k + 1] for k in range(20))


def test_config_validation_names_the_field():
    assert SynthConfig(image_size=64).image_size == (64, 64)
    for kwargs, field in [({"difficulty": 1.5}, "difficulty"), ({"image_size": (16, 16)}, "image_size"),
                          ({"num_identities": 0}, "num_identities"), ({"jpeg_quality": 100}, "jpeg_quality"),
                          ({"heldout_identities": 1}, "heldout_identities"),
                          ({"images_per_identity": 1}, "images_per_identity")]:
        with pytest.raises(ValueError, match=field):
            SynthConfig(**kwargs)
    with pytest.raises(ValueError, match="duplicates"):
        SyntheticFaces(SynthConfig(), identities=[1, 1])


def _dataset_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".bin", ".png")}


def test_dataset_files_are_identical_for_one_or_two_workers(tmp_path):
    cfg = SynthConfig(num_identities=6, images_per_identity=4, heldout_identities=4, heldout_pairs=6,
                      image_size=40, seed=5)
    m1 = make_synthetic_dataset(cfg, tmp_path / "w1", samples_per_shard=10, workers=1, progress=False)
    m2 = make_synthetic_dataset(cfg, tmp_path / "w2", samples_per_shard=10, workers=2, progress=False)
    files = _dataset_bytes(tmp_path / "w1")
    assert files == _dataset_bytes(tmp_path / "w2")
    assert set(files) == {"train-000000.tar", "train-000001.tar", "train-000002.tar",
                          "synthetic_heldout.bin", "contact_sheet.png"}
    assert m1.to_json() == m2.to_json()

    loaded = Manifest.load(tmp_path / "w1")
    assert loaded.num_classes == 6 and loaded.num_samples == 24 and loaded.image_size == (40, 40)
    assert loaded.verification == {"synthetic_heldout": "synthetic_heldout.bin"}

    # The shards hold exactly the training images, labelled by identity.
    train = SyntheticFaces(cfg)
    expected = {train[i] for i in range(len(train))}
    found = set()
    for path in loaded.shard_paths():
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                found.add((data, int(members[name[:-4] + ".cls"])))
    assert found == expected

    # The .bin holds the held-out pair images in pair order.
    vset = load_bin(loaded.verification_paths()["synthetic_heldout"])
    indices, issame = heldout_pairs(cfg)
    held = heldout_faces(cfg)
    assert vset.issame.tolist() == issame
    for k in (0, 5, 11):
        assert np.array_equal(vset.images[k].permute(1, 2, 0).numpy(), _decode(held[indices[k]][0]))

    sheet = Image.open(tmp_path / "w1" / "contact_sheet.png")
    assert sheet.size == (4 * 40 + 3 * 2, 6 * 40 + 5 * 2)


def test_render_jpegs_matches_direct_indexing():
    src = SyntheticFaces(SynthConfig(num_identities=3, images_per_identity=2, image_size=40))
    assert render_jpegs(src, [5, 0, 3], workers=1, progress=False) == [src[5][0], src[0][0], src[3][0]]
    with pytest.raises(ValueError, match="workers"):
        render_jpegs(src, [0], workers=0)
