"""AbdomenCT-1K (github.com/JunMa11/AbdomenCT-1K).

Layout: images in ``AbdomenCT-1K-ImagePart{1,2,3}/Case_00001_0000.nii.gz`` (nnU-Net channel suffix), masks in
``Mask/Case_00001.nii.gz`` (no suffix, not images). Case id: ``Case_00001``.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = find_nifti(root, r"Case_\d{5}_0000\.nii(\.gz)?")
    return nifti_cases("abdomenct1k", files, lambda p: strip_nifti_suffix(p.name)[: -len("_0000")])


ADAPTER = SourceAdapter("abdomenct1k", "**/Case_NNNNN_0000.nii.gz (Mask/ skipped)", find, "https://github.com/JunMa11/AbdomenCT-1K")
