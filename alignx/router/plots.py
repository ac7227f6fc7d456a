"""Figure output shared by the calibration report's plots (reliability.png, dispatch.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_png(fig: Any, path: Path, title: str, dpi: int = 100) -> Path:
    """Title, lay out and write ``fig`` to ``path`` atomically (a ``.tmp.png`` renamed into
    place, so a reader never sees half a file), then close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
