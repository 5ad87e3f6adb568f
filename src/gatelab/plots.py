"""Saving matplotlib figures: headless, and atomic (a killed run leaves no half-written image)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, imported only when a plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Lay the figure out, write it next to `path` and move it into place; close it."""
    path = Path(path)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    tmp.replace(path)
