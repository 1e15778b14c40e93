"""Non-NIfTI nnU-Net datasets (.mha, .nrrd): read through SimpleITK into the same arrays, spacing and affine as
the NIfTI of the same real CT, for a dataset nnU-Net's own integrity check accepts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from finetune.config import load_config
from finetune.preprocess import read_case, read_volume
from finetune.tasks import task_cases

CASES = ("msd_spleen_a", "ts_upper")


def _convert(src: Path, dst: Path, ending: str) -> Path:
    """Copy an nnU-Net raw dataset (two cases) converting every image and label to ``ending`` with SimpleITK."""
    import SimpleITK as sitk

    for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for case in CASES:
            image = sitk.ReadImage(str(src / sub / f"{case}{suffix}.nii.gz"))
            sitk.WriteImage(image, str(dst / sub / f"{case}{suffix}{ending}"))
    meta = json.loads((src / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**meta, "file_ending": ending, "numTraining": len(CASES)}))
    return dst


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_mha_nrrd_dataset_reads_like_its_nifti(tiny_nnunet_dataset: Path, tmp_path: Path, ending: str):
    ds = _convert(tiny_nnunet_dataset, tmp_path / "Dataset902_Converted", ending)
    cfg = load_config(str(ds), "primus")
    cases = task_cases(cfg)
    assert [c.case_id for c in cases] == sorted(CASES) and all(c.image.name.endswith(ending) for c in cases)
    for case in cases:
        image, label = read_case(case, n_classes=3)
        nifti_path = tiny_nnunet_dataset / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        ref = read_volume(nifti_path)
        np.testing.assert_array_equal(image.array, ref.array)
        np.testing.assert_allclose(image.spacing_zyx, ref.spacing_zyx, rtol=1e-6)
        np.testing.assert_allclose(image.affine, nib.load(str(nifti_path)).affine, atol=1e-4)
        ref_label = read_volume(tiny_nnunet_dataset / "labelsTr" / f"{case.case_id}.nii.gz").array
        np.testing.assert_array_equal(label, ref_label.astype(np.uint8))


def test_nnunet_accepts_the_converted_dataset(tiny_nnunet_dataset: Path, tmp_path: Path):
    """The .mha dataset read above is a valid nnU-Net dataset by nnU-Net's own integrity check."""
    integrity = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    ds = _convert(tiny_nnunet_dataset, tmp_path / "Dataset902_Converted", ".mha")
    integrity.verify_dataset_integrity(str(ds), num_processes=1)


def test_unreadable_non_nifti_is_one_line_error(tiny_nnunet_dataset: Path, tmp_path: Path):
    bad = tmp_path / "broken.mha"
    bad.write_text("ObjectType = Image\nNDims = 3\n")  # a header without data
    with pytest.raises(ValueError, match=r"broken\.mha: cannot read with SimpleITK") as err:
        read_volume(bad)
    assert "\n" not in str(err.value)
    shutil.copy(tiny_nnunet_dataset / "labelsTr" / "ts_upper.nii.gz", tmp_path / "ok.nii.gz")
    assert read_volume(tmp_path / "ok.nii.gz").array.ndim == 3  # NIfTI still goes through nibabel
