"""Does a volume look like a CT in Hounsfield units, on a plausible voxel grid?

Two tools meet volumes they cannot trust: the CT-3M curation (any file in a public release) and prediction on a
user's scan. NIfTI carries no modality tag, so an MR slipped into a CT folder is recognised by its intensities: a
CT in HU has air (around the body, in the lungs and bowel) far below ``air_threshold_hu``, an MR has no negative
values at all. The spacing check catches headers no scanner writes (a 0 mm or 100 mm voxel) before any
resampling sizes an array from them. The thresholds come from each tool's YAML; only the rule lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CtIntensityCheck:
    """A CT in HU has at least ``min_air_fraction`` of its voxels below ``air_threshold_hu``.

    Counted chunk by chunk (``count_air``) so a reader never holds a second copy of a volume; ``problem`` turns the
    totals into a one-line reason (or None when the volume passes). ``min_air_fraction`` 0 disables the check."""

    air_threshold_hu: float
    min_air_fraction: float

    def count_air(self, values: np.ndarray) -> int:
        """Voxels of ``values`` (any shape, HU) below the air threshold; NaN never counts."""
        return int(np.count_nonzero(values < self.air_threshold_hu))

    def problem(self, n_air: int, n_total: int) -> str | None:
        if self.min_air_fraction <= 0 or n_air >= self.min_air_fraction * n_total:
            return None
        return (f"only {n_air / max(n_total, 1):.3%} of voxels below {self.air_threshold_hu:g} HU (a CT in HU has air "
                "around or inside the body; MR or a non-HU scale?)")


@dataclass(frozen=True)
class SpacingCheck:
    """Every voxel edge within ``[min_mm, max_mm]``: no CT has 0 mm or 100 mm voxels, and resampling a volume from
    such a header would size arrays from nonsense (a 100 mm voxel resampled to 0.8 mm is 125x per axis)."""

    min_mm: float
    max_mm: float

    def problem(self, spacing_mm: Sequence[float]) -> str | None:
        values = [float(s) for s in spacing_mm]
        if all(np.isfinite(v) and self.min_mm <= v <= self.max_mm for v in values):
            return None
        shown = ", ".join(f"{v:g}" for v in values)
        return f"voxel spacing ({shown}) mm is outside the plausible CT range [{self.min_mm:g}, {self.max_mm:g}] mm (header error?)"
