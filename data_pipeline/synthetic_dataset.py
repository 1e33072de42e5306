"""Write the synthetic data set to disk: training shards, held-out verification pairs, contact sheet.

The split is open-set, like face recognition benchmarks: training uses identities
``[0, num_identities)``; the verification pairs in ``synthetic_heldout.bin`` come from the
``heldout_identities`` after them, which the model never sees.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import Manifest, atomic_write_bytes
from .shards import write_shards
from .synthetic import SynthConfig, SyntheticFaces, heldout_faces, render_jpegs
from .verification import write_bin

HELDOUT_NAME = "synthetic_heldout"
HELDOUT_FILE = "synthetic_heldout.bin"  # the file stem is the set's name, however it is passed
CONTACT_SHEET_FILE = "contact_sheet.png"
CONFIG_FILE = "synthetic.json"
_PAIR_STREAM = 0x9A1


def heldout_pairs(cfg: SynthConfig) -> tuple[list[int], list[bool]]:
    """Indices into :func:`heldout_faces` of the 2·P pair images (pair i = 2i, 2i+1) and issame.

    Same and different pairs alternate in random order within each consecutive two, so
    every contiguous fold (insightface's 10-fold protocol) is balanced.
    """
    rng = np.random.default_rng([cfg.seed, _PAIR_STREAM])
    ipi, num_ids = cfg.images_per_identity, cfg.heldout_identities
    kinds: list[bool] = []
    for _ in range(cfg.heldout_pairs // 2):
        kinds.extend((True, False) if rng.random() < 0.5 else (False, True))
    if cfg.heldout_pairs % 2:
        kinds.append(False)
    indices: list[int] = []
    for same in kinds:
        if same:
            ident = int(rng.integers(num_ids))
            a, b = rng.choice(ipi, size=2, replace=False)
            indices += [ident * ipi + int(a), ident * ipi + int(b)]
        else:
            i, j = rng.choice(num_ids, size=2, replace=False)
            indices += [int(i) * ipi + int(rng.integers(ipi)), int(j) * ipi + int(rng.integers(ipi))]
    return indices, kinds


def contact_sheet(source: SyntheticFaces, rows: int = 8, cols: int = 8, gap: int = 2,
                  thumb: int | None = None) -> Image.Image:
    """A grid of decoded images: row r shows samples 0..cols-1 of the source's r-th identity."""
    rows = min(rows, source.num_classes)
    cols = min(cols, source.cfg.images_per_identity)
    h, w = source.cfg.image_size
    if thumb is not None:
        h, w = thumb, round(thumb * w / h)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for r in range(rows):
        for c in range(cols):
            img = Image.open(io.BytesIO(source[r * source.cfg.images_per_identity + c][0])).convert("RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.LANCZOS)
            sheet.paste(img, (c * (w + gap), r * (h + gap)))
    return sheet


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_synthetic_dataset(cfg: SynthConfig, out_dir: str | os.PathLike, samples_per_shard: int = 10000,
                           workers: int = 1, progress: bool = True) -> Manifest:
    """Render ``cfg`` into ``out_dir``: shards + manifest, ``synthetic_heldout.bin``, ``contact_sheet.png``.

    Everything is a function of ``cfg``: the same config gives the same bytes whatever
    ``workers`` is, and a re-run keeps the shards already written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(asdict(cfg), indent=1) + "\n").encode())
    verification = {}
    if cfg.heldout_pairs > 0:
        indices, issame = heldout_pairs(cfg)
        jpegs = render_jpegs(heldout_faces(cfg), indices, workers, progress,
                             label=f"rendering {cfg.heldout_pairs} held-out pairs")
        write_bin(out / HELDOUT_FILE, jpegs, issame)
        verification[HELDOUT_NAME] = HELDOUT_FILE
    train = SyntheticFaces(cfg)
    manifest = write_shards(train, out, samples_per_shard=samples_per_shard, seed=cfg.seed, workers=workers,
                            progress=progress, verification=verification, num_classes=train.num_classes)
    atomic_write_bytes(out / CONTACT_SHEET_FILE, _png_bytes(contact_sheet(train)))
    return manifest
