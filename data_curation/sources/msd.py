"""Medical Segmentation Decathlon CT tasks 03, 06, 07, 08, 09, 10 (one adapter each).

Layout: ``TaskNN_Name/{imagesTr,imagesTs}/<prefix>_<n>.nii.gz`` (labels in ``labelsTr/``). The official tarballs
also contain macOS resource forks ``._<prefix>_<n>.nii.gz``, which are not images and are skipped. The root may
be the task folder itself or a folder that contains it. Case id: ``liver_0``, ``spleen_2``...
"""
from pathlib import Path

from data_curation.sources.base import SourceAdapter, find_nifti, nifti_cases
from meddino_datasets.case import Case
from meddino_datasets.layouts import split_from_path
from meddino_datasets.readers.nifti import strip_nifti_suffix

_TASKS = {
    "msd_liver": ("Task03_Liver", "liver"),
    "msd_lung": ("Task06_Lung", "lung"),
    "msd_pancreas": ("Task07_Pancreas", "pancreas"),
    "msd_hepaticvessel": ("Task08_HepaticVessel", "hepaticvessel"),
    "msd_spleen": ("Task09_Spleen", "spleen"),
    "msd_colon": ("Task10_Colon", "colon"),
}


def _finder(source: str, prefix: str):
    def find(root: Path, options: dict) -> list[Case]:
        files = [p for p in find_nifti(root, rf"{prefix}_\d+\.nii(\.gz)?") if p.parent.name in ("imagesTr", "imagesTs")]
        return nifti_cases(source, files, lambda p: strip_nifti_suffix(p.name), split_from_path)

    return find


ADAPTERS = [
    SourceAdapter(name, f"{task}/images{{Tr,Ts}}/{prefix}_N.nii.gz", _finder(name, prefix), "http://medicaldecathlon.com")
    for name, (task, prefix) in _TASKS.items()
]
