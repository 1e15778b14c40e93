"""The small NIfTI reader shared by pretrain's probe and figures: RAS, display orientation, one-line errors."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddino_common.volumes import open_canonical_nifti, ras_to_display, read_voxels


def test_real_ct_reads_in_ras_and_displays_anterior_up_right_left(real_data: Path) -> None:
    path = real_data / "totalsegmentator" / "example_ct.nii.gz"
    image = open_canonical_nifti(path, "CT volume")
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    volume = read_voxels(image, path)
    assert volume.dtype == np.float32 and volume.shape == image.shape[:3]
    slices = ras_to_display(volume)
    assert slices.shape == (volume.shape[2], volume.shape[1], volume.shape[0])  # [Z, Y, X]
    # row 0 is the most anterior RAS row (highest y), column 0 the patient's right (highest x)
    assert np.array_equal(slices[3, 0, :], volume[::-1, -1, 3])
    assert np.array_equal(slices[3, :, 0], volume[-1, ::-1, 3])
    assert np.array_equal(ras_to_display(volume[:, :, 3]), slices[3])  # one plane the same way


def test_damaged_files_are_one_line_naming_the_file(real_data: Path, tmp_path: Path) -> None:
    data = (real_data / "totalsegmentator" / "example_ct.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])  # the header survives, the voxels do not
    image = open_canonical_nifti(cut)
    with pytest.raises(ValueError, match=r"cut.nii.gz: cannot read the voxel data") as err:
        read_voxels(image, cut)
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti"))
    with pytest.raises(ValueError, match=r"junk.nii.gz: not a readable NIfTI label map"):
        open_canonical_nifti(junk, "label map")
    with pytest.raises(FileNotFoundError, match="image not found"):
        open_canonical_nifti(tmp_path / "missing.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), flat)
    with pytest.raises(ValueError, match=r"expected a 3-D image"):
        open_canonical_nifti(flat)
