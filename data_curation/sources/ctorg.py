"""CT-ORG (TCIA, doi 10.7937/tcia.2019.tt7f4v7o).

Layout: ``OrganSegmentations/volume-0.nii.gz`` ... ``volume-139.nii.gz`` with ``labels-N.nii.gz``.
Case id: ``volume-0``.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    return nifti_cases("ctorg", find_nifti(root, r"volume-\d+\.nii(\.gz)?"), lambda p: strip_nifti_suffix(p.name))


ADAPTER = SourceAdapter("ctorg", "OrganSegmentations/volume-N.nii.gz (labels-N skipped)", find, "https://doi.org/10.7937/tcia.2019.tt7f4v7o")
