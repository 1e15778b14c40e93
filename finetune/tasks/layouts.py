"""Which owners' layout a finetune task folder is in, and its cases: built on :mod:`meddino_datasets.layouts`
(the owners' layouts and canonical case ids curation shares) plus the nnU-Net raw format."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from meddino_datasets.case import Case, require_unique_ids
from meddino_datasets.layouts import amos22, btcv, kits23, lits, nnunet

LAYOUTS = {"nnunet": nnunet.labelled_cases, "amos22": amos22.labelled_cases, "btcv": btcv.labelled_cases,
           "kits23": kits23.labelled_cases, "lits": lits.labelled_cases}


def detect_layout(root: Path, hint: str) -> str:
    """``nnunet`` when the folder looks like nnU-Net raw (imagesTr + dataset.json), else the task's own layout."""
    if (root / "imagesTr").is_dir() and any((root / "imagesTr").glob("*_0000.nii*")):
        return "nnunet"
    if hint in LAYOUTS:
        return hint
    raise ValueError(f"{root}: cannot tell the dataset layout (no imagesTr/*_0000.nii.gz); "
                     f"set task.layout to one of {sorted(LAYOUTS)}")


def discover_cases(root: str | Path, layout: str = "auto", task_name: str = "") -> list[Case]:
    """All cases of a dataset folder; errors name the folder and what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (set task.dataset_dir or MEDDINO_DATA)")
    layout = detect_layout(root, task_name) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown task.layout {layout!r}; one of {sorted(LAYOUTS)}")
    cases = LAYOUTS[layout](root)
    if not cases:
        raise FileNotFoundError(f"{root}: no cases found in the {layout} layout")
    require_unique_ids([c.case_id for c in cases], str(root))
    return cases


def filter_modality(cases: list[Case], modality: Optional[str], task_name: str) -> list[Case]:
    """AMOS22: CT below ``amos22.MRI_MIN_ID``, MRI from it on. ``modality=None`` keeps everything."""
    if not modality:
        return cases
    if task_name != "amos22" or modality.lower() not in ("ct", "mri"):
        raise ValueError(f"task.modality_filter={modality!r} is only defined for amos22 (ct|mri)")
    keep = []
    for case in cases:
        number = amos22.case_number(case.case_id)
        if number is None:
            raise ValueError(f"amos22 case id {case.case_id!r} has no number; cannot tell CT "
                             f"(< {amos22.MRI_MIN_ID}) from MRI")
        if amos22.is_mri(number) == (modality.lower() == "mri"):
            keep.append(case)
    return keep
