"""LiTS (Liver Tumor Segmentation Challenge, Codalab): every image of the owners' layout
(:mod:`meddino_datasets.layouts.lits`), ``volume-0.nii`` ... ``volume-130.nii`` (train, usually in
``Training Batch 1/2``) and ``test-volume-0.nii`` ... ``test-volume-69.nii`` (test). Case id: ``volume-0``,
``test-volume-0`` (the finetune task names ``volume-0`` ``train_0``, as nnU-Net does).
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import lits
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = find_nifti(root, r"(test-)?volume-\d+\.nii(\.gz)?")
    return nifti_cases("lits", files, lambda p: strip_nifti_suffix(p.name), lambda p: "test" if p.name.startswith("test-") else "train")


ADAPTER = SourceAdapter("lits", "**/volume-N.nii[.gz], **/test-volume-N.nii[.gz]", find, "https://competitions.codalab.org/competitions/17094",
                        finetune_case_id=lambda case: lits.training_case_id(case.image))
