"""KiTS23 (github.com/neheller/kits23): ``dataset/case_00000/imaging.nii.gz`` (:mod:`meddino_datasets.layouts.kits23`;
``segmentation.nii.gz`` and ``instances/`` beside it are labels). Case id: ``case_00000``, as the finetune task's.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import kits23


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"imaging\.nii(\.gz)?") if p.parent.name.startswith("case_")]
    return nifti_cases("kits23", files, lambda p: p.parent.name, lambda p: "train")


ADAPTER = SourceAdapter("kits23", "dataset/case_NNNNN/imaging.nii.gz", find, "https://github.com/neheller/kits23",
                        finetune_case_id=lambda case: kits23.training_case_id(case.image))
