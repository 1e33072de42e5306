"""Tiny WebDataset shards written on the fly for the loader tests."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.formats.manifest import Manifest, ShardInfo


def make_jpeg(index: int, size: int = 16) -> bytes:
    """A JPEG with smooth structure that differs by ``index`` (so flips and mix-ups show)."""
    y, x = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(index)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    img = np.stack([x * 255 * a / size, y * 255 * b / size, (x + y) * 127 * c / size], -1)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=95)
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
