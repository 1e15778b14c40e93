"""One Case for both sides: finetuning's (id, image, label) and curation's DICOM folder / source / split."""
from __future__ import annotations

from pathlib import Path

import pytest

from meddino_datasets.case import Case


def test_nifti_and_dicom_cases():
    nifti = Case("spleen2", Path("/d/spleen2.nii.gz"), Path("/d/spleen2_seg.nii.gz"))
    assert nifti.paths == ("/d/spleen2.nii.gz",) and nifti.kind == "nifti" and nifti.uid == "/spleen2"
    dicom = Case("PANCREAS_0001", Path("/p/PANCREAS_0001"), source="pancreas_ct", kind="dicom",
                 dicom_files=("/p/PANCREAS_0001/a/1.dcm", "/p/PANCREAS_0001/a/2.dcm"))
    assert dicom.paths == dicom.dicom_files and dicom.uid == "pancreas_ct/PANCREAS_0001" and dicom.label is None


def test_bad_cases_are_refused_by_name():
    with pytest.raises(ValueError, match="case x: kind must be one of"):
        Case("x", Path("x.mha"), kind="mha")
    with pytest.raises(ValueError, match="case y: a DICOM case needs its files"):
        Case("y", Path("/folder"), kind="dicom")


def test_case_ids_must_be_unique_naming_the_folder():
    from meddino_datasets.case import require_unique_ids

    require_unique_ids(["a", "b"], "/data/x")
    with pytest.raises(ValueError, match=r"^/data/x: duplicate case ids \['a'\]"):
        require_unique_ids(["a", "b", "a"], "/data/x")
