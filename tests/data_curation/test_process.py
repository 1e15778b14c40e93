"""One case through the worker's pipeline: implausible geometry and volumes that keep no slice are reported."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from data_curation.process import process_case
from data_curation.settings import load_settings
from data_curation.sources.base import Case

SETTINGS = load_settings()  # the shipped configs/data/ct3m.yaml


def _resaved(src: Path, dst: Path, zooms=None, data=None) -> Path:
    img = nib.load(str(src))
    array = np.asanyarray(img.dataobj) if data is None else data
    affine = img.affine.copy()
    if zooms is not None:
        affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(zooms)
    nib.save(nib.Nifti1Image(array, affine), str(dst))
    return dst


def test_100mm_voxels_are_refused(tmp_path, real_data):
    path = _resaved(real_data / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "huge.nii.gz", zooms=(100.0, 100.0, 3.0))
    record = process_case(Case("folder", "huge", "nifti", (str(path),)), SETTINGS, str(tmp_path))
    assert record["volumes"] == []
    [rej] = record["rejections"]
    assert (rej["reason"], rej["filtered"]) == ("implausible_spacing", False)
    assert "voxel spacing (3, 100, 100) mm is outside the plausible CT range [0.05, 20] mm" in rej["detail"]


def test_volume_without_a_kept_slice_is_reported(tmp_path, real_data):
    """A real CT whose every slice is air (the body replaced by -1000 HU) keeps 0 slices: logged as
    ``no_slices_kept``, not a silent "0 slices"."""
    src = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    air = np.full(nib.load(str(src)).shape, -1000, np.int16)
    air[0, 0, :] = 500  # a few non-air voxels: still a CT by the intensity rule, no slice has a body
    path = _resaved(src, tmp_path / "air.nii.gz", data=air)
    record = process_case(Case("folder", "air", "nifti", (str(path),)), SETTINGS, str(tmp_path))
    assert record["volumes"][0]["n_slices"] == 0
    assert [(r["reason"], r["filtered"]) for r in record["rejections"]] == [("no_slices_kept", True)]
