"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Synapse syn3193805):
``RawData/Training/img/imgXXXX.nii.gz`` + ``RawData/Training/label/labelXXXX.nii.gz``, and the unlabelled
challenge test scans ``RawData/Testing/img/imgXXXX.nii.gz`` (no ``label`` folder beside them).

Canonical case id: ``btcv_XXXX`` (the owners' file is ``imgXXXX``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from meddino_datasets.case import Case
from meddino_datasets.layouts import first_existing, niftis, split_from_path
from meddino_datasets.readers.nifti import strip_nifti_suffix

IMAGE_NAME = re.compile(r"img(\d{4})\.nii(\.gz)?")


def case_id(number: str) -> str:
    return f"btcv_{number}"


def training_case_id(image: Path) -> Optional[str]:
    """``btcv_0001`` for ``Training/img/img0001.nii.gz`` (the labelled cases finetuning splits), else None."""
    match = IMAGE_NAME.fullmatch(image.name)
    if match is None or image.parent.name != "img" or split_from_path(image) != "train":
        return None
    return case_id(match.group(1))


def labelled_cases(root: Path) -> list[Case]:
    """Every ``img/`` folder below ``root`` that has a ``label/`` folder beside it (so ``Testing/img`` is not part
    of it); a missing file inside a ``label`` folder is an unlabelled case (an error for a finetune task)."""
    cases = []
    for image_dir in sorted(p for p in root.rglob("img") if p.is_dir() and (p.parent / "label").is_dir()):
        for image in niftis(image_dir):
            number = strip_nifti_suffix(image.name)[len("img"):]
            cases.append(Case(case_id(number), image, first_existing(image_dir.parent / "label", f"label{number}")))
    return cases
