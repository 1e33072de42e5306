"""One way to draw an evaluation figure into a PNG file (ROC, CMC, rank-1 against distractors)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Literal

LegendPlace = Literal["lower left", "lower right"]


@contextlib.contextmanager
def line_plot(path: str | Path, title: str, legend_loc: LegendPlace) -> Iterator[Any]:
    """Yield the axes of a 6 × 4.5 in figure; on leaving, add grid, title and legend and write ``path``.

    The figure is closed whatever happens, so a failing plot leaves no open figure behind.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    try:
        yield ax
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
        ax.legend(loc=legend_loc)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
