"""Every adapter finds exactly the image files of a fixture tree laid out as its owners distribute the dataset."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_curation.sources import REGISTRY
from data_curation.sources.base import looks_like_dicom

from .conftest import link


@pytest.fixture(scope="module")
def nii(real_data: Path) -> Path:
    return real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz"


@pytest.fixture(scope="module")
def dcm_files(real_data: Path) -> list[Path]:
    return sorted((real_data / "dcmqi_ct3slice" / "dicom").glob("*.dcm"))


def _ids(name: str, root: Path, options: dict | None = None) -> list[str]:
    return [c.case_id for c in REGISTRY[name].find(root, options or {})]


def test_registry_has_every_paper_source():
    expected = {"btcv", "pancreas_ct", "chaos", "lits", "kits23", "word", "abdomenct1k", "amos22", "msd_liver", "msd_lung",
                "msd_pancreas", "msd_hepaticvessel", "msd_spleen", "msd_colon", "ctorg", "totalseg", "abdomenatlas", "folder"}
    assert set(REGISTRY) == expected


def test_btcv(tmp_path, nii):
    for rel in ["RawData/Training/img/img0001.nii.gz", "RawData/Training/img/img0002.nii.gz", "RawData/Testing/img/img0061.nii.gz",
                "RawData/Training/label/label0001.nii.gz"]:
        link(nii, tmp_path / rel)
    cases = REGISTRY["btcv"].find(tmp_path, {})
    assert [(c.case_id, c.split) for c in cases] == [("img0001", "train"), ("img0002", "train"), ("img0061", "test")]


def test_pancreas_ct_dicom(tmp_path, dcm_files):
    for pid in ("PANCREAS_0001", "PANCREAS_0002"):
        for i, f in enumerate(dcm_files):
            link(f, tmp_path / "Pancreas-CT" / pid / "11-24-2015-PANCREAS0001-Pancreas-99667" / "Pancreas-99667" / f"1-{i + 1:03d}.dcm")
    cases = REGISTRY["pancreas_ct"].find(tmp_path, {})
    assert [c.case_id for c in cases] == ["PANCREAS_0001", "PANCREAS_0002"]
    assert all(c.kind == "dicom" and len(c.paths) == 3 for c in cases)


def test_chaos_ct_only(tmp_path, dcm_files):
    for f in dcm_files:
        link(f, tmp_path / "CHAOS_Train_Sets/Train_Sets/CT/1/DICOM_anon" / f"i{f.stem},0000b.dcm")
        link(f, tmp_path / "CHAOS_Test_Sets/Test_Sets/CT/3/DICOM_anon" / f"i{f.stem},0000b.dcm")
        link(f, tmp_path / "CHAOS_Train_Sets/Train_Sets/MR/1/T2SPIR/DICOM_anon" / f"IMG-{f.stem}.dcm")
    cases = REGISTRY["chaos"].find(tmp_path, {})
    assert [(c.case_id, c.split, len(c.paths)) for c in cases] == [("test-3", "test", 3), ("train-1", "train", 3)]


def test_lits(tmp_path, nii):
    for rel in ["Training Batch 1/volume-0.nii", "Training Batch 2/volume-130.nii", "Training Batch 1/segmentation-0.nii",
                "test/test-volume-5.nii"]:
        link(nii, tmp_path / rel)
    cases = REGISTRY["lits"].find(tmp_path, {})
    assert [(c.case_id, c.split) for c in cases] == [("test-volume-5", "test"), ("volume-0", "train"), ("volume-130", "train")]


def test_kits23(tmp_path, nii):
    for rel in ["dataset/case_00000/imaging.nii.gz", "dataset/case_00000/segmentation.nii.gz",
                "dataset/case_00000/instances/kidney_instance-1_annotation-1.nii.gz", "dataset/case_00588/imaging.nii.gz"]:
        link(nii, tmp_path / rel)
    assert _ids("kits23", tmp_path) == ["case_00000", "case_00588"]


def test_word(tmp_path, nii):
    for rel in ["WORD-V0.1.0/imagesTr/word_0001.nii.gz", "WORD-V0.1.0/imagesVal/word_0101.nii.gz",
                "WORD-V0.1.0/imagesTs/word_0121.nii.gz", "WORD-V0.1.0/labelsTr/word_0001.nii.gz"]:
        link(nii, tmp_path / rel)
    cases = REGISTRY["word"].find(tmp_path, {})
    assert [(c.case_id, c.split) for c in cases] == [("word_0001", "train"), ("word_0101", "val"), ("word_0121", "test")]


def test_abdomenct1k(tmp_path, nii):
    for rel in ["AbdomenCT-1K-ImagePart1/Case_00001_0000.nii.gz", "AbdomenCT-1K-ImagePart2/Case_00401_0000.nii.gz",
                "Mask/Case_00001.nii.gz"]:
        link(nii, tmp_path / rel)
    assert _ids("abdomenct1k", tmp_path) == ["Case_00001", "Case_00401"]


def test_amos22_skips_mri_by_id(tmp_path, nii):
    for rel in ["amos22/imagesTr/amos_0001.nii.gz", "amos22/imagesTr/amos_0500.nii.gz", "amos22/imagesTr/amos_0507.nii.gz",
                "amos22/imagesVa/amos_0008.nii.gz", "amos22/imagesVa/amos_0540.nii.gz", "amos22/imagesTs/amos_0002.nii.gz",
                "amos22/labelsTr/amos_0001.nii.gz"]:
        link(nii, tmp_path / rel)
    cases = REGISTRY["amos22"].find(tmp_path, {})
    assert [(c.case_id, c.split) for c in cases] == [("amos_0001", "train"), ("amos_0002", "test"), ("amos_0008", "val"), ("amos_0500", "train")]


@pytest.mark.parametrize("name,task,prefix,ids", [
    ("msd_liver", "Task03_Liver", "liver", ["0", "130"]),
    ("msd_lung", "Task06_Lung", "lung", ["001", "096"]),
    ("msd_pancreas", "Task07_Pancreas", "pancreas", ["001", "421"]),
    ("msd_hepaticvessel", "Task08_HepaticVessel", "hepaticvessel", ["001", "459"]),
    ("msd_spleen", "Task09_Spleen", "spleen", ["2", "63"]),
    ("msd_colon", "Task10_Colon", "colon", ["001", "222"]),
])
def test_msd(tmp_path, nii, name, task, prefix, ids):
    link(nii, tmp_path / task / "imagesTr" / f"{prefix}_{ids[0]}.nii.gz")
    link(nii, tmp_path / task / "imagesTs" / f"{prefix}_{ids[1]}.nii.gz")
    link(nii, tmp_path / task / "imagesTr" / f"._{prefix}_{ids[0]}.nii.gz")  # macOS resource fork in the tarball
    link(nii, tmp_path / task / "labelsTr" / f"{prefix}_{ids[0]}.nii.gz")
    link(nii, tmp_path / "Task99_Other" / "imagesTr" / f"other_{ids[0]}.nii.gz")
    expected = sorted(f"{prefix}_{i}" for i in ids)
    assert _ids(name, tmp_path) == expected
    assert _ids(name, tmp_path / task) == expected  # root may be the task folder itself


def test_ctorg(tmp_path, nii):
    for rel in ["OrganSegmentations/volume-0.nii.gz", "OrganSegmentations/volume-139.nii.gz", "OrganSegmentations/labels-0.nii.gz"]:
        link(nii, tmp_path / rel)
    assert _ids("ctorg", tmp_path) == ["volume-0", "volume-139"]


def test_totalseg(tmp_path, nii):
    for rel in ["Totalsegmentator_dataset_v201/s0000/ct.nii.gz", "Totalsegmentator_dataset_v201/s1428/ct.nii.gz",
                "Totalsegmentator_dataset_v201/s0000/segmentations/liver.nii.gz"]:
        link(nii, tmp_path / rel)
    (tmp_path / "Totalsegmentator_dataset_v201" / "meta.csv").write_text("image_id;age\n")
    assert _ids("totalseg", tmp_path) == ["s0000", "s1428"]


def test_abdomenatlas(tmp_path, nii):
    for rel in ["AbdomenAtlas3.0/BDMAP_00000001/ct.nii.gz", "AbdomenAtlas3.0/BDMAP_00005195/ct.nii.gz",
                "AbdomenAtlas3.0/BDMAP_00000001/segmentations/liver.nii.gz", "AbdomenAtlas3.0/BDMAP_00000001/combined_labels.nii.gz"]:
        link(nii, tmp_path / rel)
    assert _ids("abdomenatlas", tmp_path) == ["BDMAP_00000001", "BDMAP_00005195"]


def test_folder_mixes_nifti_and_dicom(tmp_path, sample_ct, real_data):
    link(sample_ct / "totalsegmentator", tmp_path / "ts")
    link(sample_ct / "msd_spleen", tmp_path / "spleen")
    link(real_data / "totalsegmentator" / "example_ct_dicom", tmp_path / "dicom" / "example")  # files have no extension
    cases = REGISTRY["folder"].find(tmp_path, {"exclude_patterns": ["*seg*", "*label*", "*mask*"]})
    assert [(c.case_id, c.kind) for c in cases] == [("dicom_example", "dicom"), ("spleen_sub-spleen2_ct", "nifti"), ("ts_example_ct", "nifti")]
    dicom = cases[0]
    assert len(dicom.paths) == 20 and all(looks_like_dicom(Path(p)) for p in dicom.paths)


def _owners_tree(task: str, root: Path, nii: Path) -> Path:
    """A labelled fixture tree in the owners' layout of a finetune task -> the folder the finetune task is pointed at.
    Ids are chosen so that naming matters: ``volume-10`` sorts before ``volume-2``, BTCV ids have gaps, AMOS has MRI
    (> 500) and validation cases, and every source has unlabelled test cases that no split may touch."""
    if task == "amos22":
        for folder, ids in (("Tr", [1, 2, 3, 5, 8, 13, 21, 34, 500, 501, 555]), ("Va", [6, 9, 40, 507])):
            for i in ids:
                link(nii, root / f"images{folder}" / f"amos_{i:04d}.nii.gz")
                link(nii, root / f"labels{folder}" / f"amos_{i:04d}.nii.gz")
        link(nii, root / "imagesTs" / "amos_0100.nii.gz")
        return root
    if task == "btcv":
        for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 21, 22, 23):
            link(nii, root / "RawData/Training/img" / f"img{i:04d}.nii.gz")
            link(nii, root / "RawData/Training/label" / f"label{i:04d}.nii.gz")
        link(nii, root / "RawData/Testing/img/img0061.nii.gz")
        return root / "RawData" / "Training"  # the finetune layout requires a label for every img/ file it finds
    if task == "kits23":
        for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 299, 300):
            link(nii, root / "dataset" / f"case_{i:05d}" / "imaging.nii.gz")
            link(nii, root / "dataset" / f"case_{i:05d}" / "segmentation.nii.gz")
        return root
    assert task == "lits"
    for i in range(15):
        batch = "Training Batch 1" if i < 7 else "Training Batch 2"
        link(nii, root / batch / f"volume-{i}.nii")
        link(nii, root / batch / f"segmentation-{i}.nii")
    link(nii, root / "Test" / "test-volume-0.nii")
    return root


@pytest.mark.parametrize("task", ["amos22", "btcv", "kits23", "lits"])
def test_holdout_excludes_exactly_the_finetune_validation_images(tmp_path, nii, repo_root, task):
    """``--holdout-finetune`` drops the very image files the finetune task validates on in fold 0: the finetune side
    runs its own case discovery and split (as ``finetune/run.py`` ``prepare_fold``), the curation side its adapter
    and ``holdout_cases``; compared by file, so a naming difference that reorders the nnU-Net split fails here."""
    from data_curation.discovery import discover, holdout_cases
    from data_curation.settings import load_settings
    from finetune.config import load_config as finetune_config
    from meddino_datasets.splits import fold_split
    from finetune.tasks import task_cases

    finetune_root = _owners_tree(task, tmp_path, nii)
    ft_cfg = finetune_config(task, overrides=[f"task.dataset_dir={finetune_root}"])
    by_id = {c.case_id: c for c in task_cases(ft_cfg)}
    _, val = fold_split(list(by_id), ft_cfg.fold, ft_cfg.get("splits_file"))
    expected = {os.path.abspath(by_id[i].image) for i in val}

    settings = load_settings(repo_root / "configs" / "data" / "ct3m.yaml", [f"{task}={tmp_path}"])
    found = discover(settings, [task])
    held = holdout_cases(settings, found)
    source = settings.holdout.tasks[task]
    paths = {c.uid: os.path.abspath(c.paths[0]) for c in found[source]}
    assert {paths[uid] for uid in held[task]} == expected
    assert 2 <= len(expected) < len(by_id)


def test_symlink_loop_yields_each_file_once(tmp_path, nii, dcm_files):
    link(nii, tmp_path / "a" / "scan.nii.gz")
    os.symlink(tmp_path, tmp_path / "a" / "up")        # a/up -> root: a loop
    os.symlink(tmp_path / "a", tmp_path / "a_again")  # a second way into a/
    for f in dcm_files:
        link(f, tmp_path / "a" / "series" / f.stem)   # extension-less DICOM names
    cases = REGISTRY["folder"].find(tmp_path, {"exclude_patterns": []})
    assert [(c.case_id, c.kind, len(c.paths)) for c in cases] == [("a_scan", "nifti", 1), ("a_series", "dicom", 3)]


def test_unreadable_files_and_folders_are_reported_during_discovery(tmp_path, nii):
    from data_curation.sources.base import collect_problems

    link(nii, tmp_path / "good" / "scan.nii.gz")
    os.symlink(tmp_path / "gone", tmp_path / "good" / "IM0001")  # extension-less file that cannot be opened
    with collect_problems() as problems:
        cases = REGISTRY["folder"].find(tmp_path, {"exclude_patterns": []})
    assert [c.case_id for c in cases] == ["good_scan"]
    assert [(Path(p["file"]).name, p["reason"], p["filtered"]) for p in problems] == [("IM0001", "unreadable", False)]
    assert "No such file or directory" in problems[0]["detail"]
