"""CHAOS challenge, CT part (DICOM). MR folders (``MR/``) are skipped.

Layout: ``CHAOS_Train_Sets/Train_Sets/CT/<n>/DICOM_anon/i0000,0000b.dcm`` (liver masks as PNG in ``Ground/``) and
``CHAOS_Test_Sets/Test_Sets/CT/<n>/DICOM_anon/``. Case id: ``train-<n>`` / ``test-<n>``.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, dicom_case, dicom_dirs
from meddino_datasets.case import Case
from meddino_datasets.layouts import split_from_path


def find(root: Path, options: dict) -> list[Case]:
    cases = []
    for folder, files in dicom_dirs(root).items():
        parts = folder.relative_to(root).parts if folder != root else ()
        if folder.name != "DICOM_anon" or len(parts) < 3 or parts[-3] != "CT":
            continue
        split = split_from_path(folder) or "train"
        cases.append(dicom_case("chaos", f"{split}-{parts[-2]}", files, split))
    return sorted(cases, key=lambda c: c.case_id)


ADAPTER = SourceAdapter("chaos", "CHAOS_{Train,Test}_Sets/*/CT/<n>/DICOM_anon/*.dcm (MR/ skipped)", find, "https://doi.org/10.5281/zenodo.3431873")
