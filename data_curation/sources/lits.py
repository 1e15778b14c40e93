"""LiTS (Liver Tumor Segmentation Challenge, Codalab).

Layout: ``volume-0.nii`` ... ``volume-130.nii`` with ``segmentation-N.nii`` (train, usually in
``Training Batch 1/2``), ``test-volume-0.nii`` ... ``test-volume-69.nii`` (test). Case id: ``volume-0``,
``test-volume-0``.
"""
from pathlib import Path

from data_curation.sources.base import Case, SourceAdapter, find_nifti, nifti_cases, strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = find_nifti(root, r"(test-)?volume-\d+\.nii(\.gz)?")
    return nifti_cases("lits", files, lambda p: strip_nifti_suffix(p.name), lambda p: "test" if p.name.startswith("test-") else "train")


def finetune_case_id(case: Case) -> str | None:
    """The finetune task trains/validates on the labelled ``volume-N`` cases and names them ``train_N`` as nnU-Net's
    own LiTS conversion (Task029) does: the nnU-Net split sorts ids, so the names decide the folds."""
    if case.split != "train":
        return None
    number = case.case_id[len("volume-"):]
    return f"train_{int(number)}" if number.isdigit() else f"train_{number}"


ADAPTER = SourceAdapter("lits", "**/volume-N.nii[.gz], **/test-volume-N.nii[.gz]", find, "https://competitions.codalab.org/competitions/17094",
                        finetune_case_id=finetune_case_id)
