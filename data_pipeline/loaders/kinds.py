"""The names of the loader kinds and epoch modes, in one place for the loaders and the config.

Kept free of heavy imports: :mod:`train.config` reads these types (``data.loader`` and
``data.mode`` are these ``Literal`` types) without importing torch.
"""
from __future__ import annotations

import typing
from typing import Literal

LoaderKind = Literal["webdataset", "dali", "random_tensors", "rec"]
"""webdataset: tar shards decoded with PIL; dali: the same shards (or an insightface .rec)
decoded by NVIDIA DALI; random_tensors: random images and labels held in memory (no files, no
decode); rec: an insightface train.rec read by index and decoded with PIL."""
LOADER_KINDS: tuple[str, ...] = typing.get_args(LoaderKind)
LOADER_ALIASES = {"synthetic": "random_tensors"}
"""Deprecated loader names and the kinds they now mean ("synthetic" was easily confused with the
synthetic-face datasets of ``shardface data synth``, which the webdataset and DALI loaders read)."""

EpochMode = Literal["resampled", "exact"]
"""resampled: shards drawn with replacement, a fixed number of samples per epoch;
exact: every sample once per epoch."""
MODES: tuple[str, ...] = typing.get_args(EpochMode)
