"""Images in the other formats nnU-Net datasets use (``.mha``, ``.nrrd``, ...) through SimpleITK, as nnU-Net reads them.

nnU-Net's ``dataset.json`` names one ``file_ending`` per dataset and its ``SimpleITKIO`` reads every format ITK
knows. The result follows the convention of :mod:`meddino_datasets.readers` (``data [i, j, k]``, affine voxel ->
RAS mm): ITK's numpy array is ``[k, j, i]`` and is transposed back (a view); its geometry (origin, spacing,
direction) is in LPS, turned into RAS by negating x and y -- the same affine nibabel gives for the NIfTI of the
same image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from meddino_datasets.readers.common import LPS_TO_RAS, RawVolume


def itk_affine_ras(origin_xyz, spacing_xyz, direction_3x3) -> np.ndarray:
    """ITK geometry (LPS) -> 4x4 voxel ``(i, j, k)`` -> RAS affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction_3x3, dtype=float).reshape(3, 3) * np.asarray(spacing_xyz, dtype=float)
    lps[:3, 3] = np.asarray(origin_xyz, dtype=float)
    return LPS_TO_RAS @ lps


def read_sitk_volume(path: str | Path) -> RawVolume:
    """One 3-D single-component image -> :class:`RawVolume` (``data [i, j, k]`` in the file's type, RAS affine);
    a one-line ``ValueError`` naming the file otherwise."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:  # ITK reports unreadable/corrupt files as RuntimeError with a long trace
        raise ValueError(f"{path}: cannot read with SimpleITK ({str(err).strip().splitlines()[-1]})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; expected one (CT)")
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: a {image.GetDimension()}-D image; expected a 3-D volume")
    spacing = tuple(float(s) for s in image.GetSpacing())
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"{path}: invalid voxel spacing {spacing}")
    array = sitk.GetArrayFromImage(image)  # ITK's numpy order [k, j, i]
    affine = itk_affine_ras(image.GetOrigin(), spacing, image.GetDirection())
    return RawVolume(array.transpose(2, 1, 0), affine, info={"format": path.suffix.lstrip(".")})
