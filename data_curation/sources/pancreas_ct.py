"""Pancreas-CT (NIH, TCIA; DICOM).

Layout as the NBIA downloader writes it: ``Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm``. The study and
series folder names carry acquisition dates, so the case id is the anonymised patient folder (``PANCREAS_0001``)
only. Labels are distributed separately as NIfTI (``label0001.nii.gz``) and are not images.
"""
import re
from pathlib import Path

from data_curation.sources.base import Case, SourceAdapter, dicom_case, dicom_dirs

_PATIENT = re.compile(r"PANCREAS_\d{4}")


def find(root: Path, options: dict) -> list[Case]:
    by_patient: dict[str, list[Path]] = {}
    for folder, files in dicom_dirs(root).items():
        patient = next((part for part in folder.relative_to(root).parts if _PATIENT.fullmatch(part)), None)
        if patient is None and _PATIENT.fullmatch(root.name):
            patient = root.name
        if patient is not None:
            by_patient.setdefault(patient, []).extend(files)
    return sorted((dicom_case("pancreas_ct", pid, files) for pid, files in by_patient.items()), key=lambda c: c.case_id)


ADAPTER = SourceAdapter("pancreas_ct", "Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm", find, "https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU")
