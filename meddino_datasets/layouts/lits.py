"""LiTS (Liver Tumor Segmentation Challenge, Codalab): ``volume-N.nii`` + ``segmentation-N.nii`` (training, usually
in ``Training Batch 1/2``), ``test-volume-N.nii`` (the unlabelled test set).

Canonical case id: ``train_N`` (no zero padding), as nnU-Net's own LiTS conversion (v1 ``Task029_LITS``) names
``volume-N``, so the sorted ids, and with them nnU-Net's 5-fold split, are the ones every nnU-Net LiTS result was
trained on.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from meddino_datasets.case import Case
from meddino_datasets.layouts import first_existing

TRAINING_IMAGE = re.compile(r"volume-(\w+)\.nii(\.gz)?")


def case_id(number: str) -> str:
    return f"train_{int(number)}" if number.isdigit() else f"train_{number}"


def training_case_id(image: Path) -> Optional[str]:
    """``train_7`` for ``volume-7.nii[.gz]``; None for test volumes and other files."""
    match = TRAINING_IMAGE.fullmatch(image.name)
    return case_id(match.group(1)) if match else None


def labelled_cases(root: Path) -> list[Case]:
    """Every ``volume-N`` below ``root`` with its ``segmentation-N`` from the same folder."""
    cases = []
    for image in sorted(root.rglob("volume-*.nii*")):
        cid = training_case_id(image)
        if cid is not None:
            number = TRAINING_IMAGE.fullmatch(image.name).group(1)
            cases.append(Case(cid, image, first_existing(image.parent, f"segmentation-{number}")))
    return cases
