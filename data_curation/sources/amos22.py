"""AMOS22 (zenodo 7155725), CT only: the owners' layout, ids and CT/MRI boundary are
:mod:`meddino_datasets.layouts.amos22`'s (``amos22/{imagesTr,imagesVa,imagesTs}/amos_0001.nii.gz``; ids from
``MRI_MIN_ID`` = 0501 on are MRI and skipped). Case id: ``amos_0001``.
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import amos22, split_from_path
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, amos22.IMAGE_NAME.pattern) if p.parent.name.startswith("images")]
    ct = [p for p in files if not amos22.is_mri(int(amos22.IMAGE_NAME.fullmatch(p.name).group(1)))]
    return nifti_cases("amos22", ct, lambda p: strip_nifti_suffix(p.name), split_from_path)


ADAPTER = SourceAdapter("amos22", f"amos22/images{{Tr,Va,Ts}}/amos_NNNN.nii.gz (ids >= {amos22.MRI_MIN_ID:04d} are MRI: skipped)",
                        find, "https://zenodo.org/record/7155725",
                        finetune_case_id=lambda case: amos22.training_case_id(case.image))
