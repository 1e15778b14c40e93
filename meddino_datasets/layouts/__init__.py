"""The owners' layouts of the public datasets both curation and finetuning read, one module each.

A layout module knows how a dataset's owners ship it (folders, file names, which files are images and which are
labels, the owners' split) and the **canonical case id** of each case: the name finetuning gives it, which is the
name nnU-Net's conversion gives it, because nnU-Net's 5-fold split sorts those names (``meddino_datasets.splits``).
``labelled_cases(root)`` lists what a finetune task trains and validates on; ``training_case_id(image)`` gives the
canonical id of one image file (``None`` when finetuning does not use it), so curation's ``--holdout-finetune``
names its cases exactly as the split does. Curation's wider view of each dataset (every image, its sample keys) is
``data_curation/sources/<name>.py``, built on these modules.
"""
from __future__ import annotations

from pathlib import Path

from meddino_datasets.readers.nifti import NIFTI_SUFFIXES


def niftis(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder``, sorted (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def first_existing(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists first."""
    return next((p for p in (folder / f"{stem}{s}" for s in NIFTI_SUFFIXES) if p.exists()), None)


def split_from_path(path: Path) -> str:
    """The owners' split from their folder names (nnU-Net/MSD ``imagesTr``/``imagesVa``/``imagesTs``, BTCV
    ``Training``/``Testing``, CHAOS ``Train_Sets``/``Test_Sets``); the innermost such folder decides, "" if none."""
    for part in reversed(path.parts):
        low = part.lower()
        if low in ("imagestr", "training", "train", "train_sets"):
            return "train"
        if low in ("imagesva", "imagesval", "validation", "val"):
            return "val"
        if low in ("imagests", "testing", "test", "test_sets"):
            return "test"
    return ""
