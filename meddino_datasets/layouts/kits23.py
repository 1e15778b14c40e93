"""KiTS23 (github.com/neheller/kits23): ``dataset/case_XXXXX/{imaging,segmentation}.nii.gz`` (``instances/``
beside them). Canonical case id: the case folder, ``case_00000``; every case is labelled and trained on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from meddino_datasets.case import Case

IMAGE_FILE = "imaging.nii.gz"
LABEL_FILE = "segmentation.nii.gz"


def training_case_id(image: Path) -> Optional[str]:
    """``case_00000`` for ``case_00000/imaging.nii[.gz]``, else None."""
    if image.name not in ("imaging.nii.gz", "imaging.nii") or not image.parent.name.startswith("case_"):
        return None
    return image.parent.name


def labelled_cases(root: Path) -> list[Case]:
    """Every ``case_*`` folder with an image (``root`` may be the repository or its ``dataset/``)."""
    base = root / "dataset" if (root / "dataset").is_dir() else root
    cases = []
    for case_dir in sorted(p for p in base.glob("case_*") if p.is_dir()):
        image, label = case_dir / IMAGE_FILE, case_dir / LABEL_FILE
        if image.exists():
            cases.append(Case(case_dir.name, image, label if label.exists() else None))
    return cases
