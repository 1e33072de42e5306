"""A built-in face data set: procedurally drawn identities, rendered on demand as JPEG.

An identity is a fixed set of face parameters drawn from (seed, identity); each image of it
draws pose, expression, lighting, blur, noise, occlusion and crop from
(seed, identity, sample). Image ``i`` of a :class:`SyntheticFaces` therefore depends on
nothing but those numbers, whatever the order or the process that renders it.
"""
from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..progress import Progress
from .params import FaceIdentity, Nuisance, sample_identity, sample_nuisance
from .render import render_face

DEFAULT_DIFFICULTY = 0.5
"""Default of :attr:`SynthConfig.difficulty` (see docs/synthetic.md for how it was chosen)."""

# Tags mixed into the seed so identity, nuisance and noise streams never coincide.
_IDENTITY_STREAM = 0x1D
_IMAGE_STREAM = 0x5A


@dataclass
class SynthConfig:
    """What to generate: how many identities and images, their size, and how hard they are."""

    num_identities: int = 1000
    """Training identities; they get the labels [0, num_identities)."""
    images_per_identity: int = 40
    """Images rendered per identity (training and held-out alike)."""
    heldout_identities: int = 200
    """Identities kept out of training, numbered after the training ones; 0 for none."""
    heldout_pairs: int = 2000
    """Verification pairs drawn from the held-out identities, half of them same-identity."""
    image_size: tuple[int, int] = (112, 112)
    """Output (height, width) in pixels; an int means a square."""
    difficulty: float = DEFAULT_DIFFICULTY
    """0..1: scales every nuisance factor up and draws identities closer to the average face."""
    seed: int = 0
    """Seeds every identity and image; two configs with the same seed share identities."""
    jpeg_quality: int = 90
    """JPEG quality (1..95) of the encoded images."""

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        for name in ("num_identities", "images_per_identity"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r}: must be an integer >= 1")
        for name in ("heldout_identities", "heldout_pairs", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"SynthConfig.{name}={getattr(self, name)!r}: must be an integer >= 0")
        if len(self.image_size) != 2 or not all(isinstance(v, int) and v >= 32 for v in self.image_size):
            raise ValueError(f"SynthConfig.image_size={self.image_size!r}: give (height, width) with both >= 32 "
                             f"(smaller faces lose their features)")
        if not 0.0 <= float(self.difficulty) <= 1.0:
            raise ValueError(f"SynthConfig.difficulty={self.difficulty!r}: must lie in [0, 1]")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"SynthConfig.jpeg_quality={self.jpeg_quality!r}: must be an integer in [1, 95]")
        if self.heldout_pairs > 0:
            if self.heldout_identities < 2:
                raise ValueError(f"SynthConfig.heldout_pairs={self.heldout_pairs} needs heldout_identities >= 2 "
                                 f"for different-identity pairs (got {self.heldout_identities})")
            if self.images_per_identity < 2:
                raise ValueError(f"SynthConfig.heldout_pairs={self.heldout_pairs} needs images_per_identity >= 2 "
                                 f"for same-identity pairs (got {self.images_per_identity})")

    @property
    def spread(self) -> float:
        """How far identities stray from the average face (1 at difficulty 0, 0.5 at 1)."""
        return 1.0 - 0.5 * float(self.difficulty)

    @property
    def nuisance_strength(self) -> float:
        """Scale of every per-image nuisance factor."""
        return float(self.difficulty)

    @property
    def heldout_range(self) -> range:
        """Global ids of the held-out identities (right after the training ones)."""
        return range(self.num_identities, self.num_identities + self.heldout_identities)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes of an RGB image."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class SyntheticFaces:
    """A SampleSource of synthetic faces: sample ``i`` is image ``i % images_per_identity`` of
    identity ``identities[i // images_per_identity]``, labelled with that identity's position
    in ``identities``."""

    cfg: SynthConfig
    identities: Sequence[int] | None = None
    """Global identity ids to render; default ``range(cfg.num_identities)`` (the training set)."""
    name: str = ""
    _cache: dict[int, FaceIdentity] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.identities is None:
            self.identities = range(self.cfg.num_identities)
        ids = self.identities
        if not isinstance(ids, range):
            ids = tuple(int(v) for v in ids)
            if len(set(ids)) != len(ids):
                raise ValueError("SyntheticFaces: identities contain duplicates; each identity must appear once")
            self.identities = ids
        if len(ids) == 0:
            raise ValueError("SyntheticFaces: identities is empty; give at least one identity id")
        if min(ids) < 0:
            raise ValueError(f"SyntheticFaces: identity id {min(ids)} is negative; ids must be >= 0")
        if not self.name:
            # The name identifies the rendered content (write_shards resumes only on a match).
            c = self.cfg
            which = (f"identities {ids.start}..{ids.stop - 1}" if isinstance(ids, range) and ids.step == 1
                     else f"{len(ids)} listed identities")
            self.name = (f"synthetic(seed={c.seed}, difficulty={float(c.difficulty):g}, "
                         f"{c.image_size[0]}x{c.image_size[1]}, q{c.jpeg_quality}, {which}, "
                         f"{c.images_per_identity} per identity)")

    @property
    def num_classes(self) -> int:
        """Number of identities (labels lie in [0, num_classes))."""
        return len(self.identities)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_classes * self.cfg.images_per_identity

    def locate(self, i: int) -> tuple[int, int, int]:
        """(label, global identity id, sample number within the identity) of sample ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} is outside [0, {n}) for {self.name}")
        i %= n
        label, sample = divmod(i, self.cfg.images_per_identity)
        return label, int(self.identities[label]), sample  # type: ignore[index]

    def identity_params(self, identity: int) -> FaceIdentity:
        """The fixed face parameters of global identity ``identity``."""
        params = self._cache.get(identity)
        if params is None:
            rng = np.random.default_rng([self.cfg.seed, identity, _IDENTITY_STREAM])
            params = sample_identity(rng, self.cfg.spread)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[identity] = params
        return params

    def nuisance(self, identity: int, sample: int) -> tuple[Nuisance, np.random.Generator]:
        """Nuisance factors of one image, and the generator that then supplies its pixel noise."""
        rng = np.random.default_rng([self.cfg.seed, identity, sample, _IMAGE_STREAM])
        return sample_nuisance(rng, self.cfg.nuisance_strength), rng

    def render(self, i: int) -> Image.Image:
        """Sample ``i`` as an un-encoded RGB image."""
        _, identity, sample = self.locate(i)
        nz, rng = self.nuisance(identity, sample)
        return render_face(self.identity_params(identity), nz, self.cfg.image_size, rng)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        label, _, _ = self.locate(i)
        return encode_jpeg(self.render(i), self.cfg.jpeg_quality), label

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}  # rebuilt on demand; keeps pickles sent to workers small
        return state


def heldout_faces(cfg: SynthConfig) -> SyntheticFaces:
    """The held-out identities (never in training) as a SampleSource named ``synthetic_heldout``."""
    if cfg.heldout_identities == 0:
        raise ValueError("SynthConfig.heldout_identities is 0: there are no held-out identities")
    return SyntheticFaces(cfg, cfg.heldout_range, name="synthetic_heldout")


# A pool worker's copy of the source, set once per worker by the initializer so that the
# source is pickled once per worker rather than once per task.
_WORKER_SOURCE: SyntheticFaces | None = None


def _init_worker(source: SyntheticFaces) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _render_chunk(indices: list[int]) -> list[bytes]:
    assert _WORKER_SOURCE is not None
    return [_WORKER_SOURCE[i][0] for i in indices]


def render_jpegs(source: SyntheticFaces, indices: Sequence[int], workers: int = 1,
                 progress: bool = True, label: str = "rendering") -> list[bytes]:
    """JPEG bytes of ``source[i]`` for each index, in order, rendered by ``workers`` processes."""
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    bar = Progress(label, len(indices), enabled=progress)
    chunks = [list(indices[k:k + 64]) for k in range(0, len(indices), 64)]
    out: list[bytes] = []

    def collect(parts: Iterable[list[bytes]]) -> None:
        for part in parts:
            out.extend(part)
            bar.update(len(part))

    if workers == 1:
        collect([source[i][0] for i in c] for c in chunks)
    else:
        # spawn: a forked child of a process that has run torch/OpenMP threads can deadlock.
        # This module imports no torch, so spawned workers start quickly.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(source,)) as pool:
            collect(pool.imap(_render_chunk, chunks))
    bar.close()
    return out
