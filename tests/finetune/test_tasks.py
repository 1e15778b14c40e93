"""Task registry: owners' layouts of AMOS22/BTCV/KiTS23/LiTS, nnU-Net raw, label maps, AMOS CT filter, regions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.config import load_config
from finetune.tasks import task_cases, task_eval_regions, task_labels
from finetune.tasks.layouts import discover_cases


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _cfg(task: str, root: Path):
    return load_config(task, "primus", [], [f"task.dataset_dir={root}"])


def _amos_owners_tree(root: Path) -> None:
    """AMOS22 owners' layout: Tr with CT 1, 5 and MRI 507; Va with CT 8 and MRI 600 (all labelled)."""
    for split, ids in (("Tr", [1, 5, 507]), ("Va", [8, 600])):
        for i in ids:
            _touch(root / f"images{split}" / f"amos_{i:04d}.nii.gz")
            _touch(root / f"labels{split}" / f"amos_{i:04d}.nii.gz")


def test_amos22_owners_layout_keeps_ct_only(tmp_path):
    _amos_owners_tree(tmp_path)
    cfg = _cfg("amos22", tmp_path)
    assert [c.case_id for c in task_cases(cfg)] == ["amos_0001", "amos_0005", "amos_0008"]
    names = task_labels(cfg)
    assert len(names) == 16 and names[1] == "spleen" and names[15] == "prostate_uterus"


def test_amos22_ct_mri_is_nnunet_task2_all_labelled_cases(tmp_path):
    """The paper's AMOS22 (300 CT + 60 MRI): every labelled case of Tr and Va, per-image z-score, same label map."""
    _amos_owners_tree(tmp_path)
    cfg = _cfg("amos22_ct_mri", tmp_path)
    assert cfg.task.name == "amos22_ct_mri" and cfg.preprocess.normalization == "zscore"
    assert [c.case_id for c in task_cases(cfg)] == ["amos_0001", "amos_0005", "amos_0507", "amos_0008", "amos_0600"]
    assert task_labels(cfg) == task_labels(_cfg("amos22", tmp_path))
    assert _cfg("amos22", tmp_path).preprocess.normalization == "ct"


