"""The owners' layouts: the labelled cases a finetune task splits, and the canonical id of each image file, are one
rule (curation's holdout names its cases with ``training_case_id``, finetuning with ``labelled_cases``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from meddino_datasets.layouts import amos22, btcv, kits23, lits, split_from_path
from meddino_datasets.readers.nifti import NIFTI_SUFFIXES


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


@pytest.fixture
def nii(real_data: Path) -> Path:
    return real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz"


def _tree(name: str, root: Path, nii: Path) -> list[Path]:
    """An owners' tree of real NIfTI links -> every image file in it (labelled, unlabelled, test)."""
    images = []
    if name == "amos22":
        for folder, ids in (("Tr", [1, 500, 501, 555]), ("Va", [6, 507])):
            for i in ids:
                images.append(root / f"images{folder}" / f"amos_{i:04d}.nii.gz")
                _link(nii, root / f"labels{folder}" / f"amos_{i:04d}.nii.gz")
        images.append(root / "imagesTs" / "amos_0100.nii.gz")
    elif name == "btcv":
        for i in (1, 2, 21):
            images.append(root / "RawData/Training/img" / f"img{i:04d}.nii.gz")
            _link(nii, root / "RawData/Training/label" / f"label{i:04d}.nii.gz")
        images.append(root / "RawData/Testing/img/img0061.nii.gz")
    elif name == "kits23":
        for i in (0, 7, 300):
            images.append(root / "dataset" / f"case_{i:05d}" / "imaging.nii.gz")
            _link(nii, root / "dataset" / f"case_{i:05d}" / "segmentation.nii.gz")
    else:
        for i in (0, 2, 10):
            images.append(root / "Training Batch 1" / f"volume-{i}.nii")
            _link(nii, root / "Training Batch 1" / f"segmentation-{i}.nii")
        images.append(root / "Test" / "test-volume-0.nii")
    for image in images:
        _link(nii, image)
    return images


EXPECTED = {
    "amos22": ["amos_0001", "amos_0500", "amos_0501", "amos_0555", "amos_0006", "amos_0507"],
    "btcv": ["btcv_0001", "btcv_0002", "btcv_0021"],
    "kits23": ["case_00000", "case_00007", "case_00300"],
    "lits": ["train_0", "train_10", "train_2"],
}


@pytest.mark.parametrize("name,layout", [("amos22", amos22), ("btcv", btcv), ("kits23", kits23), ("lits", lits)])
def test_labelled_cases_and_training_case_id_agree(tmp_path, nii, name, layout):
    images = _tree(name, tmp_path, nii)
    cases = layout.labelled_cases(tmp_path)
    assert [c.case_id for c in cases] == EXPECTED[name]
    assert all(c.label is not None and c.label.exists() for c in cases)
    named = {str(image): layout.training_case_id(image) for image in images}
    assert {str(c.image): c.case_id for c in cases} == {k: v for k, v in named.items() if v is not None}


def test_canonical_ids():
    assert lits.case_id("007") == "train_7" and lits.training_case_id(Path("test-volume-7.nii")) is None
    assert btcv.case_id("0001") == "btcv_0001"
    assert btcv.training_case_id(Path("RawData/Testing/img/img0061.nii.gz")) is None
    assert amos22.training_case_id(Path("amos22/imagesTs/amos_0002.nii.gz")) is None
    assert kits23.training_case_id(Path("dataset/case_00001/segmentation.nii.gz")) is None


def test_amos_ct_mri_boundary_is_the_owners():
    """The owners: 0001-0500 CT, 0501 on MRI. Curation skips what ``is_mri`` says, finetuning's CT filter keeps
    the rest (both read this one constant)."""
    assert amos22.MRI_MIN_ID == 501
    assert not amos22.is_mri(500) and amos22.is_mri(501)
    assert amos22.case_number("amos_0507") == 507 and amos22.case_number("amos") is None


def test_split_from_owners_folder_names():
    assert split_from_path(Path("amos22/imagesVa/amos_0008.nii.gz")) == "val"
    assert split_from_path(Path("RawData/Testing/img/img0061.nii.gz")) == "test"
    assert split_from_path(Path("Training Batch 1/volume-0.nii")) == ""
    assert NIFTI_SUFFIXES == (".nii.gz", ".nii")
