"""One DICOM reader, two policies, on real series: what curation refuses or repairs and prediction takes as it is.

Curation (``DicomPolicy.from_config`` on the shipped ct3m.yaml) wants axial CT in HU and repairs gantry tilt by
moving pixels; prediction (``PREDICTION``, what ``finetune/predict.py`` reads a user's DICOM folder with) takes any
modality, keeps the scanner's pixels and puts the tilt into the affine, and refuses a stack one affine cannot
describe."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from meddino_datasets.readers.common import ImageRejected, axial_first
from meddino_datasets.readers.dicom import PREDICTION, read_dicom_folder, read_dicom_series


def _files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix == ".dcm")


def test_gantry_tilt_curation_moves_pixels_prediction_keeps_them_in_the_affine(real_data, curation_policy):
    folder = real_data / "dcm_qa_ct" / "Philips_phantom_tilt_subset"
    curated, rejections = read_dicom_series(_files(folder), curation_policy)
    assert rejections == [] and curated[0].info["resampled"] == "gantry_tilt_deshear"
    kept = read_dicom_folder(folder, PREDICTION)
    assert "resampled" not in kept.info and kept.info["max_shear_px"] > 8 and kept.data.dtype == np.float32

    headers = sorted((pydicom.dcmread(f) for f in _files(folder)), key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k, ds in enumerate(headers):
        # prediction: slice k holds the file's own pixels (in HU), and voxel (0, 0, k) is the file's position
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(kept.data[:, :, k], hu.T)
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose((kept.affine @ [0, 0, k, 1])[:3], lps * [-1, -1, 1], atol=1e-3)
    # curation: an orthogonal grid (the slice column is the normal), so the sheared slices' pixels moved
    in_plane, slice_col = curated[0].affine[:3, :2], curated[0].affine[:3, 2]
    assert np.abs(in_plane.T @ slice_col).max() < 1e-6
    assert np.abs(kept.affine[:3, :2].T @ kept.affine[:3, 2]).max() > 0.1
    assert not np.array_equal(curated[0].data[:, :, -1], kept.data[:, :, -1].astype(np.int16))
    np.testing.assert_array_equal(curated[0].data[:, :, 0], kept.data[:, :, 0])  # slice 0 anchors both grids


def test_variable_spacing_kept_by_curation_refused_for_prediction(real_data, curation_policy):
    folder = real_data / "dcm_qa_ct" / "GE_head_tilt_varspacing"
    curated, _ = read_dicom_series(_files(folder), curation_policy)
    assert len(curated) == 1 and curated[0].info["variable_spacing"] and curated[0].k_offsets_mm is not None
    with pytest.raises(ValueError) as err:  # ImageRejected is a ValueError: predict.py reports it in one line
        read_dicom_folder(folder, PREDICTION)
    assert str(folder) in str(err.value) and "variable_spacing" in str(err.value) and "\n" not in str(err.value)


def test_a_series_labelled_mr_is_read_for_prediction_refused_by_curation(tmp_path, real_data, curation_policy):
    """Real CT slices re-labelled Modality=MR: curation keeps CT only; prediction reads what the model's own
    modality check (``finetune/predict.py``) then judges, with the very values of the CT read."""
    for f in _files(real_data / "dcmqi_ct3slice" / "dicom"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(tmp_path / Path(f).name)
    curated, rejections = read_dicom_series(_files(tmp_path), curation_policy)
    assert curated == [] and {r.reason for r in rejections} == {"not_ct"}
    mr = read_dicom_folder(tmp_path, PREDICTION)
    ct = read_dicom_folder(real_data / "dcmqi_ct3slice" / "dicom", PREDICTION)
    np.testing.assert_array_equal(mr.data, ct.data)


def test_localizer_and_rgb_capture_are_never_a_volume_under_either_policy(real_data, curation_policy):
    """The old finetune reader volumised the CT-labelled secondary capture of this folder; neither policy does."""
    folder = real_data / "dcm_qa_ct" / "Philips_localizer_and_rgb"
    assert read_dicom_series(_files(folder), curation_policy)[0] == []
    with pytest.raises(ImageRejected, match="no_image_series"):
        read_dicom_folder(folder, PREDICTION)


def test_prediction_read_matches_the_nifti_made_from_the_series(real_data):
    """dcmqi's liver/spine NIfTI was made from this series: same grid, same RAS affine (the readers' convention),
    values as float32 HU with PixelPaddingValue (-2000 stored) as -1024 air."""
    volume = read_dicom_folder(real_data / "dcmqi_ct3slice" / "dicom")
    label = nib.load(str(real_data / "dcmqi_ct3slice" / "liver_spine_seg.nii.gz"))
    assert volume.data.shape == label.shape and volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.affine, label.affine, atol=1e-3)
    zyx, spacing_zyx, _ = axial_first(volume)
    assert zyx.shape == label.shape[::-1]
    np.testing.assert_allclose(spacing_zyx[::-1], label.header.get_zooms()[:3], rtol=1e-5)
    assert volume.data.min() == -1024


def test_largest_series_of_a_folder_wins_with_a_warning(tmp_path, real_data):
    for f in _files(real_data / "dcmqi_ct3slice" / "dicom"):
        os.symlink(f, tmp_path / f"a_{Path(f).name}")
    for f in sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir()):
        os.symlink(f, tmp_path / f"b_{f.name}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_dicom_folder(tmp_path)
    assert volume.data.shape[2] == 20
    assert any("2 image series found" in str(w.message) for w in caught)


def test_policy_values_are_checked(curation_policy):
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"dicom\.gantry_tilt must be one of resample\|affine\|reject, got 'shear'"):
        replace(curation_policy, gantry_tilt="shear")
    with pytest.raises(ValueError, match="needs as_int16"):
        replace(PREDICTION, gantry_tilt="resample")
