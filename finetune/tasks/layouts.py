"""Find (case id, image, label) triples in the owners' layouts of each benchmark and in nnU-Net raw format."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One labelled (or unlabelled, ``label=None``) volume."""

    case_id: str
    image: Path
    label: Optional[Path]


def strip_nifti(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)) if folder.is_dir() else []


def read_dataset_json(dataset_dir: Path) -> dict:
    path = dataset_dir / "dataset.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def nnunet_cases(dataset_dir: Path, images: str = "imagesTr", labels: str = "labelsTr") -> list[Case]:
    """nnU-Net raw: ``imagesTr/{case}_0000{ending}`` + ``labelsTr/{case}{ending}``; single-channel CT only."""
    meta = read_dataset_json(dataset_dir)
    ending = meta.get("file_ending", ".nii.gz")
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise ValueError(f"{dataset_dir}/dataset.json declares {len(channels)} input channels {dict(channels)}; "
                         "the finetune pipeline segments single-channel CT (one _0000 file per case)")
    image_dir, label_dir = dataset_dir / images, dataset_dir / labels
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} not found: an nnU-Net raw dataset needs {images}/<case>_0000{ending}")
    cases = []
    for image in sorted(image_dir.glob(f"*_0000{ending}")):
        case_id = image.name[: -len(f"_0000{ending}")]
        label = label_dir / f"{case_id}{ending}"
        cases.append(Case(case_id, image, label if label.exists() else None))
    extra = sorted(p.name for p in image_dir.glob(f"*{ending}") if not re.search(rf"_0000{re.escape(ending)}$", p.name))
    if extra:
        raise ValueError(f"{image_dir}: files without the _0000 channel suffix or with extra channels: {extra[:5]}")
    return cases


def amos22_cases(root: Path) -> list[Case]:
    """Owners' layout ``{imagesTr,labelsTr,imagesVa,labelsVa}/amos_XXXX.nii.gz`` (Tr and Va are both labelled)."""
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
        for image in _niftis(root / images):
            label = root / labels / image.name
            cases.append(Case(strip_nifti(image.name), image, label if label.exists() else None))
    return cases


def btcv_cases(root: Path) -> list[Case]:
    """Owners' layout ``.../Training/img/imgXXXX.nii.gz`` + ``.../Training/label/labelXXXX.nii.gz``.

    The owners' ``RawData/Testing/img`` (the challenge's unlabelled test scans) has no ``label`` folder beside it:
    those images are not part of the task. A missing file inside a ``label`` folder still surfaces as an
    unlabelled case (an error in ``task_cases``).
    """
    cases = []
    for image_dir in sorted(p for p in root.rglob("img") if p.is_dir() and (p.parent / "label").is_dir()):
        for image in _niftis(image_dir):
            number = strip_nifti(image.name)[len("img"):]
            label = next((p for p in (image_dir.parent / "label" / f"label{number}{s}" for s in NIFTI_SUFFIXES)
                          if p.exists()), None)
            cases.append(Case(f"btcv_{number}", image, label))
    return cases


def kits23_cases(root: Path) -> list[Case]:
    """Owners' layout ``dataset/case_XXXXX/{imaging,segmentation}.nii.gz`` (``root`` may be the repo or dataset/)."""
    base = root / "dataset" if (root / "dataset").is_dir() else root
    cases = []
    for case_dir in sorted(p for p in base.glob("case_*") if p.is_dir()):
        image = case_dir / "imaging.nii.gz"
        label = case_dir / "segmentation.nii.gz"
        if image.exists():
            cases.append(Case(case_dir.name, image, label if label.exists() else None))
    return cases


def lits_case_id(number: str) -> str:
    """nnU-Net's own LiTS conversion (v1 ``Task029_LITS``) names ``volume-N`` ``train_N`` (no zero padding), so the
    sorted ids, and with them nnU-Net's 5-fold split, are the ones every nnU-Net LiTS result was trained on."""
    return f"train_{int(number)}" if number.isdigit() else f"train_{number}"


def lits_cases(root: Path) -> list[Case]:
    """Owners' layout ``volume-N.nii`` + ``segmentation-N.nii`` anywhere below ``root``; ids as `lits_case_id`."""
    cases = []
    for image in sorted(root.rglob("volume-*.nii*")):
        number = strip_nifti(image.name)[len("volume-"):]
        label = next((p for p in (image.parent / f"segmentation-{number}{s}" for s in NIFTI_SUFFIXES) if p.exists()), None)
        cases.append(Case(lits_case_id(number), image, label))
    return cases


LAYOUTS = {"nnunet": nnunet_cases, "amos22": amos22_cases, "btcv": btcv_cases, "kits23": kits23_cases,
           "lits": lits_cases}


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
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{root}: duplicate case ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return cases


def case_number(case_id: str) -> Optional[int]:
    """Trailing integer of a case id (``amos_0507`` -> 507), None if there is none."""
    match = re.search(r"(\d+)$", case_id)
    return int(match.group(1)) if match else None


def filter_modality(cases: list[Case], modality: Optional[str], task_name: str) -> list[Case]:
    """AMOS22: ids <= 500 are CT, > 500 MRI. ``modality=None`` keeps everything."""
    if not modality:
        return cases
    if task_name != "amos22" or modality.lower() not in ("ct", "mri"):
        raise ValueError(f"task.modality_filter={modality!r} is only defined for amos22 (ct|mri)")
    keep = []
    for case in cases:
        number = case_number(case.case_id)
        if number is None:
            raise ValueError(f"amos22 case id {case.case_id!r} has no number; cannot tell CT (<=500) from MRI")
        if (number <= 500) == (modality.lower() == "ct"):
            keep.append(case)
    return keep
