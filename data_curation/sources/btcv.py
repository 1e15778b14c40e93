"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Synapse syn3193805).

Layout: ``RawData/Training/img/img0001.nii.gz`` (labels in ``.../label/label0001.nii.gz``) and
``RawData/Testing/img/img0061.nii.gz``. Case id: ``img0001``.
"""
from pathlib import Path

from data_curation.sources.base import Case, SourceAdapter, find_nifti, nifti_cases, split_from_path, strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, r"img\d{4}\.nii(\.gz)?") if p.parent.name == "img"]
    return nifti_cases("btcv", files, lambda p: strip_nifti_suffix(p.name), split_from_path)


def finetune_case_id(case: Case) -> str | None:
    """The finetune task names ``img0001`` ``btcv_0001`` and trains/validates on the labelled Training cases."""
    return "btcv_" + case.case_id[len("img"):] if case.split == "train" else None


ADAPTER = SourceAdapter("btcv", "RawData/{Training,Testing}/img/imgNNNN.nii.gz", find, "https://www.synapse.org/#!Synapse:syn3193805",
                        finetune_case_id=finetune_case_id)
