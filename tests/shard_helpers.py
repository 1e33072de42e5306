"""Shard and JPEG fixtures of the data tests, in one place.

``make_jpeg`` (distinct small JPEGs), ``write_dataset`` (tiny WebDataset shards and their
manifest, written on the fly), ``pil_reference`` (a sample decoded by PIL), ``MemorySource``
(an in-memory ``SampleSource``), ``read_shard`` / ``read_dataset`` (a plain tarfile reader).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.manifest import Manifest, ShardInfo


def make_jpeg(index: int, size: int | tuple[int, int] = 16, quality: int = 95) -> bytes:
    """A JPEG with smooth structure whose pixels (and bytes) differ by ``index`` (so flips and
    mix-ups show); ``size``: the side, or ``(height, width)``."""
    h, w = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(index)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    img = np.stack([x * 255 * a / w, y * 255 * b / h, (x / w + y / h) * 127 * c], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one file to ``tar``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(root: Path, shard_sizes: list[int], num_classes: int | None = None,
                  size: int = 16, label_of=None, members=None) -> Manifest:
    """Shards ``train-%06d.tar`` with the given sizes and a manifest; sample ``i`` has key ``%09d``.

    ``label_of(i)`` gives labels (default ``i % num_classes``); ``members(i, jpg, cls)`` may
    return the ``(name, bytes)`` list actually written for sample ``i`` (to make bad data).
    """
    root.mkdir(parents=True, exist_ok=True)
    total = sum(shard_sizes)
    num_classes = num_classes or total
    label_of = label_of or (lambda i: i % num_classes)
    infos, i = [], 0
    for s, n in enumerate(shard_sizes):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(n):
                jpg, cls = make_jpeg(i, size), f"{label_of(i):010d}".encode()
                parts = members(i, jpg, cls) if members else [(f"{i:09d}.jpg", jpg),
                                                               (f"{i:09d}.cls", cls)]
                for name, data in parts:
                    add_member(tar, name, data)
                i += 1
        infos.append(ShardInfo(path.name, n, hashlib.sha256(path.read_bytes()).hexdigest()))
    m = Manifest(num_samples=total, num_classes=num_classes, image_size=(size, size),
                 shards=infos, source="test")
    m.save(root)
    return m


def pil_reference(index: int, size: int = 16) -> np.ndarray:
    """Sample ``index``'s image decoded by PIL and normalised to [-1, 1], CHW float64."""
    arr = np.asarray(Image.open(io.BytesIO(make_jpeg(index, size))).convert("RGB"), np.float64)
    return ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


class MemorySource:
    """A SampleSource over a list of (jpeg, label); ``fail_at`` makes the k-th read raise."""

    def __init__(self, samples: list[tuple[bytes, int]], num_classes: int, fail_at: int | None = None,
                 name: str = "memory:test") -> None:
        self.samples, self.num_classes, self.name = samples, num_classes, name
        self.fail_at = fail_at
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        if self.fail_at is not None and len(self.reads) == self.fail_at:
            raise RuntimeError("simulated crash")
        self.reads.append(i)
        return self.samples[i]


def read_shard(path: Path) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg bytes, cls bytes) of every sample in a tar, in tar order, with tarfile alone."""
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key][ext] = tar.extractfile(info).read()
    assert all(set(members[k]) == {"jpg", "cls"} for k in order), members
    return [(k, members[k]["jpg"], members[k]["cls"]) for k in order]


def read_dataset(manifest) -> list[tuple[str, bytes, int]]:
    """(key, jpeg, label) of every sample of a manifest's shards, in shard order."""
    out = []
    for path in manifest.shard_paths():
        for key, jpg, cls in read_shard(path):
            assert len(cls) == 10 and cls.isdigit(), cls
            out.append((key, jpg, int(cls)))
    return out
