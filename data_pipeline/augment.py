"""Per-sample training augmentations: one switch (a probability) per transform, deterministic.

The set follows insightface's ``dali_aug`` (low-resolution resize, Gaussian blur, colour
jitter, grayscale) plus a random resized crop and random erasing (occlusion). Every
transform is off (probability 0) by default. The loaders decode an image and hand it to a
:class:`SampleTransform` (``decode -> transform -> batch``); the DALI loader runs the same
operations as DALI ops (:mod:`data_pipeline.dali_augment`) with the same :class:`Draws`.

Determinism: what happens to a sample is drawn from a generator seeded with
``(seed, epoch, shard name, sample key)``, so it depends neither on the order the samples
arrive in, nor on the number of loader workers, nor on where a resumed run restarts.  (In
resampled mode a sample drawn twice in one epoch is augmented the same way both times.)

The horizontal flip stays where it was (a coin per batch slot, drawn in the loader) so
that runs without the new transforms give the very same batches as before.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
from PIL import Image

# Parameters of each transform (the switch is its probability, in the config).
CROP_AREA = (0.64, 1.0)
"""Random resized crop: fraction of the image area kept, uniform."""
CROP_RATIO = (3 / 4, 4 / 3)
"""Random resized crop: aspect ratio (width / height) of the crop, log-uniform."""
LOWRES_SIDE = (0.5, 0.8)
"""Low-resolution resize (insightface's ``dali_random_resize``): the image is resized down to
this fraction of its side, uniform, then back up."""
BLUR_SIGMA = (0.5, 1.5)
"""Gaussian blur: standard deviation in pixels, uniform (window ``2*ceil(3*sigma)+1``)."""
BRIGHTNESS = (0.8, 1.2)
"""Colour jitter: brightness factor, uniform."""
CONTRAST = (0.8, 1.2)
"""Colour jitter: contrast factor around ``CONTRAST_CENTER``, uniform."""
SATURATION = (0.8, 1.2)
"""Colour jitter: saturation factor (0 would be grayscale), uniform."""
CONTRAST_CENTER = 128.0
ERASE_AREA = (0.02, 0.2)
"""Random erasing: fraction of the image area covered by the rectangle, uniform."""
ERASE_RATIO = (0.3, 3.3)
"""Random erasing: aspect ratio (height / width) of the rectangle, log-uniform."""
ERASE_FILL = 128
"""Random erasing: value of the erased pixels (mid-gray, ~0 after normalisation)."""
# ITU-R BT.601 luma, the Y of YIQ: what DALI's hsv/saturation keep when they scale I and Q.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Augment:
    """Probabilities, per sample, of each transform (0: off), in the order they are applied."""

    crop: float = 0.0
    lowres: float = 0.0
    blur: float = 0.0
    color: float = 0.0
    gray: float = 0.0
    erase: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            p = getattr(self, f.name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augmentation {f.name}={p} is not a probability in [0, 1]")

    @property
    def active(self) -> bool:
        """Whether any transform can change an image."""
        return any(getattr(self, f.name) > 0 for f in fields(self))

    @classmethod
    def from_config(cls, data_config) -> Augment:
        """From ``DataConfig``'s ``aug_*`` fields."""
        return cls(**{f.name: float(getattr(data_config, f"aug_{f.name}")) for f in fields(cls)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sample_rng(seed: int, epoch: int, shard: str, key: str) -> random.Random:
    """The generator of one sample's augmentation draws (a keyed hash, ~1 us)."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{shard}\0{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class Rng(Protocol):
    """What the transforms draw from: ``random()`` in [0, 1) (``random.Random`` or numpy's ``Generator``)."""

    def random(self) -> float: ...


def _uniform(rng: Rng, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(rng.random())


def _randint(rng: Rng, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]``."""
    return min(hi, lo + int(float(rng.random()) * (hi - lo + 1)))


def _log_uniform(rng: Rng, lo: float, hi: float) -> float:
    return math.exp(_uniform(rng, math.log(lo), math.log(hi)))


def crop_box(rng: Rng, h: int, w: int) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a random resized crop inside an ``h x w`` image."""
    area = _uniform(rng, *CROP_AREA) * h * w
    ratio = _log_uniform(rng, *CROP_RATIO)
    cw = min(float(w), math.sqrt(area * ratio))
    ch = min(float(h), math.sqrt(area / ratio))
    x0 = _uniform(rng, 0.0, w - cw)
    y0 = _uniform(rng, 0.0, h - ch)
    return x0, y0, x0 + cw, y0 + ch


def erase_box(rng: Rng, h: int, w: int) -> tuple[int, int, int, int]:
    """``(y0, x0, eh, ew)`` of a random erasing rectangle inside an ``h x w`` image."""
    area = _uniform(rng, *ERASE_AREA) * h * w
    ratio = _log_uniform(rng, *ERASE_RATIO)
    eh = min(h, max(1, round(math.sqrt(area * ratio))))
    ew = min(w, max(1, round(math.sqrt(area / ratio))))
    return _randint(rng, 0, h - eh), _randint(rng, 0, w - ew), eh, ew


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalised 1-D Gaussian of window ``2*ceil(3*sigma)+1``."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 ``[H, W, 3]``, borders mirrored (reflect-101, as DALI)."""
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    x = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(x, pad, mode="reflect")
        n = x.shape[axis]
        x = sum(k[i] * np.take(p, range(i, i + n), axis=axis) for i in range(len(k)))
    return _to_uint8(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _saturate(x: np.ndarray, factor: float) -> np.ndarray:
    """Scale the chroma of float RGB ``x`` by ``factor`` keeping its luma (0: grayscale)."""
    y = x @ LUMA
    return y[..., None] + factor * (x - y[..., None])


@dataclass(frozen=True)
class Draws:
    """One sample's augmentation: which transforms fire and their parameters."""

    fire: dict[str, bool]
    box: tuple[float, float, float, float]  # crop (x0, y0, x1, y1) in pixels
    side: float                             # low-resolution side fraction
    sigma: float                            # blur sigma in pixels
    jitter: tuple[float, float, float]      # brightness, contrast, saturation factors
    erase: tuple[int, int, int, int]        # erased (y0, x0, height, width) in pixels


class SampleTransform:
    """``transform(image, epoch=, shard=, key=)``: one decoded uint8 ``[H, W, 3]`` sample augmented.

    ``transform.apply(image, rng)`` does the same with the caller's generator (a loader whose
    batches are a function of their index seeds one per batch slot). Either returns the input
    array itself when no transform fires, so switched-off augmentation leaves every byte as
    decoded.
    """

    def __init__(self, augment: Augment, seed: int) -> None:
        self.augment, self.seed = augment, seed

    def __call__(self, image: np.ndarray, *, epoch: int, shard: str, key: str) -> np.ndarray:
        if not self.augment.active:
            return image
        return self.apply(image, sample_rng(self.seed, epoch, shard, key))

    def draw(self, rng: Rng, h: int, w: int) -> Draws:
        """What happens to one ``h x w`` sample: the draws of ``rng``, in a fixed order.

        Every draw is made whether or not its transform fires, so that switching one
        transform on or off leaves the others' draws for a sample unchanged.
        """
        coins = {f.name: rng.random() for f in fields(self.augment)}
        box = crop_box(rng, h, w)
        side = _uniform(rng, *LOWRES_SIDE)
        sigma = _uniform(rng, *BLUR_SIGMA)
        jitter = (_uniform(rng, *BRIGHTNESS), _uniform(rng, *CONTRAST), _uniform(rng, *SATURATION))
        erase = erase_box(rng, h, w)
        fire = {name: coins[name] < getattr(self.augment, name) for name in coins}
        return Draws(fire, box, side, sigma, jitter, erase)

    def draw_sample(self, *, epoch: int, shard: str, key: str, h: int, w: int) -> Draws:
        """:meth:`draw` with the generator of sample ``(shard, key)`` in ``epoch``."""
        return self.draw(sample_rng(self.seed, epoch, shard, key), h, w)

    def apply(self, image: np.ndarray, rng: Rng) -> np.ndarray:
        """``image`` augmented with the draws of ``rng``."""
        if not self.augment.active:
            return image
        h, w = image.shape[:2]
        d = self.draw(rng, h, w)
        fire, box, side, sigma, jitter, erase = d.fire, d.box, d.side, d.sigma, d.jitter, d.erase

        out = image
        if fire["crop"]:
            out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BILINEAR, box=box))
        if fire["lowres"]:
            s = max(1, round(side * h)), max(1, round(side * w))
            small = Image.fromarray(out).resize((s[1], s[0]), Image.Resampling.BILINEAR)
            out = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
        if fire["blur"]:
            out = gaussian_blur(out, sigma)
        if fire["color"] or fire["gray"]:
            x = out.astype(np.float32)
            if fire["color"]:
                brightness, contrast, saturation = jitter
                x = brightness * (CONTRAST_CENTER + contrast * (x - CONTRAST_CENTER))
                x = _saturate(np.clip(x, 0, 255), saturation)
            if fire["gray"]:
                x = _saturate(x, 0.0)
            out = _to_uint8(x)
        if fire["erase"]:
            y0, x0, eh, ew = erase
            out = np.array(out)  # writable copy (decoded arrays may be read-only)
            out[y0:y0 + eh, x0:x0 + ew] = ERASE_FILL
        return out
