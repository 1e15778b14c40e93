"""Types shared by the readers: the volume they return, the structured rejection they raise, the HU checks.

A reader's job ends at "values in voxel order ``[i, j, k]`` plus a voxel->RAS affine" (the convention of
:mod:`meddino_datasets.readers`); orientation, resampling and slicing belong to the consumer (curation's
``data_curation.geometry``, finetuning's axial-first arrays via :func:`axial_first`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: rejections that are expected filtering (not an error in the input): counted in stats, never fail the run
FILTERED_REASONS = frozenset(
    {
        "not_ct",
        "not_ct_intensity",
        "seg_object",
        "rt_object",
        "not_image",
        "localizer",
        "not_grayscale",
        "derived_map",
        "secondary_capture",
        "not_axial",
        "duplicate_slice",
        "too_few_slices",
        "no_slices_kept",
        "no_case_found",  # a source root without a case, built anyway with --allow-empty
        "gantry_tilt",  # the three policy rejections (dicom.gantry_tilt / on_missing_slices / on_variable_spacing)
        "missing_slices",
        "variable_spacing",
    }
)


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM / ITK patient coordinates -> NIfTI's RAS (x and y negated)


@dataclass
class RawVolume:
    """A volume as read from disk, before any reorientation.

    ``data``: shape ``[I, J, K]`` in the file's voxel order (nibabel convention; for DICOM ``I`` = columns,
    ``J`` = rows, ``K`` = slices sorted along the slice normal). int16 HU from the curation readers; the DICOM
    prediction policy keeps float32 (an MR's rescaled values need not be integers).
    ``affine``: 4x4 voxel index -> RAS millimetres.
    ``k_offsets_mm``: position of every ``K`` index along the ``K`` axis relative to index 0 when the spacing is
    irregular (DICOM with variable spacing or missing slices); ``None`` when ``affine`` describes it exactly.
    ``info``: flags worth keeping with the slices (gantry tilt, variable spacing, NaN count...), never PHI.
    """

    data: np.ndarray
    affine: np.ndarray
    k_offsets_mm: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    volume_suffix: str = ""  # distinguishes several accepted series of one DICOM case (hash of the series UID)


@dataclass
class Rejection:
    """Why a file (or a whole volume) was not used. ``filtered`` = by design; otherwise the input is bad."""

    path: str
    reason: str
    detail: str = ""

    @property
    def filtered(self) -> bool:
        return self.reason in FILTERED_REASONS

    def as_dict(self) -> dict:
        return {"file": self.path, "reason": self.reason, "detail": self.detail, "filtered": self.filtered}


class ImageRejected(ValueError):
    """A volume or file is refused; carries a :class:`Rejection` naming the file and the problem. A ``ValueError``,
    so a caller that reports bad input in one line (``finetune/predict.py``) needs no reader-specific clause."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.rejection = Rejection(str(path), reason, detail)


@dataclass
class HuCheck:
    """Running HU sanity check over chunks of a volume: values must look like HU.

    A corrupt decode (wrong sign, wrong bit depth) puts a large fraction of voxels far outside
    ``[low - slack, high + slack]``; a few metal voxels above ``high`` or out-of-field fill values such as -3024 do
    not. The volume is rejected (never clipped) when the outside fraction exceeds ``max_outside_fraction``.
    """

    low: float
    high: float
    slack: float
    max_outside_fraction: float
    n_total: int = 0
    n_outside: int = 0
    vmin: float = np.inf
    vmax: float = -np.inf

    @classmethod
    def from_cfg(cls, cfg: dict) -> "HuCheck":
        return cls(float(cfg["low"]), float(cfg["high"]), float(cfg["slack"]), float(cfg["max_outside_fraction"]))

    def update(self, hu: np.ndarray, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
        """Account for a chunk; returns its (min, max). Two passes when everything is in range (the usual case), none
        when the caller already knows the chunk's exact ``bounds`` (min, max)."""
        if hu.size == 0:
            return 0.0, 0.0
        lo, hi = bounds if bounds is not None else (float(hu.min()), float(hu.max()))
        self.n_total += hu.size
        if lo < self.low - self.slack or hi > self.high + self.slack:
            self.n_outside += int(np.count_nonzero((hu < self.low - self.slack) | (hu > self.high + self.slack)))
        self.vmin = min(self.vmin, lo)
        self.vmax = max(self.vmax, hi)
        return lo, hi

    def verify(self, path: str) -> None:
        frac = self.n_outside / max(self.n_total, 1)
        if frac > self.max_outside_fraction or self.vmin < -32768 or self.vmax > 32767:
            raise ImageRejected(
                path,
                "hu_out_of_range",
                f"{frac:.1%} of voxels outside [{self.low - self.slack:g}, {self.high + self.slack:g}] HU "
                f"(range {self.vmin:g}..{self.vmax:g}): corrupt decode or not a CT in HU",
            )


def to_int16_hu(values: np.ndarray, fill_hu: int) -> tuple[np.ndarray, int]:
    """Round HU values to int16; NaN/inf become ``fill_hu``. Returns (array, number of non-finite voxels).

    The caller must have run :class:`HuCheck` first, so the final clip only guards int16 overflow of voxels
    that the check already accepted as a tiny outlier fraction.
    """
    if np.issubdtype(values.dtype, np.integer):
        if values.dtype == np.int16:
            return values, 0
        if values.size and (values.min() < -32768 or values.max() > 32767):
            values = np.clip(values, -32768, 32767)
        return values.astype(np.int16), 0
    bad = ~np.isfinite(values)
    n_bad = int(bad.sum())
    if n_bad:
        values = np.where(bad, fill_hu, values)
    return np.clip(np.rint(values), -32768, 32767).astype(np.int16), n_bad


def voxel_spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Edge lengths (mm) of a voxel along ``i, j, k``: the norms of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def axial_first(volume: RawVolume) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """``(data [K, J, I] = [Z, Y, X] view, spacing (z, y, x) mm, affine)``: the axial-first view finetuning works
    on (nnU-Net's numpy order), the affine unchanged (it still maps ``(i, j, k)``)."""
    spacing_ijk = voxel_spacing_mm(volume.affine)
    return volume.data.transpose(2, 1, 0), spacing_ijk[::-1], volume.affine
