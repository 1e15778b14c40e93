"""Images in the other formats nnU-Net datasets use (``.mha``, ``.nrrd``, ...) through SimpleITK, as nnU-Net reads them.

nnU-Net's ``dataset.json`` names one ``file_ending`` per dataset and its ``SimpleITKIO`` reads every format ITK
knows. The finetune pipeline works on NIfTI's conventions (``finetune.preprocess.Volume``: ``[Z, Y, X]`` array,
spacing in the same order, 4x4 affine from voxel ``(i, j, k)`` to RAS world millimetres), so this module returns
exactly that: ITK's array is already ``[k, j, i]`` = ``[Z, Y, X]``; its geometry (origin, spacing, direction) is in
LPS, turned into RAS by negating x and y, the same affine nibabel gives for the NIfTI of the same image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.tasks.layouts import NIFTI_SUFFIXES

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def itk_affine_ras(origin_xyz, spacing_xyz, direction_3x3) -> np.ndarray:
    """ITK geometry (LPS) -> 4x4 voxel ``(i, j, k)`` -> RAS affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction_3x3, dtype=float).reshape(3, 3) * np.asarray(spacing_xyz, dtype=float)
    lps[:3, 3] = np.asarray(origin_xyz, dtype=float)
    return LPS_TO_RAS @ lps


def read_sitk_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """One 3-D image -> (``[Z, Y, X]`` array, spacing ``(z, y, x)`` mm, RAS affine); a clear error otherwise."""
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
    array = sitk.GetArrayFromImage(image)  # [Z, Y, X]
    affine = itk_affine_ras(image.GetOrigin(), spacing, image.GetDirection())
    return array, (spacing[2], spacing[1], spacing[0]), affine
