"""nnU-Net raw format (``DatasetXXX_Name``): ``imagesTr/{case}_0000{ending}``, ``labelsTr/{case}{ending}``,
``dataset.json`` (``file_ending``, ``channel_names``, ``labels``). The case id is the file name's case part."""
from __future__ import annotations

import json
import re
from pathlib import Path

from meddino_datasets.case import Case


def read_dataset_json(dataset_dir: Path) -> dict:
    """``dataset.json`` of a dataset folder ({} when there is none); invalid JSON is an error naming the file."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def labelled_cases(dataset_dir: Path, images: str = "imagesTr", labels: str = "labelsTr") -> list[Case]:
    """Every ``imagesTr`` case (``label=None`` when its label file is missing); single-channel only."""
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
