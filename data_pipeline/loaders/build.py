"""``build_loader``: one factory for the webdataset, DALI and random-tensor loaders.

Every loader yields, per epoch, ``(images float32 [B, 3, H, W] in [-1, 1], labels int64 [B])``
(see :class:`data_pipeline.loader_base.Loader` for the rest of the contract).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

from ..bad_data import REASONS, BadSampleError
from ..formats.manifest import Manifest
from ..sources.rec_dataset import RecDataset, open_dataset
from ..storage.byte_streams import RemoteOptions, is_url
from .augment import Augment
from .kinds import LOADER_ALIASES, LOADER_KINDS, MODES, LoaderKind
from .loader_base import Loader

KINDS = LOADER_KINDS

__all__ = ["KINDS", "MODES", "REASONS", "BadSampleError", "Loader", "LoaderKind", "build_loader"]


def build_loader(kind: str, manifest: Manifest | str | os.PathLike | None, *, rank: int,
                 world_size: int, batch_size: int, workers: int = 2, seed: int = 0,
                 mode: str = "resampled", shuffle_buffer: int = 1000, flip: bool = True,
                 strict: bool = False, device: str = "cpu", epoch_samples: int | None = None,
                 local_rank: int | None = None, barrier: Callable[[], None] | None = None,
                 any_rank: Callable[[bool], bool] | None = None, dali_verify: str = "header",
                 remote: RemoteOptions | None = None, augment: Augment | None = None,
                 **random_tensors: Any) -> Loader:
    """A loader of ``kind`` over ``manifest`` (a :class:`Manifest`, its file or its directory).

    The manifest and its shards may be URLs (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``),
    read as ``remote`` says (a loaded :class:`Manifest` carries its own).
    ``manifest`` may also be an insightface RecordIO ``train.rec`` (or its folder, or a
    :class:`~data_pipeline.rec_dataset.RecDataset`): ``kind="rec"`` reads it in Python,
    ``kind="dali"`` decodes it with DALI (see :mod:`data_pipeline.rec_loader`).

    ``mode="resampled"``: ``epoch_samples`` (default: the manifest's count) samples per epoch
    over all ranks, drawn from shards resampled with replacement; ``mode="exact"``: every
    sample once per epoch over all ranks, the last batch of a rank padded with repeats
    (``loader.last_batch_padding`` of them). ``random_tensors`` accepts ``manifest=None`` with
    ``num_samples``, ``num_classes`` and ``image_size`` keywords (the deprecated name
    ``synthetic`` still selects it).

    DALI only: ``local_rank`` and ``barrier`` (every rank calls it) let local rank 0 of each
    node write the index files while the others wait; ``any_rank(flag)`` (a collective OR)
    makes the ranks agree on ``dali_verify`` (``header`` or ``decode``, see
    :mod:`data_pipeline.dali_loader`).

    ``augment`` (webdataset, DALI and rec, over shards or a ``.rec``): the per-sample transforms and their probabilities
    (:class:`data_pipeline.augment.Augment`; None: none, only ``flip``).
    """
    if kind in LOADER_ALIASES:
        warnings.warn(f"loader kind {kind!r} is deprecated: use {LOADER_ALIASES[kind]!r}", FutureWarning, stacklevel=2)
        kind = LOADER_ALIASES[kind]
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
    if random_tensors and kind != "random_tensors":
        raise TypeError(f"build_loader() got unexpected keywords {sorted(random_tensors)} "
                        f"for kind={kind!r} (only 'random_tensors' takes them)")
    common: dict[str, Any] = dict(rank=rank, world_size=world_size, batch_size=batch_size, workers=workers,
                  seed=seed, mode=mode, flip=flip, device=device, epoch_samples=epoch_samples)

    if kind == "random_tensors":
        from .tensor_loader import RandomTensorLoader
        if manifest is not None:
            m = _load(manifest, remote)
            random_tensors = {"num_samples": m.num_samples, "num_classes": m.num_classes,
                              "image_size": m.image_size, **random_tensors}
        return RandomTensorLoader(**common, **random_tensors)

    m = _load(manifest, remote)
    if kind == "rec" or isinstance(m, RecDataset):
        from .rec_loader import build_rec_loader
        return build_rec_loader(kind, m, strict=strict, augment=augment, **common)
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


def _load(manifest: Manifest | RecDataset | str | os.PathLike | None,
          remote: RemoteOptions | None = None) -> Manifest | RecDataset:
    if manifest is None:
        raise ValueError("this loader needs a manifest (a Manifest, manifest.json or its "
                         "directory, or a RecordIO train.rec); only kind='random_tensors' runs without one")
    if isinstance(manifest, (Manifest, RecDataset)):
        return manifest
    if is_url(manifest):
        return Manifest.load(manifest, remote)
    m = open_dataset(manifest)
    if isinstance(m, Manifest) and remote is not None:
        m.remote = remote
    return m