def test_amos22_nnunet_raw_also_filtered(tmp_path):
    for i in (3, 501):
        _touch(tmp_path / "imagesTr" / f"amos_{i:04d}_0000.nii.gz")
        _touch(tmp_path / "labelsTr" / f"amos_{i:04d}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    assert [c.case_id for c in task_cases(_cfg("amos22", tmp_path))] == ["amos_0003"]


def test_btcv_kits23_lits_layouts(tmp_path):
    for i in (1, 2):
        _touch(tmp_path / "btcv" / "RawData" / "Training" / "img" / f"img{i:04d}.nii.gz")
        _touch(tmp_path / "btcv" / "RawData" / "Training" / "label" / f"label{i:04d}.nii.gz")
        _touch(tmp_path / "kits23" / "dataset" / f"case_{i:05d}" / "imaging.nii.gz")
        _touch(tmp_path / "kits23" / "dataset" / f"case_{i:05d}" / "segmentation.nii.gz")
        _touch(tmp_path / "lits" / "Training Batch 1" / f"volume-{i}.nii")
        _touch(tmp_path / "lits" / "Training Batch 1" / f"segmentation-{i}.nii")
        # the owners' unlabelled challenge test scans sit beside Training and are not task cases
        _touch(tmp_path / "btcv" / "RawData" / "Testing" / "img" / f"img{60 + i:04d}.nii.gz")
        _touch(tmp_path / "lits" / "Testing Batch" / f"test-volume-{i}.nii")
    btcv = _cfg("btcv", tmp_path / "btcv")
    assert [c.case_id for c in task_cases(btcv)] == ["btcv_0001", "btcv_0002"]
    assert len(task_labels(btcv)) == 14
    kits = _cfg("kits23", tmp_path / "kits23")
    assert [c.case_id for c in task_cases(kits)] == ["case_00001", "case_00002"]
    assert task_labels(kits) == ["background", "kidney", "tumour", "cyst"]
    assert task_eval_regions(kits) == {"kidney_and_masses": [1, 2, 3], "masses": [2, 3], "tumour": [2]}
    lits = _cfg("lits", tmp_path / "lits")
    assert [c.case_id for c in task_cases(lits)] == ["train_1", "train_2"]
    assert task_eval_regions(lits) is None


def test_generic_nnunet_dataset_json_v1_v2_and_regions(tmp_path):
    ds = tmp_path / "Dataset042_Thing"
    _touch(ds / "imagesTr" / "x_001_0000.nii.gz")
    _touch(ds / "labelsTr" / "x_001.nii.gz")
    _touch(ds / "imagesTr" / "x_002_0000.nii.gz")   # unlabelled
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                 "labels": {"background": 0, "organ": 1, "lesion": 2}}))
    cfg = load_config(str(ds), "primus")
    assert cfg.task.name == "Dataset042_Thing"
    assert task_labels(cfg) == ["background", "organ", "lesion"]
    with pytest.raises(FileNotFoundError, match="x_002"):
        task_cases(cfg)
    assert len(task_cases(cfg, require_labels=False)) == 2
    (ds / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"}}))
    assert task_labels(load_config(str(ds), "primus")) == ["background", "liver"]
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "regions_class_order": [1, 2, 3],
        "labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}}))
    cfg = load_config(str(ds), "primus")
    assert task_labels(cfg) == ["background", "label_1", "tumor", "label_3"]
    assert task_eval_regions(cfg) == {"kidney": [1, 2, 3], "masses": [2, 3], "tumor": [2]}
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"}}))
    with pytest.raises(ValueError, match="2 input channels"):
        discover_cases(ds)


def test_bad_task_arguments(tmp_path):
    with pytest.raises(ValueError, match="neither a registered task"):
        load_config(str(tmp_path / "missing"), "primus")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        discover_cases(tmp_path / "empty")


def _nnunet_dataset(root: Path, name: str) -> Path:
    ds = root / name
    _touch(ds / "imagesTr" / "case_a_0000.nii.gz")
    _touch(ds / "labelsTr" / "case_a.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                 "file_ending": ".nii.gz"}))
    return ds


def test_task_by_nnunet_dataset_name_or_id_through_nnunet_raw(tmp_path, monkeypatch):
    """--task Dataset777_Name and --task 777 resolve as nnU-Net's maybe_convert_to_dataset_name does."""
    nnunet_ids = pytest.importorskip("nnunetv2.utilities.dataset_name_id_conversion")
    raw = tmp_path / "nnUNet_raw"
    ds = _nnunet_dataset(raw, "Dataset777_Liver")
    _nnunet_dataset(raw, "Dataset077_Other")
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.chdir(tmp_path)
    for arg in ("777", "Dataset777_Liver", str(ds)):
        cfg = load_config(arg, "primus")
        assert Path(cfg.task.dataset_dir) == ds.resolve() and cfg.task.name == "Dataset777_Liver", arg
        assert [c.case_id for c in task_cases(cfg)] == ["case_a"]
    for arg in ("777", "77", "Dataset777_Liver"):
        assert nnunet_ids.maybe_convert_to_dataset_name(arg) == Path(load_config(arg, "primus").task.dataset_dir).name
    with pytest.raises(ValueError, match=r"no folder named Dataset778_\* in \$nnUNet_raw"):
        load_config("778", "primus")
    _nnunet_dataset(raw, "Dataset777_Again")
    with pytest.raises(ValueError, match=r"2 \(Dataset777_Again, Dataset777_Liver\) folder named Dataset777_"):
        load_config("777", "primus")
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ValueError, match=r"\$nnUNet_raw, which is not set"):
        load_config("Dataset777_Liver", "primus")
    load_config(str(ds), "primus")  # a path needs no environment


def test_splits_file_found_where_nnunet_keeps_it(tmp_path, monkeypatch):
    from finetune.tasks import task_splits_file

    ds = _nnunet_dataset(tmp_path / "raw", "Dataset777_Liver")
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    cfg = load_config(str(ds), "primus")
    path, origin = task_splits_file(cfg)
    assert path is None and str(ds / "splits_final.json") in origin
    (ds / "splits_final.json").write_text("[]")
    assert task_splits_file(cfg) == (ds / "splits_final.json", "the raw dataset folder")
    pre = tmp_path / "pre"
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    assert task_splits_file(cfg)[0] == ds / "splits_final.json"  # nothing preprocessed yet: the raw one
    (pre / "Dataset777_Liver").mkdir(parents=True)
    (pre / "Dataset777_Liver" / "splits_final.json").write_text("[]")
    assert task_splits_file(cfg) == (pre / "Dataset777_Liver" / "splits_final.json", "$nnUNet_preprocessed")
    explicit = tmp_path / "mine.json"
    cfg = load_config(str(ds), "primus", overrides=[f"splits_file={explicit}"])
    assert task_splits_file(cfg) == (explicit, "splits_file=")


def test_lits_ids_give_nnunet_task029_fold0(tmp_path):
    """LiTS ids as nnU-Net's own conversion (Task029: ``volume-N`` -> ``train_N``), so fold 0 is nnU-Net's fold 0:
    the split sorts ``train_10`` before ``train_2``, which zero-padded ids would not."""
    from meddino_datasets.splits import fold_split

    for i in range(131):
        _touch(tmp_path / "Training Batch" / f"volume-{i}.nii")
        _touch(tmp_path / "Training Batch" / f"segmentation-{i}.nii")
    ids = [c.case_id for c in task_cases(_cfg("lits", tmp_path))]
    assert sorted(ids)[:4] == ["train_0", "train_1", "train_10", "train_100"]
    _, val = fold_split(ids, 0)
    # nnU-Net's fold 0 over the Task029 ids: sorted(train_0..train_130), KFold(5, shuffle, seed 12345)
    keys = sorted(f"train_{i}" for i in range(131))
    order = np.arange(131)
    np.random.RandomState(12345).shuffle(order)
    assert val == sorted(keys[i] for i in order[:27])
