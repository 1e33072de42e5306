"""Helpers for the shard tests: distinct small JPEGs, an in-memory source, a plain tar reader."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpeg(seed: int, size: tuple[int, int] = (12, 12)) -> bytes:
    """A noise JPEG whose bytes differ for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


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
