"""Verification pair sets in insightface's ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2·P encoded images, pair
``i`` being ``bins[2i]`` and ``bins[2i+1]``; ``issame_list`` holds P booleans. insightface
reads it with ``pickle.load(f, encoding='bytes')``, so the images are ``bytes`` objects.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .manifest import atomic_write_bytes

# Globals a genuine .bin may reference: Python 3 pickles of bytes at protocol < 3 go through
# _codecs.encode, and some published sets hold numpy arrays or numpy bools. Nothing else is
# needed, so nothing else is loaded (a pickle can otherwise run arbitrary code).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


@dataclass
class VerificationSet:
    """Decoded pairs: ``images[2i]`` and ``images[2i+1]`` form pair ``i``."""

    images: torch.Tensor
    """uint8 [2P, 3, H, W], RGB."""
    issame: torch.Tensor
    """bool [P]: whether pair ``i`` shows one identity."""
    name: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"VerificationSet {self.name}: images must be uint8 [2P, 3, H, W], "
                             f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.issame.dim() != 1 or self.images.shape[0] != 2 * self.issame.shape[0]:
            raise ValueError(f"VerificationSet {self.name}: {self.images.shape[0]} images for "
                             f"{self.issame.shape[0]} pairs; there must be exactly two images per pair")

    @property
    def num_pairs(self) -> int:
        """Number of pairs P."""
        return int(self.issame.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return int(self.images.shape[2]), int(self.images.shape[3])


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals a verification .bin can contain."""

    def __init__(self, file: io.BufferedReader, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"{self._path}: refers to {module}.{name}, which a verification .bin never needs "
                f"(it holds only encoded images and booleans); refusing to load it")
        return super().find_class(module, name)


def write_bin(path: str | os.PathLike, jpegs: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write pairs to ``path`` in insightface's .bin layout, atomically (temp file + rename)."""
    path = Path(path)
    if len(jpegs) != 2 * len(issame):
        raise ValueError(f"write_bin({path}): {len(jpegs)} images for {len(issame)} pairs; "
                         f"give two images per pair (pair i = images 2i, 2i+1)")
    bins = []
    for k, b in enumerate(jpegs):
        if not isinstance(b, (bytes, bytearray, memoryview)) or len(b) == 0:
            raise TypeError(f"write_bin({path}): image {k} is {type(b).__name__} of length "
                            f"{len(b) if hasattr(b, '__len__') else '?'}; give non-empty encoded image bytes")
        bins.append(bytes(b))
    flags = [bool(s) for s in issame]
    path.parent.mkdir(parents=True, exist_ok=True)
    # Protocol 4 keeps the file readable by every Python 3 insightface install.
    atomic_write_bytes(path, pickle.dumps((bins, flags), protocol=4))


def check_bin(path: str | os.PathLike) -> int:
    """Read a .bin's pairs without decoding its images; returns the number of pairs (raises like load_bin)."""
    _, issame = _read_pickle(Path(path))
    return len(issame)


def _read_pickle(path: Path) -> tuple[list, list]:
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} does not exist; check the path "
                                f"(or the manifest's 'verification' entry that names it)")
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        if "refusing" in str(e):
            raise
        raise ValueError(f"{path} is not a valid verification .bin (unpickling failed: {e}); "
                         f"re-download or regenerate it") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a valid verification .bin (truncated or corrupt: {e!r}); "
                         f"re-download or regenerate it") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not hasattr(issame, "__len__"):
        raise ValueError(f"{path}: expected (list of encoded images, list of bools), got "
                         f"({type(bins).__name__}, {type(issame).__name__})")
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin holds two images per pair")
    return list(bins), [bool(s) for s in issame]


def _decode(blob: object, path: Path, k: int, size: tuple[int, int] | None) -> np.ndarray:
    if isinstance(blob, np.ndarray):
        blob = blob.tobytes()
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"{path}: image {k} is a {type(blob).__name__}, not encoded image bytes")
    try:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: image {k} cannot be decoded ({e}); the file is corrupt, regenerate it") from e
    if size is not None and (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.array(img)  # a writable copy: torch.from_numpy wants one


def load_bin(path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
             name: str | None = None) -> VerificationSet:
    """Read and decode a .bin; images are resized to ``image_size`` (H, W) where they differ.

    Without ``image_size`` the first image's size is used for all. ``name`` defaults to
    the file name without its extension.
    """
    path = Path(path)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"load_bin({path}): image_size={image_size!r}; give (height, width) of positive ints")
    bins, issame = _read_pickle(path)
    if not bins:
        raise ValueError(f"{path}: the set holds no pairs")
    first = _decode(bins[0], path, 0, size)
    size = first.shape[:2]
    images = torch.empty((len(bins), 3, size[0], size[1]), dtype=torch.uint8)
    images[0] = torch.from_numpy(first).permute(2, 0, 1)
    for k in range(1, len(bins)):
        images[k] = torch.from_numpy(_decode(bins[k], path, k, size)).permute(2, 0, 1)
    return VerificationSet(images=images, issame=torch.tensor(issame, dtype=torch.bool),
                           name=name if name is not None else path.stem)


def verification_batches(vset: VerificationSet, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, horizontally flipped images)``, float32 [b, 3, H, W] in [-1, 1], in set order."""
    if batch_size < 1:
        raise ValueError(f"verification_batches: batch_size={batch_size}; must be >= 1")
    for start in range(0, vset.images.shape[0], batch_size):
        x = vset.images[start:start + batch_size].float().div_(127.5).sub_(1.0)
        yield x, x.flip(3)
