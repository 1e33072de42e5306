"""Draw one synthetic face image from an identity and a nuisance (PIL ImageDraw + numpy).

The face is drawn at ``SUPERSAMPLE``× the output size, rotated/zoomed/shifted with one
affine resample at that size, then box-downsampled: edges come out anti-aliased at the
cost of a few primitive calls, which keeps rendering at well over 400 images/s per core.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import overload

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .synthetic_params import Colour, FaceIdentity, Nuisance

SUPERSAMPLE = 2
_ARC = np.linspace(0.0, math.pi, 13)


def _shade(colour: Colour, factor: float) -> Colour:
    return tuple(int(min(255, max(0, round(c * factor)))) for c in colour)  # type: ignore[return-value]


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _flat(xs: np.ndarray, ys: np.ndarray) -> list[float]:
    """Interleave coordinates into the flat [x0, y0, x1, y1, ...] list PIL accepts."""
    return np.stack([xs, ys], axis=1).ravel().tolist()


class _Face:
    """Pixel geometry of one face: maps the unit square of the identity to canvas pixels."""

    def __init__(self, ident: FaceIdentity, nz: Nuisance, width: int, height: int):
        self.ident, self.nz = ident, nz
        self.unit = SUPERSAMPLE * min(width, height)
        self.ox = (SUPERSAMPLE * width - self.unit) / 2
        self.oy = (SUPERSAMPLE * height - self.unit) / 2
        yaw = nz.yaw
        self.cx = 0.5 + 0.04 * yaw * ident.face_w
        self.cy = 0.5
        # Features slide towards the far side and are packed a little closer under yaw.
        self.feat_cx = 0.5 + 0.24 * yaw * ident.face_w
        self.feat_pack = 1.0 - 0.12 * abs(yaw)
        self.dy = 0.03 * nz.pitch

    def px(self, v: float) -> float:
        """A length in unit-square fractions → canvas pixels."""
        return v * self.unit

    @overload
    def x(self, v: float) -> float: ...
    @overload
    def x(self, v: np.ndarray) -> np.ndarray: ...

    def x(self, v: np.ndarray | float) -> np.ndarray | float:
        """A unit-square x position → canvas pixels."""
        return self.ox + v * self.unit

    @overload
    def y(self, v: float) -> float: ...
    @overload
    def y(self, v: np.ndarray) -> np.ndarray: ...

    def y(self, v: np.ndarray | float) -> np.ndarray | float:
        """A unit-square y position → canvas pixels."""
        return self.oy + v * self.unit

    def side_scale(self, side: int) -> float:
        """Foreshortening of the half of the face on ``side`` (-1 left, +1 right) under yaw."""
        yaw = self.nz.yaw
        return 1.0 - 0.35 * abs(yaw) if side * yaw > 0 else 1.0 + 0.05 * abs(yaw)

    def outline(self, grow: float = 0.0, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """Head outline (unit square) with the jaw tapering below the centre, clockwise from the right."""
        ident, yaw = self.ident, self.nz.yaw
        t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        e = 2.0 / ident.roundness
        ux = np.sign(c) * np.abs(c) ** e
        uy = np.sign(s) * np.abs(s) ** e
        ux = np.where(uy > 0, ux * (1 - (1 - ident.jaw) * np.abs(uy) ** 1.6), ux)
        ux = ux * np.where(ux * yaw > 0, 1 - 0.22 * abs(yaw), 1 + 0.06 * abs(yaw))
        return self.cx + ux * (ident.face_w + grow), self.cy + uy * (ident.face_h + grow)


def _draw_body(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    neck = _shade(i.skin, 0.8)
    hw = i.face_w * 0.5
    d.polygon(_flat(f.x(np.array([f.cx - hw, f.cx + hw, f.cx + hw * 1.15, f.cx - hw * 1.15])),
                    f.y(np.array([0.7, 0.7, 1.05, 1.05]))), fill=neck)
    d.ellipse([f.x(f.cx - 0.55), f.y(0.9 + i.face_h * 0.2), f.x(f.cx + 0.55), f.y(1.5)], fill=f.nz.clothes)


def _hair_back(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    if i.hair_style == "bald":
        return
    xs, ys = f.outline(grow=i.hair_volume)
    top = ys < f.cy + 0.02
    if i.hair_style == "long":
        hx, hy = xs[top], ys[top]
        order = np.argsort(hx)
        hx, hy = hx[order], hy[order]
        w = i.face_w + i.hair_volume + 0.03
        hx = np.concatenate([[f.cx - w], hx, [f.cx + w, f.cx + w * 1.05, f.cx - w * 1.05]])
        hy = np.concatenate([[f.cy], hy, [f.cy, 1.02, 1.02]])
        d.polygon(_flat(f.x(hx), f.y(hy)), fill=i.hair)
        return
    d.polygon(_flat(f.x(xs[top]), f.y(ys[top])), fill=i.hair)
    if i.hair_style == "curly":
        r = f.px(0.035 + i.hair_volume * 0.6)
        for x, y in zip(f.x(xs[top][::2]), f.y(ys[top][::2])):
            d.ellipse([x - r, y - r, x + r, y + r], fill=i.hair)


def _hair_front(d: ImageDraw.ImageDraw, f: _Face) -> None:
    """Hair over the forehead: the head cap above a hairline curve h(x)."""
    i = f.ident
    if i.hair_style == "bald":
        return
    xs, ys = f.outline(grow=i.hair_volume * 0.5, n=48)
    upper = ys <= f.cy
    xs, ys = xs[upper], ys[upper]
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    eye_y = i.eye_y + f.dy
    hl = eye_y - i.hairline * i.face_h
    u = (xs - f.cx) / i.face_w
    if i.hair_style == "fringe":
        h = hl + 0.06 + 0.012 * np.cos(np.arange(len(xs)) * 2.1) + 0.05 * u**2
    elif i.hair_style == "side_part":
        h = hl + 0.03 * (1 - u) - 0.01 + 0.05 * u**2
    else:
        h = hl + 0.07 * u**2
    top = np.minimum(ys, h)
    d.polygon(_flat(f.x(np.concatenate([xs, xs[::-1]])), f.y(np.concatenate([top, h[::-1]]))), fill=i.hair)


def _draw_ears(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    ey = (i.eye_y + i.nose_y) / 2 + f.dy
    for side in (-1, 1):
        scale = f.side_scale(side)
        rx = i.ear_size * 0.55 * (scale if side * f.nz.yaw <= 0 else scale**3)
        ry = i.ear_size
        # Ears sit just inside the outline; a narrow jaw pulls them in slightly.
        x = f.cx + side * i.face_w * (1 - 0.06 * (1 - i.jaw)) * scale
        d.ellipse([f.x(x - rx), f.y(ey - ry), f.x(x + rx), f.y(ey + ry)], fill=_shade(i.skin, 0.88))
        d.ellipse([f.x(x - rx * 0.5), f.y(ey - ry * 0.6), f.x(x + rx * 0.5), f.y(ey + ry * 0.6)],
                  fill=_shade(i.skin, 0.7))


def _draw_head(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    xs, ys = f.outline()
    d.polygon(_flat(f.x(xs), f.y(ys)), fill=_shade(i.skin, 0.9))
    # A slightly smaller, lighter copy leaves a shaded rim that reads as a rounded head.
    inner_x = f.cx + (xs - f.cx) * 0.95
    inner_y = f.cy - 0.012 + (ys - f.cy) * 0.965
    d.polygon(_flat(f.x(inner_x), f.y(inner_y)), fill=i.skin)


def _eye_centres(f: _Face) -> list[tuple[int, float, float]]:
    i = f.ident
    return [(side, f.feat_cx + side * i.eye_dx * f.feat_pack * f.side_scale(side) ** 0.5, i.eye_y + f.dy)
            for side in (-1, 1)]


def _draw_eyes(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i, nz = f.ident, f.nz
    lash = max(1, round(f.px(0.006)))
    for side, ex, ey in _eye_centres(f):
        w = i.eye_w * f.side_scale(side)
        h = i.eye_w * i.eye_aspect * nz.eye_open
        cos_t, sin_t = math.cos(side * i.eye_tilt), math.sin(-side * i.eye_tilt)
        ax = w * np.cos(_ARC)
        up, low = -h * np.sin(_ARC), 0.75 * h * np.sin(_ARC)
        r = i.iris_ratio * i.eye_w

        def place(px_: np.ndarray, py_: np.ndarray, cos_t: float = cos_t, sin_t: float = sin_t,
                  ex: float = ex, ey: float = ey) -> list[float]:
            """Points of this eye's frame, rotated by its tilt and moved to its centre, as canvas pixels."""
            rx = px_ * cos_t - py_ * sin_t
            ry = px_ * sin_t + py_ * cos_t
            return _flat(f.x(ex + rx), f.y(ey + ry))

        d.polygon(place(np.concatenate([ax, ax[::-1]]), np.concatenate([up, low[::-1]])), fill=(238, 234, 228))
        ix, iy = f.x(ex + nz.gaze * w * 0.6), f.y(ey - 0.1 * h)
        rp = f.px(r)
        d.ellipse([ix - rp, iy - rp, ix + rp, iy + rp], fill=i.iris)
        rp *= 0.45
        d.ellipse([ix - rp, iy - rp, ix + rp, iy + rp], fill=(14, 12, 12))
        # Skin-coloured lids over the almond's outside clip the iris to the eye opening.
        cover = r + 0.01
        lid = _shade(i.skin, 0.93)
        d.polygon(place(np.concatenate([ax, ax[::-1]]), np.concatenate([up, up[::-1] - cover])), fill=lid)
        d.polygon(place(np.concatenate([ax, ax[::-1]]), np.concatenate([low, low[::-1] + cover])), fill=i.skin)
        d.line(place(ax * 1.05, up), fill=(30, 22, 20), width=lash)


