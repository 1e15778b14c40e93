"""TotalSegmentator dataset v2 (zenodo 10047292).

Layout: ``Totalsegmentator_dataset_v201/s0000/ct.nii.gz`` with ``segmentations/<organ>.nii.gz`` and ``meta.csv``
at the top. Case id: ``s0000``.
"""
import re
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case

_CASE = re.compile(r"s\d{4}")


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"ct\.nii(\.gz)?") if _CASE.fullmatch(p.parent.name)]
    return nifti_cases("totalseg", files, lambda p: p.parent.name)


ADAPTER = SourceAdapter("totalseg", "Totalsegmentator_dataset_v201/sNNNN/ct.nii.gz", find, "https://doi.org/10.5281/zenodo.10047292")
