"""Pancreas-CT (NIH, TCIA; DICOM).

Layout as the NBIA downloader writes it: ``Pancreas-CT/PANCREAS_0001/<study>/<series>/1-001.dcm``. The study and
series folder names carry acquisition dates, so the case id is the anonymised patient folder (``PANCREAS_0001``)
only. Labels are distributed separately as NIfTI (``label0001.nii.gz``) and are not images.
"""
import re
from pathlib import Path

from data_curation.sources.base import SourceAdapter, dicom_case, dicom_dirs
from meddino_datasets.case import Case

_PATIENT = re.compile(r"PANCREAS_\d{4}")


def find(root: Path, options: dict) -> list[Case]:
    by_patient: dict[str, list[Path]] = {}
    where: dict[str, str] = {}  # patient -> its folder relative to the root (the dated study folders below stay out)
    for folder, files in dicom_dirs(root).items():
        parts = folder.relative_to(root).parts
        at = next((i for i, part in enumerate(parts) if _PATIENT.fullmatch(part)), None)
        if at is not None:
            patient, where[parts[at]] = parts[at], "/".join(parts[:at + 1])
        elif _PATIENT.fullmatch(root.name):
            patient, where[root.name] = root.name, "."
        else:
            continue
        by_patient.setdefault(patient, []).extend(files)
    return sorted((dicom_case("pancreas_ct", pid, files, source_path=where[pid]) for pid, files in by_patient.items()),
                  key=lambda c: c.case_id)


ADAPTER = SourceAdapter("pancreas_ct", "Pancreas-CT/PANCREAS_NNNN/<study>/<series>/*.dcm", find, "https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU")
