"""Minimal DICOM CT series -> `finetune.preprocess.Volume` reader for prediction on new scans.

One series per folder (the largest series wins if several are present; the others are named in a warning).
Slices are ordered along the normal of ImageOrientationPatient, rescaled to HU, PixelPaddingValue voxels are set to
-1024 HU (air). The affine maps (column i, row j, slice k) to RAS world coordinates (DICOM LPS with x, y negated),
so the NIfTI written for a prediction overlays the series in any viewer. Rejected with a clear error: no readable
image files, multi-frame/RGB images, missing geometry, mixed orientations, duplicate positions, and non-uniform
slice spacing (> 1 % spread).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from finetune.preprocess import Volume

AIR_HU = -1024.0


def _read_headers(folder: Path) -> dict[str, list]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), force=False)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        series[str(getattr(ds, "SeriesInstanceUID", "?"))].append((path, ds))
    return series


def read_dicom_series(folder: str | Path) -> Volume:
    """Read the (largest) image series in ``folder`` as ``Volume([Z, Y, X] HU float32, spacing_zyx, RAS affine)``."""
    folder = Path(folder)
    series = _read_headers(folder)
    if not series:
        raise ValueError(f"{folder}: no DICOM image files with ImagePositionPatient found")
    uid, items = max(series.items(), key=lambda kv: len(kv[1]))
    if len(series) > 1:
        warnings.warn(f"{folder}: {len(series)} series found; using {uid} ({len(items)} files)")
    first = items[0][1]
    for path, ds in items:
        if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{path}: not a single-frame grey-level image (RGB or multi-frame); cannot volumise")
        if "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise ValueError(f"{path}: missing ImageOrientationPatient/PixelSpacing")
    iop = np.array(first.ImageOrientationPatient, dtype=np.float64)
    for path, ds in items:
        if not np.allclose(np.array(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise ValueError(f"{path}: orientation differs from the rest of series {uid}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    items.sort(key=lambda it: float(np.dot(np.array(it[1].ImagePositionPatient, dtype=np.float64), normal)))
    positions = np.array([np.array(ds.ImagePositionPatient, dtype=np.float64) for _, ds in items])
    along = positions @ normal
    if len(items) > 1:
        gaps = np.diff(along)
        if np.any(gaps < 1e-3):
            raise ValueError(f"{folder}: duplicate slice positions in series {uid}")
        if (gaps.max() - gaps.min()) > 0.01 * np.median(gaps):
            raise ValueError(f"{folder}: non-uniform slice spacing in series {uid} (gaps {gaps.min():.3f}..{gaps.max():.3f} mm); "
                             "resample it to a uniform grid first")
        slice_vec = (positions[-1] - positions[0]) / (len(items) - 1)
    else:
        thickness = float(getattr(first, "SliceThickness", 1.0) or 1.0)
        slice_vec = normal * thickness
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    slices = []
    for path, ds in items:
        try:
            raw = ds.pixel_array
        except Exception as err:  # decoder missing or corrupt data
            raise ValueError(f"{path}: cannot decode pixel data ({err}); compressed DICOM needs pylibjpeg "
                             "(pip install 'meddinov3[dicom]') or python-gdcm") from err
        hu = raw.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
        padding = getattr(ds, "PixelPaddingValue", None)
        if padding is not None:
            hu[raw == padding] = AIR_HU
        if hu.shape != slices[0].shape if slices else False:
            raise ValueError(f"{path}: slice size {hu.shape} differs from {slices[0].shape}")
        slices.append(hu)
    array = np.stack(slices)  # [Z, rows, cols]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing      # i = column index
    affine_lps[:3, 1] = col_dir * row_spacing      # j = row index
    affine_lps[:3, 2] = slice_vec
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    spacing_z = float(np.linalg.norm(slice_vec))
    return Volume(array, (spacing_z, row_spacing, col_spacing), affine, str(folder), None)
