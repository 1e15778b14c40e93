"""Saving matplotlib figures: PNG, atomically, figure closed afterwards (figures leak memory otherwise)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from meddino_common.atomic import atomic_write  # noqa: E402


def save_png(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` as PNG (temporary file + rename, so no half-written picture) and close it."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
