"""The distractor protocol on synthetic faces: held-out identities searched among never-seen strangers.

From a :class:`~data_pipeline.synthetic.SynthConfig` (a data set's ``synthetic.json``):

- **enrolled**: image 0 of each held-out identity (``cfg.heldout_range``, never trained on);
- **probes**: images 1..P of the same identities (other poses, lighting, occlusions);
- **distractors**: image 0 of identities numbered after the held-out ones, one image per
  identity; they are in neither the training set nor the held-out pairs.

Everything is a function of the config, so two models are compared on the same images.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline.synthetic import SynthConfig, SyntheticFaces, render_jpegs

from .distractors import DEFAULT_SIZES, distractor_curve
from .verification import embed_pairs

CONFIG_FILE = "synthetic.json"


@dataclass(frozen=True)
class IdentificationSplit:
    """Which synthetic images play which part (indices into the two sources)."""

    heldout: SyntheticFaces
    """The held-out identities: enrolled and probe images."""
    enrolled: list[int]
    probes: list[int]
    labels_enrolled: np.ndarray
    labels_probes: np.ndarray
    strangers: SyntheticFaces | None
    """One image per distractor identity (None without distractors)."""
    distractors: list[int]


def load_synth_config(data_dir: str | Path) -> SynthConfig:
    """The generator config of a data set written by ``shardface data synth`` (its ``synthetic.json``)."""
    path = Path(data_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a data set written by `shardface data synth`")
    return SynthConfig(**json.loads(path.read_text()))


def identification_split(cfg: SynthConfig, probes_per_identity: int = 3, distractors: int = 0,
                         identities: int | None = None) -> IdentificationSplit:
    """Enrolled, probe and distractor images of ``cfg``'s held-out identities (the first ``identities``)."""
    if cfg.heldout_identities == 0:
        raise ValueError("the data set has no held-out identities (heldout_identities=0): nothing to identify")
    if not 1 <= probes_per_identity <= cfg.images_per_identity - 1:
        raise ValueError(f"probes_per_identity={probes_per_identity} must lie in [1, {cfg.images_per_identity - 1}] "
                         f"(images per identity minus the enrolled one)")
    if distractors < 0:
        raise ValueError(f"distractors={distractors} must be >= 0")
    count = cfg.heldout_identities if identities is None else min(identities, cfg.heldout_identities)
    ids = range(cfg.num_identities, cfg.num_identities + count)
    ipi = cfg.images_per_identity
    heldout = SyntheticFaces(cfg, ids, name="synthetic_heldout")
    enrolled = [k * ipi for k in range(count)]
    probes = [k * ipi + s for k in range(count) for s in range(1, probes_per_identity + 1)]
    first_stranger = cfg.num_identities + cfg.heldout_identities
    strangers = (SyntheticFaces(cfg, range(first_stranger, first_stranger + distractors), name="synthetic_distractors")
                 if distractors else None)
    return IdentificationSplit(heldout, enrolled, probes, np.asarray(ids, dtype=np.int64),
                               np.repeat(np.asarray(ids, dtype=np.int64), probes_per_identity),
                               strangers, [k * ipi for k in range(distractors)])


def _decode(jpeg: bytes, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, mirrored images) in [-1, 1] from uint8 ``[N, 3, S, S]``."""
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].float().div_(127.5).sub_(1.0)
        yield x, x.flip(3)


@torch.no_grad()
def embed_rendered(model: nn.Module, source: SyntheticFaces, indices: Sequence[int], batch_size: int = 256,
                   device: str | torch.device = "cpu", workers: int = 1, block: int = 4096,
                   progress: bool = True) -> np.ndarray:
    """Unit embeddings (image + flip) of ``source[i]`` for each index, rendered and embedded ``block`` at a time."""
    size = int(getattr(model, "image_size", 112))
    out = []
    for lo in range(0, len(indices), block):
        part = list(indices[lo:lo + block])
        # A spawned pool costs about a second to start: not worth it for a few hundred images.
        jpegs = render_jpegs(source, part, workers=workers if len(part) >= 512 else 1, progress=progress,
                             label=f"rendering {source.name} {lo + len(part)}/{len(indices)}")
        images = torch.stack([_decode(j, size) for j in jpegs])

        plain, flipped = embed_pairs(model, _batches(images, batch_size), device=device)
        emb = torch.nn.functional.normalize(torch.from_numpy(plain + flipped), dim=1)
        out.append(emb.numpy().astype(np.float32))
    return np.concatenate(out)


def evaluate_synthetic_identification(model: nn.Module, cfg: SynthConfig, sizes: Sequence[int] = DEFAULT_SIZES,
                                      probes_per_identity: int = 3, identities: int | None = None,
                                      distractor_features: np.ndarray | None = None, batch_size: int = 256,
                                      device: str | torch.device = "cpu", workers: int = 1,
                                      progress: bool = True) -> dict[str, Any]:
    """:func:`distractor_curve` of ``model`` on ``cfg``'s held-out identities.

    Distractors are rendered strangers unless ``distractor_features`` (unit rows, e.g. a folder
    embedded with ``shardface embed``) are given.
    """
    need = max(sizes) if sizes else 0
    rendered = 0 if distractor_features is not None else need
    split = identification_split(cfg, probes_per_identity, rendered, identities)
    kw = {"batch_size": batch_size, "device": device, "workers": workers, "progress": progress}
    enrolled = embed_rendered(model, split.heldout, split.enrolled, **kw)
    probes = embed_rendered(model, split.heldout, split.probes, **kw)
    if distractor_features is not None:
        pool = np.asarray(distractor_features, dtype=np.float32)
        if pool.ndim != 2 or pool.shape[1] != enrolled.shape[1]:
            raise ValueError(f"distractor features of shape {pool.shape} do not fit the model's "
                             f"{enrolled.shape[1]}-dimensional embeddings")
    elif split.strangers is not None:
        pool = embed_rendered(model, split.strangers, split.distractors, **kw)
    else:
        pool = None
    curve = distractor_curve(probes, split.labels_probes, enrolled, split.labels_enrolled, pool, sizes,
                             device=str(device))
    curve["probes_per_identity"] = probes_per_identity
    return curve
