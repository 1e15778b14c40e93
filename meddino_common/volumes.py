"""Reading a NIfTI volume for a picture or a probe, in one orientation convention, with one-line errors.

The convention: nibabel's closest canonical orientation, RAS (voxel axes increase towards the patient's Right,
Anterior, Superior), and for display the radiological view of the CT-3M shards:
row 0 the most anterior row, column 0 the patient's right side (:func:`ras_to_display`). The full readers, with
DICOM and curation's checks, are ``meddino_datasets.readers``; this is the small reader that ``pretrain`` (which may
not import ``meddino_datasets``) and the figure code share.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def open_canonical_nifti(path: str | Path, what: str = "image") -> nib.Nifti1Image:
    """The NIfTI at ``path`` reoriented to RAS (header read, voxels not yet): a missing or unreadable file, or one
    that is not a 3-D volume, is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for corrupt files
        raise ValueError(f"{path}: not a readable NIfTI {what} ({exc})") from exc
    shape = image.shape
    if len(shape) < 3 or any(s == 0 for s in shape[:3]) or any(s != 1 for s in shape[3:]):
        raise ValueError(f"{path}: expected a 3-D {what}, got shape {shape}")
    return image


def read_voxels(image: nib.Nifti1Image, path: str | Path, dtype=np.float32) -> np.ndarray:
    """``image``'s voxels [X, Y, Z] (scaling applied) in ``dtype``; the data is read only here, so a truncated
    ``.nii.gz`` fails here, as one line naming ``path``."""
    try:
        if np.issubdtype(np.dtype(dtype), np.floating):
            return image.get_fdata(dtype=dtype).reshape(image.shape[:3])
        return np.asarray(image.dataobj).reshape(image.shape[:3]).astype(dtype)
    except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, ... from a damaged file
        raise ValueError(f"{path}: cannot read the voxel data (truncated or corrupt?): {exc}") from exc


def ras_to_display(array: np.ndarray) -> np.ndarray:
    """RAS [X, Y] -> display [Y, X], or RAS [X, Y, Z] -> axial slices [Z, Y, X]: row 0 anterior, column 0 the
    patient's right (radiological view; the in-plane orientation of the CT-3M shards)."""
    flipped = array[::-1, ::-1]
    return flipped.T if array.ndim == 2 else flipped.transpose(2, 1, 0)
