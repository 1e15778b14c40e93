"""A tiny nnU-Net raw dataset built from REAL labelled CT in shared/data/real (session-scoped).

Dataset901_TinyAbdomen, labels background 0, spleen 1, liver 2:
- ``msd_spleen_a/b``: the two z-halves of the MSD spleen case (manual spleen mask; 0.795 x 0.795 x 5 mm, RAS).
- ``ts_upper/ts_mid/ts_lower``: z-slabs of the TotalSegmentator example CT (3 mm) with its label map restricted to
  spleen (1) and liver (5); ``ts_lower`` contains neither organ (absent-class handling).
- ``dcmqi_liver``: the 3-slice GE DICOM series (read with ``meddino_datasets.readers.dicom``) with its liver label (spine dropped),
  LPS-derived affine, 512 x 512 at 0.81 mm.
Sub-volumes are cut with nibabel's slicer, so each keeps a correct affine.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

LABELS = {"background": 0, "spleen": 1, "liver": 2}


def _save(img: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    nib.save(nib.Nifti1Image(np.asarray(img).astype(dtype), affine), str(path))


def build_tiny_dataset(real: Path, root: Path) -> Path:
    """Write the dataset under ``root/Dataset901_TinyAbdomen`` and return that folder."""
    from meddino_datasets.readers.dicom import read_dicom_folder

    ds = root / "Dataset901_TinyAbdomen"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)

    def write(case: str, image: nib.Nifti1Image, label: np.ndarray) -> None:
        _save(np.asanyarray(image.dataobj), image.affine, ds / "imagesTr" / f"{case}_0000.nii.gz", np.int16)
        _save(label, image.affine, ds / "labelsTr" / f"{case}.nii.gz", np.uint8)

    spleen_img = nib.load(str(real / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz"))
    spleen_seg = np.asanyarray(nib.load(str(real / "ivadomed_msd_spleen" / "sub-spleen2_ct_seg-manual.nii.gz")).dataobj)
    for case, (z0, z1) in {"msd_spleen_a": (0, 13), "msd_spleen_b": (13, 26)}.items():
        write(case, spleen_img.slicer[:, :, z0:z1], (spleen_seg[:, :, z0:z1] > 0).astype(np.uint8))

    ts_img = nib.load(str(real / "totalsegmentator" / "example_ct.nii.gz"))
    ts_seg = np.asanyarray(nib.load(str(real / "totalsegmentator" / "example_seg_fast_force_split.nii.gz")).dataobj)
    mapped = np.zeros(ts_seg.shape, np.uint8)
    mapped[ts_seg == 1] = 1
    mapped[ts_seg == 5] = 2
    for case, (z0, z1) in {"ts_upper": (86, 112), "ts_mid": (62, 86), "ts_lower": (20, 44)}.items():
        write(case, ts_img.slicer[:, :, z0:z1], mapped[:, :, z0:z1])

    dicom = read_dicom_folder(real / "dcmqi_ct3slice" / "dicom")
    liver_spine = nib.load(str(real / "dcmqi_ct3slice" / "liver_spine_seg.nii.gz"))
    assert np.allclose(liver_spine.affine, dicom.affine, atol=1e-3)
    _save(dicom.data, dicom.affine, ds / "imagesTr" / "dcmqi_liver_0000.nii.gz", np.int16)
    _save((np.asanyarray(liver_spine.dataobj) == 1).astype(np.uint8) * 2, dicom.affine,
          ds / "labelsTr" / "dcmqi_liver.nii.gz", np.uint8)

    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 6, "file_ending": ".nii.gz",
        "name": "TinyAbdomen", "description": "test dataset cut from real CT in shared/data/real (see tests/finetune/conftest.py)",
    }, indent=1))
    return ds


@pytest.fixture(scope="session")
def tiny_nnunet_dataset(real_data: Path, tmp_path_factory) -> Path:
    """Path of the Dataset901_TinyAbdomen folder (nnU-Net raw format, 6 real CT cases)."""
    return build_tiny_dataset(real_data, tmp_path_factory.mktemp("nnunet_raw"))


@pytest.fixture
def spleen_nnunet_dataset(real_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The MSD spleen case (manual mask) as a one-case nnU-Net raw dataset, plus a splits file that trains and
    validates on it (a smoke set for the heads' end-to-end runs through ``finetune/run.py``)."""
    import json
    import shutil

    src = real_data / "ivadomed_msd_spleen"
    ds = tmp_path / "Dataset501_Spleen"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    shutil.copy(src / "sub-spleen2_ct.nii.gz", ds / "imagesTr" / "spleen2_0000.nii.gz")
    shutil.copy(src / "sub-spleen2_ct_seg-manual.nii.gz", ds / "labelsTr" / "spleen2.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1},
                                                 "file_ending": ".nii.gz"}))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["spleen2"], "val": ["spleen2"]}]))
    return ds, splits
