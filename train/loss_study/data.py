"""Data of the loss study: training shards, a labelled held-out set, and the small geometry set.

The verification ``.bin`` holds pairs without identities; compactness and separation need
labels, so the study renders images of the held-out identities (never trained on) with
:class:`~data_pipeline.synthetic.SyntheticFaces` from the dataset's own ``synthetic.json``.
Every artefact is cached in the study folder and rebuilt only when its settings change.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from data_pipeline.formats.manifest import Manifest
from data_pipeline.synthetic import SynthConfig, SyntheticFaces, render_jpegs
from data_pipeline.synthetic.dataset import CONFIG_FILE, make_synthetic_dataset

from .jobs import write_json_atomic

READY_FILE = "study_ready.json"


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def ensure_synthetic_dataset(cfg: SynthConfig, folder: Path, samples_per_shard: int) -> Manifest:
    """The dataset of ``cfg`` in ``folder``, rendered unless a finished one with the same config is there."""
    ready = folder / READY_FILE
    wanted = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as they read back
    if ready.is_file() and json.loads(ready.read_text()) == wanted:
        return Manifest.load(folder / "manifest.json")
    manifest = make_synthetic_dataset(cfg, folder, samples_per_shard=samples_per_shard, workers=_workers())
    write_json_atomic(ready, wanted)
    return manifest


def load_manifest(data: Path) -> tuple[Path, Manifest]:
    """(manifest path, manifest) of a dataset folder or manifest file, with a clear error if missing."""
    path = data / "manifest.json" if data.is_dir() else data
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no manifest.json there; make one with `shardface data synth` "
                                "or `shardface data convert`, or leave --data out to let the study make its own")
    return path.resolve(), Manifest.load(path)


def synthetic_config_of(data_dir: Path) -> Optional[SynthConfig]:
    """The SynthConfig a synthetic dataset was made with (its ``synthetic.json``), None for other data."""
    path = data_dir / CONFIG_FILE
    if not path.is_file():
        return None
    return SynthConfig(**json.loads(path.read_text()))


def decode_images(jpegs: Sequence[bytes], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, 3, H, W] of JPEG bytes, resized to ``size`` (H, W) where they differ."""
    out = torch.empty((len(jpegs), 3, size[0], size[1]), dtype=torch.uint8)
    for k, blob in enumerate(jpegs):
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        if (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out[k] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return out


def labelled_images(cfg: SynthConfig, identities: Sequence[int], samples: Sequence[int], size: tuple[int, int],
                    cache: Path, label: str) -> tuple[torch.Tensor, np.ndarray]:
    """Images ``samples`` of each global identity in ``identities`` (label = position), cached in ``cache``.

    Sample numbers may exceed ``cfg.images_per_identity``: they are further renders of the same
    faces, new poses and lighting.
    """
    key = json.dumps({"cfg": asdict(cfg), "identities": list(map(int, identities)), "samples": list(samples),
                      "size": list(size)}, sort_keys=True)
    if cache.is_file():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                return torch.from_numpy(saved["images"]), saved["labels"]
    per = max(samples) + 1
    more = SynthConfig(**{**asdict(cfg), "images_per_identity": per, "heldout_pairs": 0})
    source = SyntheticFaces(more, list(identities), name=label)
    indices = [k * per + j for k in range(len(identities)) for j in samples]
    images = decode_images(render_jpegs(source, indices, workers=_workers(), label=label), size)
    labels = np.repeat(np.arange(len(identities)), len(samples))
    tmp = cache.with_name(f".{cache.stem}.tmp.npz")
    np.savez(tmp, images=images.numpy(), labels=labels, key=np.array(key))
    tmp.replace(cache)
    return images, labels


def heldout_labelled_set(data_dir: Path, image_size: tuple[int, int], per_identity: int, cache: Path
                         ) -> Optional[tuple[torch.Tensor, np.ndarray]]:
    """Labelled images of the dataset's held-out identities, or None when the data are not synthetic."""
    cfg = synthetic_config_of(data_dir)
    if cfg is None or cfg.heldout_identities < 2:
        return None
    samples = range(min(per_identity, cfg.images_per_identity))
    return labelled_images(cfg, cfg.heldout_range, list(samples), image_size, cache,
                           f"rendering {cfg.heldout_identities} held-out identities x {len(samples)} images")
