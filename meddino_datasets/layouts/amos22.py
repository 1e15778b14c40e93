"""AMOS22 (zenodo 7155725): ``amos22/{imagesTr,labelsTr,imagesVa,labelsVa,imagesTs}/amos_XXXX.nii.gz``.

The owners document that ids 0001-0500 are CT and ids from 0501 on are MRI: :data:`MRI_MIN_ID`, the one home of
that boundary (curation keeps CT only, the ``amos22`` finetune task filters CT, ``amos22_ct_mri`` keeps both).
Canonical case id: the file name, ``amos_0001``; imagesTr and imagesVa are both labelled and both trained on.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from meddino_datasets.case import Case
from meddino_datasets.layouts import niftis
from meddino_datasets.readers.nifti import strip_nifti_suffix

MRI_MIN_ID = 501
IMAGE_NAME = re.compile(r"amos_(\d{4})\.nii(\.gz)?")
LABELLED_FOLDERS = (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa"))


def case_number(case_id: str) -> Optional[int]:
    """Trailing integer of a case id (``amos_0507`` -> 507), None if there is none."""
    match = re.search(r"(\d+)$", case_id)
    return int(match.group(1)) if match else None


def is_mri(case_number: int) -> bool:
    return case_number >= MRI_MIN_ID


def training_case_id(image: Path) -> Optional[str]:
    """``amos_0001`` for an image of imagesTr or imagesVa (the cases finetuning splits), else None."""
    if not IMAGE_NAME.fullmatch(image.name) or image.parent.name not in {f for f, _ in LABELLED_FOLDERS}:
        return None
    return strip_nifti_suffix(image.name)


def labelled_cases(root: Path) -> list[Case]:
    """imagesTr + imagesVa cases with their labels (``label=None`` when the label file is missing)."""
    cases = []
    for images, labels in LABELLED_FOLDERS:
        for image in niftis(root / images):
            label = root / labels / image.name
            cases.append(Case(strip_nifti_suffix(image.name), image, label if label.exists() else None))
    return cases
