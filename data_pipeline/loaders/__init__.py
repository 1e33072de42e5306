"""Loaders: shards (or a .rec, or nothing) in, ``(images, labels)`` batches out.

:func:`build_loader` picks the loader of a kind (:mod:`.kinds`); :mod:`.loader_base` is the
contract they share, :mod:`.epoch_plan` the per-rank split, :mod:`.augment` the transforms.
"""
from .build import KINDS, MODES, REASONS, BadSampleError, Loader, LoaderKind, build_loader

__all__ = ["KINDS", "MODES", "REASONS", "BadSampleError", "Loader", "LoaderKind", "build_loader"]
