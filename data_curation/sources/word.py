"""WORD (Whole abdominal ORgan Dataset).

Layout: ``WORD-V0.1.0/{imagesTr,imagesVal,imagesTs}/word_0001.nii.gz`` (labels in ``labels*/``). Case id: ``word_0001``.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import split_from_path
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"word_\d{4}\.nii(\.gz)?") if p.parent.name.startswith("images")]
    return nifti_cases("word", files, lambda p: strip_nifti_suffix(p.name), split_from_path)


ADAPTER = SourceAdapter("word", "WORD-V0.1.0/images{Tr,Val,Ts}/word_NNNN.nii.gz", find, "https://github.com/HiLab-git/WORD")