def _draw_brows(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i, nz = f.ident, f.nz
    colour = _mix(i.hair, (20, 16, 14), 0.25)
    u = np.linspace(0.0, 1.0, 9)
    for side, ex, ey in _eye_centres(f):
        length = i.brow_len * f.side_scale(side)
        by = ey - i.brow_gap - 0.012 * nz.brow_raise - 0.004 * abs(nz.brow_raise) * side
        xs = ex + side * 0.005 + side * (2 * u - 1) * length
        ys = by - i.brow_arch * np.sin(math.pi * u**0.8) - i.brow_tilt * (u - 0.5) * 2 * length
        th = i.brow_thick * (1 - 0.55 * u) / 2
        d.polygon(_flat(f.x(np.concatenate([xs, xs[::-1]])), f.y(np.concatenate([ys - th, (ys + th)[::-1]]))),
                  fill=colour)


def _draw_nose(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i, nz = f.ident, f.nz
    tx = f.cx + (f.feat_cx - f.cx) * 1.5
    ty = i.nose_y + 0.045 * nz.pitch
    w = i.nose_w
    side = -1 if nz.yaw >= 0 else 1
    width = max(1, round(f.px(0.006)))
    d.line([f.x(f.feat_cx + side * 0.022), f.y(i.eye_y + f.dy + 0.02),
            f.x(tx + side * w * 0.55), f.y(ty - 0.025)], fill=_shade(i.skin, 0.8), width=width)
    d.arc([f.x(tx - w * 0.55), f.y(ty - w * 0.6), f.x(tx + w * 0.55), f.y(ty + w * 0.3)], 20, 160,
          fill=_shade(i.skin, 0.72), width=width)
    for s in (-1, 1):
        nx = tx + s * w * 0.5 * f.side_scale(s)
        rx, ry = w * 0.28, w * 0.16
        d.ellipse([f.x(nx - rx), f.y(ty - ry), f.x(nx + rx), f.y(ty + ry)], fill=_shade(i.skin, 0.45))


def _mouth_curves(f: _Face) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    i, nz = f.ident, f.nz
    u = np.linspace(-1.0, 1.0, 15)
    half = i.mouth_w * (1 + 0.12 * nz.smile) * np.where(u < 0, f.side_scale(-1), f.side_scale(1))
    xs = f.feat_cx + u * half
    my = i.mouth_y + 0.02 * nz.pitch
    centre = my - 0.016 * nz.smile * u**2
    gap = 0.022 * nz.mouth_open
    shape = np.sqrt(np.clip(1 - u**2, 0, None))
    upper_top = centre - gap / 2 - i.lip_upper * shape * (1 - 0.35 * np.exp(-((u / 0.2) ** 2)))
    lower_bottom = centre + gap / 2 + i.lip_lower * shape**1.2
    return xs, centre, gap, upper_top, lower_bottom


def _draw_mouth(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    xs, centre, gap, upper_top, lower_bottom = _mouth_curves(f)
    X = f.x(np.concatenate([xs, xs[::-1]]))
    if gap > 0.003:
        d.polygon(_flat(X, f.y(np.concatenate([centre - gap / 2, (centre + gap / 2)[::-1]]))), fill=(62, 22, 26))
        inner = np.abs(np.linspace(-1, 1, len(xs))) < 0.65
        tx = xs[inner]
        ty = (centre - gap / 2)[inner]
        d.polygon(_flat(f.x(np.concatenate([tx, tx[::-1]])), f.y(np.concatenate([ty, (ty + gap * 0.4)[::-1]]))),
                  fill=(235, 230, 218))
    d.polygon(_flat(X, f.y(np.concatenate([upper_top, (centre - gap / 2)[::-1]]))), fill=_shade(i.lip, 0.9))
    d.polygon(_flat(X, f.y(np.concatenate([centre + gap / 2, lower_bottom[::-1]]))), fill=i.lip)
    d.line(_flat(f.x(xs), f.y(centre - gap / 2)), fill=_shade(i.lip, 0.6), width=max(1, round(f.px(0.004))))


def _draw_beard(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    colour = _mix(i.hair, i.skin, 0.2)
    if i.beard in ("full", "goatee"):
        xs, ys = f.outline(grow=0.004, n=48)
        lower = ys >= f.cy
        xs, ys = xs[lower], ys[lower]
        order = np.argsort(xs)
        xs, ys = xs[order], ys[order]
        u = (xs - f.feat_cx) / i.face_w
        mouth_y = i.mouth_y + 0.02 * f.nz.pitch
        if i.beard == "full":
            b = mouth_y - 0.03 - 0.1 * u**6
        else:
            b = np.where(np.abs(u) < 0.45, mouth_y + 0.028 + 0.25 * u**2, 2.0)
        top = np.minimum(b, ys)
        d.polygon(_flat(f.x(np.concatenate([xs, xs[::-1]])), f.y(np.concatenate([top, ys[::-1]]))), fill=colour)


def _draw_moustache(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    if i.beard not in ("full", "goatee", "moustache"):
        return
    xs, _, _, upper_top, _ = _mouth_curves(f)
    xs = f.feat_cx + (xs - f.feat_cx) * 1.1
    d.polygon(_flat(f.x(np.concatenate([xs, xs[::-1]])),
                    f.y(np.concatenate([upper_top - 0.002, (upper_top - 0.02)[::-1]]))),
              fill=_mix(i.hair, i.skin, 0.15))


def _draw_glasses(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    if i.glasses == "none":
        return
    width = max(1, round(f.px(0.008)))
    rims = []
    for side, ex, ey in _eye_centres(f):
        rx, ry = i.eye_w * 1.45 * f.side_scale(side), i.eye_w * 1.05
        box = [f.x(ex - rx), f.y(ey - ry), f.x(ex + rx), f.y(ey + ry)]
        if i.glasses == "round":
            d.ellipse(box, outline=i.glasses_colour, width=width)
        else:
            d.rounded_rectangle(box, radius=f.px(ry * 0.35), outline=i.glasses_colour, width=width)
        rims.append((side, ex, ey, rx, ry))
    (_, lx, ly, lrx, lry), (_, rx_, ry_, rrx, _) = rims
    d.line([f.x(lx + lrx), f.y(ly - lry * 0.3), f.x(rx_ - rrx), f.y(ry_ - lry * 0.3)],
           fill=i.glasses_colour, width=width)
    for side, ex, ey, rx, _ in rims:
        edge = f.cx + side * i.face_w * f.side_scale(side)
        d.line([f.x(ex + side * rx), f.y(ey - 0.01), f.x(edge), f.y(ey - 0.015)], fill=i.glasses_colour, width=width)


def _draw_marks(d: ImageDraw.ImageDraw, f: _Face) -> None:
    i = f.ident
    if i.mole is not None:
        mx, my, r = i.mole
        x = f.feat_cx + mx * i.face_w
        y = f.cy + my * i.face_h + f.dy
        d.ellipse([f.x(x - r), f.y(y - r), f.x(x + r), f.y(y + r)], fill=_shade(i.skin, 0.45))


def _draw_occluder(d: ImageDraw.ImageDraw, f: _Face) -> None:
    if f.nz.occluder is None:
        return
    kind, x, y, hw, hh, colour = f.nz.occluder
    if kind == "mask":
        i = f.ident
        top = i.nose_y + f.dy - 0.02
        box = [f.x(f.cx - i.face_w * 0.95), f.y(top), f.x(f.cx + i.face_w * 0.95), f.y(top + 2 * hh + 0.1)]
        d.rounded_rectangle(box, radius=f.px(0.05), fill=colour)
    elif kind == "box":
        d.rectangle([f.x(x - hw), f.y(y - hh), f.x(x + hw), f.y(y + hh)], fill=colour)
    else:
        d.ellipse([f.x(x - hw), f.y(y - hh), f.x(x + hw), f.y(y + hh)], fill=colour)


@lru_cache(maxsize=8)
def _light_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs / max(width - 1, 1) * 2 - 1, ys / max(height - 1, 1) * 2 - 1


def _affine(f: _Face) -> tuple[float, ...]:
    """Output→input pixel coefficients of the roll/zoom/shift about the face centre (output size)."""
    nz = f.nz
    c, s = math.cos(nz.roll), math.sin(nz.roll)
    z = nz.zoom
    cx, cy = f.x(0.5) / SUPERSAMPLE, f.y(0.5) / SUPERSAMPLE
    ox, oy = cx + f.px(nz.shift[0]) / SUPERSAMPLE, cy + f.px(nz.shift[1]) / SUPERSAMPLE
    a, b, d_, e = c / z, s / z, -s / z, c / z
    return (a, b, cx - a * ox - b * oy, d_, e, cy - d_ * ox - e * oy)


def render_face(ident: FaceIdentity, nz: Nuisance, size: tuple[int, int],
                rng: np.random.Generator) -> Image.Image:
    """Render one RGB image of ``size`` (H, W); ``rng`` supplies the sensor noise."""
    height, width = size
    big = (SUPERSAMPLE * width, SUPERSAMPLE * height)
    canvas = Image.new("RGB", big, nz.background)
    d = ImageDraw.Draw(canvas)
    f = _Face(ident, nz, width, height)
    _draw_body(d, f)
    if ident.hair_style == "long":
        _draw_ears(d, f)
        _hair_back(d, f)
    else:
        _hair_back(d, f)
        _draw_ears(d, f)
    _draw_head(d, f)
    _hair_front(d, f)
    _draw_beard(d, f)
    _draw_marks(d, f)
    _draw_eyes(d, f)
    _draw_brows(d, f)
    _draw_nose(d, f)
    _draw_mouth(d, f)
    _draw_moustache(d, f)
    _draw_glasses(d, f)
    _draw_occluder(d, f)
    # Downsample first: one bilinear resample at the output size costs a quarter of one at 2x.
    img = canvas.reduce(SUPERSAMPLE).transform(
        (width, height), Image.Transform.AFFINE, _affine(f), resample=Image.Resampling.BILINEAR,
        fillcolor=nz.background)
    if nz.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(nz.blur * min(width, height) / 112))
    arr: np.ndarray = np.asarray(img, dtype=np.float32)
    gx, gy = _light_grid(height, width)
    gain = 1 + nz.light_strength * 0.5 * (gx * math.cos(nz.light_angle) + gy * math.sin(nz.light_angle))
    arr = arr * (gain * nz.brightness)[..., None] * np.asarray(nz.tint, np.float32)
    if nz.noise > 0:
        # Uniform noise with the same standard deviation: a fifth of the cost of Gaussian draws.
        noise = rng.random(arr.shape, dtype=np.float32)
        noise -= 0.5
        noise *= nz.noise * math.sqrt(12.0)
        arr += noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
