"""``build_loader``: one factory for the webdataset, DALI and synthetic loaders.

Every loader yields, per epoch, ``(images float32 [B, 3, H, W] in [-1, 1], labels int64 [B])``
(see :class:`data_pipeline.loader_base.Loader` for the rest of the contract).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from .augment import Augment
from .bad_data import REASONS, BadSampleError
from .loader_base import MODES, Loader
from .manifest import Manifest

KINDS = ("webdataset", "dali", "synthetic")

__all__ = ["KINDS", "MODES", "REASONS", "BadSampleError", "Loader", "build_loader"]


def build_loader(kind: str, manifest: Manifest | str | os.PathLike | None, *, rank: int,
                 world_size: int, batch_size: int, workers: int = 2, seed: int = 0,
                 mode: str = "resampled", shuffle_buffer: int = 1000, flip: bool = True,
                 strict: bool = False, device: str = "cpu", epoch_samples: int | None = None,
                 local_rank: int | None = None, barrier: Callable[[], None] | None = None,
                 any_rank: Callable[[bool], bool] | None = None, dali_verify: str = "header",
                 augment: Augment | None = None, **synthetic: Any) -> Loader:
    """A loader of ``kind`` over ``manifest`` (a :class:`Manifest`, its file or its directory).

    ``mode="resampled"``: ``epoch_samples`` (default: the manifest's count) samples per epoch
    over all ranks, drawn from shards resampled with replacement; ``mode="exact"``: every
    sample once per epoch over all ranks, the last batch of a rank padded with repeats
    (``loader.last_batch_padding`` of them). ``synthetic`` accepts ``manifest=None`` with
    ``num_samples``, ``num_classes`` and ``image_size`` keywords.

    DALI only: ``local_rank`` and ``barrier`` (every rank calls it) let local rank 0 of each
    node write the index files while the others wait; ``any_rank(flag)`` (a collective OR)
    makes the ranks agree on ``dali_verify`` (``header`` or ``decode``, see
    :mod:`data_pipeline.dali_loader`).

    ``augment`` (webdataset and DALI): the per-sample transforms and their probabilities
    (:class:`data_pipeline.augment.Augment`; None: none, only ``flip``).
    """
    if kind not in KINDS:
        raise ValueError(f"loader kind {kind!r} is unknown: choose one of {', '.join(KINDS)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: choose 'resampled' or 'exact'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0 reads in the training process)")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 or 1: no shuffle)")
    if epoch_samples is not None:
        if mode == "exact":
            raise ValueError(f"epoch_samples={epoch_samples} applies to mode='resampled' only: "
                             "an exact epoch is the whole dataset; drop it or use resampled")
        if epoch_samples < 1:
            raise ValueError(f"epoch_samples={epoch_samples} must be at least 1")
    if synthetic and kind != "synthetic":
        raise TypeError(f"build_loader() got unexpected keywords {sorted(synthetic)} "
                        f"for kind={kind!r} (only 'synthetic' takes them)")
    common = dict(rank=rank, world_size=world_size, batch_size=batch_size, workers=workers,
                  seed=seed, mode=mode, flip=flip, device=device, epoch_samples=epoch_samples)

    if kind == "synthetic":
        from .tensor_loader import SyntheticLoader
        if manifest is not None:
            m = _load(manifest)
            synthetic = {"num_samples": m.num_samples, "num_classes": m.num_classes,
                         "image_size": m.image_size, **synthetic}
        return SyntheticLoader(**common, **synthetic)

    m = _load(manifest)
    if m.num_samples < 1 or not m.shards:
        raise ValueError(f"the manifest at {m.root} lists no samples: nothing to load")
    if mode == "exact" and m.num_samples < world_size:
        raise ValueError(f"the dataset has {m.num_samples} samples, fewer than world_size="
                         f"{world_size}: an exact epoch needs at least one sample per rank")
    if kind == "webdataset":
        from .wds_loader import WebDatasetLoader
        return WebDatasetLoader(m, shuffle_buffer=shuffle_buffer, strict=strict, augment=augment, **common)
    from .dali_loader import DaliLoader
    return DaliLoader(m, shuffle_buffer=shuffle_buffer, strict=strict, local_rank=local_rank, barrier=barrier,
                      any_rank=any_rank, verify=dali_verify, augment=augment, **common)


def _load(manifest: Manifest | str | os.PathLike | None) -> Manifest:
    if manifest is None:
        raise ValueError("this loader needs a manifest (a Manifest, manifest.json or its "
                         "directory); only kind='synthetic' runs without one")
    return manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
