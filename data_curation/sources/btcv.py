"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Synapse syn3193805): every image of the owners' layout
(:mod:`meddino_datasets.layouts.btcv`), ``RawData/Training/img/img0001.nii.gz`` and the unlabelled
``RawData/Testing/img/img0061.nii.gz``. Case id: ``img0001`` (the finetune task's is ``btcv_0001``).
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import btcv, split_from_path
from meddino_datasets.readers.nifti import strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    files = [p for p in find_nifti(root, btcv.IMAGE_NAME.pattern) if p.parent.name == "img"]
    return nifti_cases("btcv", files, lambda p: strip_nifti_suffix(p.name), split_from_path)


ADAPTER = SourceAdapter("btcv", "RawData/{Training,Testing}/img/imgNNNN.nii.gz", find, "https://www.synapse.org/#!Synapse:syn3193805",
                        finetune_case_id=lambda case: btcv.training_case_id(case.image))
