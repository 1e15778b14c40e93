"""One orientation convention for every reader: ``data [i, j, k]`` in the file's voxel order, affine voxel -> RAS.
The same real CT read as NIfTI (nibabel), as ``.mha``/``.nrrd`` (SimpleITK) and as DICOM agrees."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from meddino_datasets.readers.common import axial_first
from meddino_datasets.readers.dicom import read_dicom_folder
from meddino_datasets.readers.nifti import read_nifti
from meddino_datasets.readers.sitk import read_sitk_volume


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_itk_formats_read_as_the_nifti_reads(tmp_path, real_data, repo_root, ending):
    import SimpleITK as sitk
    from omegaconf import OmegaConf

    src = real_data / "totalsegmentator" / "example_ct.nii.gz"
    converted = tmp_path / f"ct{ending}"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(converted))
    itk = read_sitk_volume(converted)
    reference = nib.load(str(src))
    np.testing.assert_array_equal(itk.data, np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(itk.affine, reference.affine, atol=1e-4)
    reading = OmegaConf.to_container(OmegaConf.load(repo_root / "configs" / "data" / "ct3m.yaml"))["reading"]
    curated = read_nifti(src, reading)  # curation's NIfTI reader: same convention
    np.testing.assert_allclose(curated.affine, itk.affine, atol=1e-4)
    zyx, spacing_zyx, _ = axial_first(itk)
    assert zyx.shape == itk.data.shape[::-1]
    np.testing.assert_allclose(spacing_zyx, reference.header.get_zooms()[:3][::-1], rtol=1e-6)


def test_dicom_and_its_nifti_share_grid_and_affine(real_data):
    """TotalSegmentator ships its DICOM example with labels stored LAS: aligned by affine they cover the same
    voxels, so the DICOM reader's RAS affine must map the label grid onto the series."""
    volume = read_dicom_folder(real_data / "totalsegmentator" / "example_ct_dicom")
    label = nib.load(str(real_data / "totalsegmentator" / "example_seg_dicom.nii.gz"))
    corners = np.array([[i, j, k, 1] for i in (0, label.shape[0] - 1) for j in (0, label.shape[1] - 1)
                        for k in (0, label.shape[2] - 1)], dtype=float)
    world = corners @ label.affine.T
    voxels = world @ np.linalg.inv(volume.affine).T
    assert np.all(voxels[:, :3] > -0.51) and np.all(voxels[:, :3] < np.array(volume.data.shape) - 0.49)
    assert sorted(label.shape) == sorted(volume.data.shape)
