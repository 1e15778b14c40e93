"""AbdomenAtlas 3.0 (huggingface AbdomenAtlas; same layout as 1.1).

Layout: ``AbdomenAtlas3.0/BDMAP_00000001/ct.nii.gz`` with ``segmentations/`` (and ``combined_labels.nii.gz``).
Case id: ``BDMAP_00000001``.
"""
import re
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case

_CASE = re.compile(r"BDMAP_[A-Z0-9]+")


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"ct\.nii(\.gz)?") if _CASE.fullmatch(p.parent.name)]
    return nifti_cases("abdomenatlas", files, lambda p: p.parent.name)


ADAPTER = SourceAdapter("abdomenatlas", "AbdomenAtlas3.0/BDMAP_NNNNNNNN/ct.nii.gz", find, "https://github.com/MrGiovanni/AbdomenAtlas")
