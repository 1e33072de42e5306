"""The augmentations of :mod:`data_pipeline.augment` as DALI ops, for the DALI loaders.

Same transforms, order, probabilities, ranges and draws as :class:`SampleTransform`: the
loader computes each sample's :class:`~data_pipeline.augment.Draws` in Python, from the
generator keyed by ``(seed, epoch, shard, key)``, and hands them to the pipeline through
``fn.external_source`` with the batch. So the DALI and webdataset loaders augment the same
samples in the same way (up to the rounding of two implementations), and a resumed epoch,
which starts its pipeline at the resume point, augments as the uninterrupted one did. Each
transform is computed for the whole batch and taken, sample by sample, where it fires (a
select by arithmetic on exact integers, so the samples it does not pick keep every bit).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import augment as A

# The per-sample inputs the pipeline takes, in order (see ``draw_inputs``).
INPUTS = ("crop_on", "crop_start", "crop_end", "lowres_on", "lowres_side", "blur_on", "blur_sigma",
          "color_on", "brightness", "contrast", "saturation", "gray_on", "erase_on", "erase_anchor",
          "erase_shape")


_USES = {"crop": ("crop_on", "crop_start", "crop_end"), "lowres": ("lowres_on", "lowres_side"),
         "blur": ("blur_on", "blur_sigma"), "color": ("color_on", "brightness", "contrast", "saturation"),
         "gray": ("gray_on",), "erase": ("erase_on", "erase_anchor", "erase_shape")}


def needed_inputs(augment: A.Augment) -> tuple[str, ...]:
    """The names of ``INPUTS`` the transforms ``augment`` switches on read, in order."""
    used = {n for name, names in _USES.items() if getattr(augment, name) > 0 for n in names}
    return tuple(n for n in INPUTS if n in used)


def draw_inputs(draws: list[A.Draws], h: int, w: int, names: tuple[str, ...] = INPUTS) -> list[list[np.ndarray]]:
    """One batch's draws as the lists of per-sample arrays ``fn.external_source`` takes (``names``)."""
    return [full for name, full in zip(INPUTS, _all_inputs(draws, h, w)) if name in names]


def _all_inputs(draws: list[A.Draws], h: int, w: int) -> list[list[np.ndarray]]:
    f32 = np.float32

    def col(fn) -> list[np.ndarray]:
        return [np.asarray(fn(d)) for d in draws]

    return [
        col(lambda d: np.int32(d.fire["crop"])),
        col(lambda d: np.array([d.box[1] / h, d.box[0] / w], f32)),
        col(lambda d: np.array([d.box[3] / h, d.box[2] / w], f32)),
        col(lambda d: np.int32(d.fire["lowres"])),
        col(lambda d: f32(d.side)),
        col(lambda d: np.int32(d.fire["blur"])),
        col(lambda d: f32(d.sigma)),
        col(lambda d: np.int32(d.fire["color"])),
        col(lambda d: f32(d.jitter[0])),
        col(lambda d: f32(d.jitter[1])),
        col(lambda d: f32(d.jitter[2])),
        col(lambda d: np.int32(d.fire["gray"])),
        col(lambda d: np.int32(d.fire["erase"])),
        col(lambda d: np.array([d.erase[0] / h, d.erase[1] / w], f32)),
        col(lambda d: np.array([d.erase[2] / h, d.erase[3] / w], f32)),
    ]


def _pick(fn: Any, types: Any, on: Any, changed: Any, images: Any) -> Any:
    """``changed`` where ``on`` is 1, ``images`` elsewhere (uint8 in and out)."""
    c = fn.cast(on, dtype=types.FLOAT)
    mixed = c * fn.cast(changed, dtype=types.FLOAT) + (1.0 - c) * fn.cast(images, dtype=types.FLOAT)
    return fn.cast(mixed, dtype=types.UINT8)


def dali_augment(images: Any, augment: A.Augment, image_size: tuple[int, int], inputs: dict[str, Any],
                 fn: Any, types: Any) -> Any:
    """``images`` (uint8 HWC, decoded) with the transforms ``augment`` switches on.

    ``inputs`` maps each name of ``INPUTS`` to its ``fn.external_source`` output.
    """
    h, w = image_size
    x = inputs
    if augment.crop > 0:
        crop = fn.resize(images, size=[h, w], roi_start=x["crop_start"], roi_end=x["crop_end"],
                         roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=False)
        images = _pick(fn, types, x["crop_on"], crop, images)
    if augment.lowres > 0:
        small = fn.resize(images, resize_y=x["lowres_side"] * h, resize_x=x["lowres_side"] * w,
                          interp_type=types.INTERP_LINEAR)
        back = fn.resize(small, size=[h, w], interp_type=types.INTERP_LINEAR)
        images = _pick(fn, types, x["lowres_on"], back, images)
    if augment.blur > 0:
        blurred = fn.gaussian_blur(images, sigma=x["blur_sigma"])
        images = _pick(fn, types, x["blur_on"], blurred, images)
    if augment.color > 0:
        jittered = fn.brightness_contrast(images, brightness=x["brightness"], contrast=x["contrast"],
                                          contrast_center=A.CONTRAST_CENTER)
        jittered = fn.hsv(jittered, saturation=x["saturation"])
        images = _pick(fn, types, x["color_on"], jittered, images)
    if augment.gray > 0:
        images = _pick(fn, types, x["gray_on"], fn.hsv(images, saturation=0.0), images)
    if augment.erase > 0:
        erased = fn.erase(images, anchor=x["erase_anchor"], shape=x["erase_shape"], axis_names="HW",
                          normalized_anchor=True, normalized_shape=True, fill_value=A.ERASE_FILL)
        images = _pick(fn, types, x["erase_on"], erased, images)
    return images
