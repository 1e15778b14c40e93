"""AMOS22 (zenodo 7155725), CT only.

Layout: ``amos22/{imagesTr,imagesVa,imagesTs}/amos_0001.nii.gz``. The owners document that ids 0001-0500 are CT and
ids above 500 are MRI; ``options["mri_min_id"]`` (config, default 501) sets that boundary and MRI cases are
skipped. Case id: ``amos_0001``.
"""
from pathlib import Path

from data_curation.sources.base import Case, SourceAdapter, find_nifti, nifti_cases, split_from_path, strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    mri_min_id = int(options.get("mri_min_id", 501))
    files = [p for p in find_nifti(root, r"amos_\d{4}\.nii(\.gz)?") if p.parent.name.startswith("images")]
    ct = [p for p in files if int(strip_nifti_suffix(p.name)[5:]) < mri_min_id]
    return nifti_cases("amos22", ct, lambda p: strip_nifti_suffix(p.name), split_from_path)


def finetune_case_id(case: Case) -> str | None:
    """The finetune task splits every labelled CT case of imagesTr and imagesVa, named ``amos_0001`` like here."""
    return case.case_id if case.split in ("train", "val") else None


ADAPTER = SourceAdapter("amos22", "amos22/images{Tr,Va,Ts}/amos_NNNN.nii.gz (ids >= 501 are MRI: skipped)", find, "https://zenodo.org/record/7155725",
                        finetune_case_id=finetune_case_id)
