"""Figures of the loss study: feature geometry (circle, sphere), pair-angle histograms, margin curves.

Plotting only: the numbers come from :mod:`train.loss_study.geometry` and
:mod:`train.loss_study.margin_curves`.  matplotlib is imported lazily with the Agg backend.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import class_centres, geometry_metrics
from .margin_curves import MarginCurve

DPI = 90
ELEV, AZIM = 20.0, 35.0
"""Viewpoint of the sphere panels (degrees)."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def _grid(count: int, max_cols: int = 5) -> tuple[int, int]:
    cols = min(max_cols, max(count, 1))
    return math.ceil(max(count, 1) / cols), cols


def _finish(fig: Any, title: str, fontsize: int) -> None:
    """Suptitle above the panels (tight_layout would otherwise put panel titles under it)."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
        height = fig.get_size_inches()[1]
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    else:
        fig.tight_layout()


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as a 256-colour PNG (a third of the bytes of full colour, same look)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    _pyplot().close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    small.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def _view_direction(elev: float, azim: float) -> np.ndarray:
    """Unit vector from the centre towards a matplotlib 3-D camera at (elev, azim)."""
    e, a = np.radians(elev), np.radians(azim)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


def _panel_title(name: str, unit: np.ndarray, labels: np.ndarray) -> str:
    m = geometry_metrics(unit, labels)
    return f"{name}\nintra {m['intra_angle']:.0f}°, inter {m['inter_angle']:.0f}°"


def plot_geometry(features: Mapping[str, tuple[np.ndarray, np.ndarray]], dim: int, path: Path,
                  title: str = "", captions: Mapping[str, str] | None = None) -> Path:
    """One panel per loss: unit features [N, dim] (dim 2 or 3) on the circle or sphere, coloured by label.

    ``captions``: a line under a panel (by loss name), e.g. the run's training accuracy.
    """
    if dim not in (2, 3):
        raise ValueError(f"dim={dim}: the geometry figure draws 2-D (circle) or 3-D (sphere) features")
    plt = _pyplot()
    rows, cols = _grid(len(features))
    fig = plt.figure(figsize=(3.0 * cols, 3.5 * rows + 0.5))
    colours = plt.get_cmap("tab10")
    rng = np.random.default_rng(0)
    for k, (name, (unit, labels)) in enumerate(features.items()):
        if unit.shape[1] != dim:
            raise ValueError(f"{name}: features have {unit.shape[1]} dimensions, the figure draws {dim}")
        classes, centres = class_centres(unit, labels)
        colour_of = {c: colours(i % 10) for i, c in enumerate(classes)}
        if dim == 2:
            ax = fig.add_subplot(rows, cols, k + 1)
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(np.cos(t), np.sin(t), color="0.8", lw=1)
            # A little radial jitter keeps overlapping classes visible on the circle.
            r = 1.0 + rng.uniform(-0.06, 0.06, size=len(labels))
            for c in classes:
                sel = labels == c
                ax.scatter(unit[sel, 0] * r[sel], unit[sel, 1] * r[sel], s=7, color=colour_of[c], alpha=0.7,
                           linewidths=0)
            for c, centre in zip(classes, centres):
                ax.plot([0, centre[0] * 0.85], [0, centre[1] * 0.85], color=colour_of[c], lw=1)
            ax.set_xlim(-1.15, 1.15)
            ax.set_ylim(-1.15, 1.15)
            ax.set_aspect("equal")
        else:
            ax = fig.add_subplot(rows, cols, k + 1, projection="3d")
            u, v = np.mgrid[0:2 * np.pi:24j, 0:np.pi:12j]
            ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.4)
            # Points on the far side of the sphere are faded, so the near side reads clearly.
            near = unit @ _view_direction(ELEV, AZIM) >= 0
            for c in classes:
                for side, alpha, size in ((~near, 0.25, 4), (near, 0.9, 8)):
                    sel = (labels == c) & side
                    ax.scatter(unit[sel, 0], unit[sel, 1], unit[sel, 2], s=size, color=colour_of[c],
                               alpha=alpha, depthshade=False, linewidths=0)
            ax.view_init(elev=ELEV, azim=AZIM)
            ax.set_box_aspect((1, 1, 1), zoom=1.35)
            ax.set_xlim(-1, 1)
            ax.set_ylim(-1, 1)
            ax.set_zlim(-1, 1)
        ax.set_axis_off()
        ax.set_title(_panel_title(name, unit, labels), fontsize=10)
        if captions and name in captions:
            ax.text2D(0.5, -0.02, captions[name], transform=ax.transAxes, ha="center", va="top", fontsize=8) \
                if dim == 3 else ax.text(0.5, -0.02, captions[name], transform=ax.transAxes, ha="center",
                                         va="top", fontsize=8)
    _finish(fig, title, 12)
    return _save(fig, path)


def plot_angle_histograms(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """One panel per loss: histograms of the angles (°) of same-identity and different-identity pairs."""
    plt = _pyplot()
    rows, cols = _grid(len(pairs))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), squeeze=False,
                             sharex=True)
    bins = np.linspace(0, 180, 61)
    for ax, (name, (pos, neg)) in zip(axes.flat, pairs.items()):
        ax.hist(neg, bins=bins, density=True, color="tab:red", alpha=0.55, label="different")
        ax.hist(pos, bins=bins, density=True, color="tab:green", alpha=0.55, label="same")
        ax.axvline(np.median(pos), color="darkgreen", lw=1)
        ax.axvline(np.median(neg), color="darkred", lw=1)
        ax.set_title(f"{name}: medians {np.median(pos):.0f}° / {np.median(neg):.0f}°", fontsize=9)
        ax.set_yticks([])
        ax.set_xticks([0, 45, 90, 135, 180])
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=8, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("pair angle (°)", fontsize=9)
    _finish(fig, title, 11)
    return _save(fig, path)


_PANELS = {"fixed": "target logit / s: fixed margins",
           "adaptive": "target logit / s: adaptive margins",
           "negative": "negative logit / s (target at θ_y = 60°)"}


def plot_margin_curves(curves: Sequence[MarginCurve], path: Path) -> Path:
    """The margin figure: one panel per curve group, logit / s against θ in degrees."""
    plt = _pyplot()
    groups = [g for g in _PANELS if any(c.group == g for c in curves)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 6.0), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for c in (c for c in curves if c.group == group):
            ax.plot(np.degrees(c.theta), c.value, label=c.label, **c.style)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xlim(0, 180)
        ax.set_ylim(-2.0, 2.1 if group == "negative" else 1.1)
        ax.set_xticks(range(0, 181, 30))
        ax.set_xlabel("θ (degrees)")
        ax.set_title(_PANELS[group], fontsize=10)
        ax.grid(alpha=0.3)
        # Below the panel: inside it the legend would hide the curves it names.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.tight_layout()
    return _save(fig, path)
