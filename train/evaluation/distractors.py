"""Identification against distractors (the MegaFace protocol): rank-1 as the gallery grows.

Each probe identity is enrolled once; the gallery then gets the first N of a pool of distractor
features (people who are none of the probes). For each N the probes are searched
(:func:`train.evaluation.identification.search`) and the CMC is recorded. Adding distractors
can only push a mate down, so rank-1 falls with N; how fast it falls is what the protocol
measures. Features are arrays, so distractors may come from the synthetic generator or from any
folder embedded with ``shardface embed`` (up to millions: the search is chunked).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .figures import line_plot
from .identification import DISTRACTOR, cmc, search

DEFAULT_SIZES = (0, 10, 100, 1000)


def distractor_curve(probes: np.ndarray, probe_labels: Sequence[int] | np.ndarray, enrolled: np.ndarray,
                     enrolled_labels: Sequence[int] | np.ndarray, distractors: np.ndarray | None,
                     sizes: Sequence[int] = DEFAULT_SIZES, max_rank: int = 20, device: str = "cpu"
                     ) -> dict[str, Any]:
    """Rank-1/5/10 and the CMC (ranks 1..max_rank) of the probes for each number N of distractors.

    Every probe must be mated (its identity enrolled): this is closed-set identification in a
    gallery padded with strangers. Returns ``sizes``, ``rank1``, ``rank5``, ``rank10`` (lists, one
    value per size), ``cmc`` (``{N: curve}``) and the counts.
    """
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 0:
        raise ValueError(f"distractor counts {sizes} must be >= 0 (and at least one given)")
    pool = 0 if distractors is None else int(np.shape(distractors)[0])
    if sizes[-1] > pool:
        raise ValueError(f"{sizes[-1]} distractors asked for but only {pool} are available: "
                         f"render or embed more, or ask for fewer")
    probe_labels = np.asarray(probe_labels, dtype=np.int64)
    enrolled_labels = np.asarray(enrolled_labels, dtype=np.int64)
    if not np.isin(probe_labels, enrolled_labels).all():
        missing = probe_labels[~np.isin(probe_labels, enrolled_labels)]
        raise ValueError(f"probe identity {int(missing[0])} is not enrolled: every probe needs its mate in the gallery")
    enrolled = np.asarray(enrolled, dtype=np.float32)
    out: dict[str, Any] = {"sizes": sizes, "rank1": [], "rank5": [], "rank10": [], "cmc": {},
                           "num_probes": int(probe_labels.size), "num_enrolled": int(enrolled_labels.size)}
    for n in sizes:
        if n and distractors is not None:  # n <= pool, so n > 0 means distractors were given
            gallery = np.concatenate([enrolled, np.asarray(distractors[:n], dtype=np.float32)])
            labels = np.r_[enrolled_labels, np.full(n, DISTRACTOR, dtype=np.int64)]
        else:
            gallery, labels = enrolled, enrolled_labels
        curve = cmc(search(probes, probe_labels, gallery, labels, device=device)["rank"], max(max_rank, 10))
        out["cmc"][n] = curve[:max_rank]
        for r in (1, 5, 10):
            out[f"rank{r}"].append(float(curve[r - 1]))
    return out


def plot_rank1_vs_distractors(curves: Mapping[str, Mapping[str, Any]], path: str | Path,
                              title: str = "rank-1 identification vs distractors") -> Path:
    """PNG of rank-1 (%) against the number of distractors (symmetric-log axis, so N=0 shows), one line per name."""
    with line_plot(path, title, "lower left") as ax:
        for name, curve in curves.items():
            ax.plot(curve["sizes"], [100 * v for v in curve["rank1"]], marker="o", label=name)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("distractors in the gallery")
        ax.set_ylabel("rank-1 identification rate (%)")
    return Path(path)


def plot_cmc(cmcs: Mapping[str, np.ndarray], path: str | Path, title: str = "CMC") -> Path:
    """PNG of CMC curves (identification rate % at ranks 1..R), one per name."""
    with line_plot(path, title, "lower right") as ax:
        for name, curve in cmcs.items():
            curve = np.asarray(curve, dtype=float)
            ax.plot(np.arange(1, curve.size + 1), 100 * curve, marker=".", label=name)
        ax.set_xlabel("rank")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("identification rate (%)")
    return Path(path)


def curve_table(curve: Mapping[str, Any]) -> str:
    """Markdown table: one row per distractor count with rank-1/5/10 (%)."""
    lines = ["| distractors | gallery | rank-1 | rank-5 | rank-10 |", "|---|---|---|---|---|"]
    for i, n in enumerate(curve["sizes"]):
        cells = ["n/a" if math.isnan(curve[k][i]) else f"{100 * curve[k][i]:.2f}" for k in ("rank1", "rank5", "rank10")]
        lines.append(f"| {n} | {n + curve['num_enrolled']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
