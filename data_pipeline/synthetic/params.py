"""Random parameters of a synthetic face: what an identity is, and what changes per image.

Lengths are fractions of the image's shorter side, positions fractions of its height or
width, angles radians. An identity's parameters come from a generator seeded by
(seed, identity) alone; a nuisance from one seeded by (seed, identity, sample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Colour = tuple[int, int, int]

# Anchors of skin, hair and iris colour; an identity interpolates or jitters around them.
SKIN_LIGHT = np.array([246.0, 214.0, 188.0])
SKIN_DARK = np.array([88.0, 56.0, 38.0])
HAIR_COLOURS = (
    (24, 20, 18), (58, 38, 26), (102, 68, 40), (176, 140, 86),
    (146, 66, 32), (140, 138, 134), (222, 210, 184),
)
IRIS_COLOURS = ((66, 42, 24), (108, 72, 38), (58, 104, 150), (76, 116, 74), (112, 116, 122))
HAIR_STYLES = ("bald", "short", "long", "fringe", "side_part", "curly")
HAIR_STYLE_P = (0.08, 0.3, 0.22, 0.14, 0.14, 0.12)
GLASSES = ("none", "round", "rect")
GLASSES_P = (0.78, 0.11, 0.11)
BEARDS = ("none", "full", "goatee", "moustache")
BEARDS_P = (0.72, 0.1, 0.09, 0.09)


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed look of one identity."""

    face_w: float
    """Half-width of the head."""
    face_h: float
    """Half-height of the head."""
    jaw: float
    """Width of the jaw at chin level relative to ``face_w`` (narrow chin < 1)."""
    roundness: float
    """Superellipse exponent of the head outline (2: ellipse, larger: squarer)."""
    skin: Colour
    hair: Colour
    hair_style: str
    hairline: float
    """Height of the hairline above the eyes, relative to ``face_h``."""
    hair_volume: float
    eye_y: float
    eye_dx: float
    """Half the distance between the eye centres."""
    eye_w: float
    eye_aspect: float
    eye_tilt: float
    iris: Colour
    iris_ratio: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_tilt: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_upper: float
    lip_lower: float
    lip: Colour
    ear_size: float
    glasses: str
    glasses_colour: Colour
    beard: str
    mole: tuple[float, float, float] | None
    """(x offset, y offset, radius) of a mole relative to the face centre, or None."""


@dataclass(frozen=True)
class Nuisance:
    """Everything that changes between two photos of the same identity."""

    roll: float
    yaw: float
    """-1..1; moves features sideways and narrows the far half of the face."""
    pitch: float
    smile: float
    mouth_open: float
    brow_raise: float
    eye_open: float
    gaze: float
    zoom: float
    shift: tuple[float, float]
    light_angle: float
    light_strength: float
    tint: tuple[float, float, float]
    brightness: float
    blur: float
    """Gaussian blur radius in output pixels at 112 px (scaled with the image size)."""
    noise: float
    background: Colour
    clothes: Colour
    occluder: tuple[str, float, float, float, float, Colour] | None
    """(kind, x, y, half-width, half-height, colour) of an occluding patch, or None."""


def _colour(values: np.ndarray) -> Colour:
    c = np.clip(np.rint(values), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


def sample_identity(rng: np.random.Generator, spread: float) -> FaceIdentity:
    """Draw one identity; ``spread`` in (0, 1] scales how far continuous traits stray from average."""

    def around(centre: float, half_range: float) -> float:
        return centre + spread * half_range * float(rng.uniform(-1.0, 1.0))

    tone = float(rng.beta(1.6, 1.6))
    tone = 0.5 + spread * (tone - 0.5)
    skin = SKIN_LIGHT * (1 - tone) + SKIN_DARK * tone + rng.normal(0, 7 * spread, 3)
    hair = np.array(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], float) + rng.normal(0, 10, 3)
    iris = np.array(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], float) + rng.normal(0, 12, 3)
    lip_mix = around(0.35, 0.15)
    lip = skin * (1 - lip_mix) + np.array([170.0, 60.0, 70.0]) * lip_mix - 18
    has_mole = rng.random() < 0.3
    mole = (around(0.0, 0.2), around(0.25, 0.25), 0.006 + 0.006 * float(rng.random())) if has_mole else None
    return FaceIdentity(
        face_w=around(0.335, 0.04), face_h=around(0.43, 0.03),
        jaw=around(0.66, 0.16), roundness=around(2.5, 0.6),
        skin=_colour(skin), hair=_colour(hair),
        hair_style=HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=HAIR_STYLE_P)],
        hairline=around(0.62, 0.12), hair_volume=around(0.045, 0.03),
        eye_y=around(0.445, 0.03), eye_dx=around(0.14, 0.022),
        eye_w=around(0.052, 0.012), eye_aspect=around(0.5, 0.14), eye_tilt=around(0.0, 0.16),
        iris=_colour(iris), iris_ratio=around(0.5, 0.1),
        brow_gap=around(0.048, 0.016), brow_len=around(0.066, 0.015),
        brow_thick=around(0.019, 0.008), brow_tilt=around(0.0, 0.16), brow_arch=around(0.012, 0.01),
        nose_y=around(0.61, 0.035), nose_w=around(0.036, 0.012),
        mouth_y=around(0.755, 0.03), mouth_w=around(0.076, 0.02),
        lip_upper=around(0.013, 0.006), lip_lower=around(0.019, 0.007), lip=_colour(lip),
        ear_size=around(0.05, 0.012),
        glasses=GLASSES[rng.choice(len(GLASSES), p=GLASSES_P)],
        glasses_colour=_colour(rng.uniform(10, 160, 3)),
        beard=BEARDS[rng.choice(len(BEARDS), p=BEARDS_P)],
        mole=mole,
    )


def sample_nuisance(rng: np.random.Generator, strength: float) -> Nuisance:
    """Draw one image's nuisance factors; ``strength`` in [0, 1] scales every one of them."""
    s = strength

    def sym(amplitude: float) -> float:
        return amplitude * s * float(rng.uniform(-1.0, 1.0))

    occluder = None
    if rng.random() < 0.5 * s:
        kind = ("mask", "box", "blob")[rng.integers(3)]
        colour = _colour(rng.uniform(20, 235, 3))
        size = 0.06 + 0.14 * s * float(rng.random())
        occluder = (kind, 0.5 + sym(0.3), 0.5 + sym(0.35), size, size * float(rng.uniform(0.5, 1.5)), colour)
    return Nuisance(
        roll=sym(math.radians(18)), yaw=sym(0.9), pitch=sym(0.8),
        smile=sym(1.0), mouth_open=max(0.0, sym(1.0)), brow_raise=sym(1.0),
        eye_open=1.0 - 0.8 * s * float(rng.random() ** 4), gaze=sym(0.35),
        zoom=1.0 + sym(0.14), shift=(sym(0.07), sym(0.07)),
        light_angle=float(rng.uniform(0, 2 * math.pi)), light_strength=0.7 * s * float(rng.random()),
        tint=(1 + sym(0.14), 1 + sym(0.08), 1 + sym(0.14)), brightness=1.0 + sym(0.3),
        blur=1.6 * s * float(rng.random()) ** 1.5, noise=14.0 * s * float(rng.random()),
        background=_colour(rng.uniform(30, 230, 3)), clothes=_colour(rng.uniform(15, 220, 3)),
        occluder=occluder,
    )
