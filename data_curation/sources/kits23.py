"""KiTS23 (github.com/neheller/kits23).

Layout: ``dataset/case_00000/imaging.nii.gz`` with ``segmentation.nii.gz`` and ``instances/`` beside it.
Case id: ``case_00000``.
"""
from pathlib import Path

from data_curation.sources.base import Case, SourceAdapter, find_nifti, nifti_cases


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"imaging\.nii(\.gz)?") if p.parent.name.startswith("case_")]
    return nifti_cases("kits23", files, lambda p: p.parent.name, lambda p: "train")


def finetune_case_id(case: Case) -> str | None:
    """The finetune task uses every case, named ``case_00000`` like here."""
    return case.case_id


ADAPTER = SourceAdapter("kits23", "dataset/case_NNNNN/imaging.nii.gz", find, "https://github.com/neheller/kits23",
                        finetune_case_id=finetune_case_id)
