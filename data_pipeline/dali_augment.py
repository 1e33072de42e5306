"""The augmentations of :mod:`data_pipeline.augment` as DALI ops, for the DALI loaders.

Same transforms, order, probabilities and parameter ranges as :class:`SampleTransform`; the
draws come from DALI's random ops, seeded by the pipeline's seed (itself derived from
``(seed, epoch, rank)``), so an epoch is augmented the same way each time it is run,
including when a resumed epoch is replayed. Each transform is computed for the whole batch
and taken, sample by sample, where its coin came up (a select by arithmetic on exact
integers, so the samples it does not pick keep every bit).
"""
from __future__ import annotations

import math
from typing import Any

from . import augment as A


def _pick(fn: Any, types: Any, coin: Any, changed: Any, images: Any) -> Any:
    """``changed`` where ``coin`` is 1, ``images`` elsewhere (uint8 in and out)."""
    c = fn.cast(coin, dtype=types.FLOAT)
    mixed = c * fn.cast(changed, dtype=types.FLOAT) + (1.0 - c) * fn.cast(images, dtype=types.FLOAT)
    return fn.cast(mixed, dtype=types.UINT8)


def _log_uniform(fn: Any, dmath: Any, lo: float, hi: float) -> Any:
    return dmath.exp(fn.random.uniform(range=(math.log(lo), math.log(hi))))


def dali_augment(images: Any, augment: A.Augment, image_size: tuple[int, int], fn: Any, types: Any,
                 dmath: Any) -> Any:
    """``images`` (uint8 HWC, decoded) with the transforms ``augment`` switches on."""
    h, w = image_size
    if augment.crop > 0:
        crop = fn.random_resized_crop(images, size=[h, w], random_area=list(A.CROP_AREA),
                                      random_aspect_ratio=list(A.CROP_RATIO))
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.crop), crop, images)
    if augment.lowres > 0:
        side = fn.random.uniform(range=A.LOWRES_SIDE)
        small = fn.resize(images, resize_y=side * h, resize_x=side * w)
        back = fn.resize(small, size=[h, w])
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.lowres), back, images)
    if augment.blur > 0:
        blurred = fn.gaussian_blur(images, sigma=fn.random.uniform(range=A.BLUR_SIGMA))
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.blur), blurred, images)
    if augment.color > 0:
        jittered = fn.brightness_contrast(images, brightness=fn.random.uniform(range=A.BRIGHTNESS),
                                          contrast=fn.random.uniform(range=A.CONTRAST),
                                          contrast_center=A.CONTRAST_CENTER)
        jittered = fn.hsv(jittered, saturation=fn.random.uniform(range=A.SATURATION))
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.color), jittered, images)
    if augment.gray > 0:
        gray = fn.hsv(images, saturation=0.0)
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.gray), gray, images)
    if augment.erase > 0:
        area = fn.random.uniform(range=A.ERASE_AREA)
        ratio = _log_uniform(fn, dmath, *A.ERASE_RATIO)
        eh = dmath.min(dmath.sqrt(area * ratio), 1.0)
        ew = dmath.min(dmath.sqrt(area / ratio), 1.0)
        anchor = fn.stack(fn.random.uniform(range=(0.0, 1.0)) * (1.0 - eh),
                          fn.random.uniform(range=(0.0, 1.0)) * (1.0 - ew))
        erased = fn.erase(images, anchor=anchor, shape=fn.stack(eh, ew), axis_names="HW",
                          normalized_anchor=True, normalized_shape=True, fill_value=A.ERASE_FILL)
        images = _pick(fn, types, fn.random.coin_flip(probability=augment.erase), erased, images)
    return images
