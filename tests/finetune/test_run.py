"""End to end on real CT: finetune/run.py (as a script) -> model, validation NIfTIs, metrics; predict.py on NIfTI and
DICOM input; geometry (shape and affine of the original scan) preserved."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Coarse in-plane spacing keeps CPU inference small; everything else is the real pipeline.
FAST = ["preprocess.target_spacing_mm=[4.5,4.5]", "train.epochs=2", "train.iters_per_epoch=2"]


@pytest.fixture(scope="module")
def trained_run(tiny_nnunet_dataset: Path, repo_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft_run") / "fold0"
    cmd = [sys.executable, "finetune/run.py", "--task", str(tiny_nnunet_dataset), "--head", "primus",
           "--config", "configs/finetune/tiny.yaml", "--output", str(out), *FAST, "train.progress=true"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DSC (%)" in proc.stdout and "MedDINOv3 (primus)" in proc.stdout
    assert "validation: 100%" in proc.stderr and "2/2" in proc.stderr  # a progress bar with i/N and ETA
    assert "split: nnU-Net's default 5-fold split" in proc.stdout
    return out


@pytest.mark.slow
def test_run_writes_model_predictions_and_metrics(trained_run: Path, tiny_nnunet_dataset: Path):
    out = trained_run
    for name in ("config.yaml", "plans.json", "splits_final.json", "metrics.jsonl", "model_final.pt",
                 "checkpoints/latest.pt", "validation/summary.json", "per_case.csv", "training_log.txt",
                 "progress.png", "checkpoint_best.pth", "checkpoint_final.pth"):
        assert (out / name).exists(), name
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits[0]["val"] == ["ts_lower", "ts_upper"]           # nnU-Net fold 0 of the 6 sorted ids
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert set(summary["per_class"]) == {"spleen", "liver"}
    assert summary["n_cases"] == 2 and summary["cases"] == ["ts_lower", "ts_upper"]
    # ts_lower has neither organ: excluded from the means and reported as absent
    assert summary["per_class"]["spleen"]["n_cases"] == 1 and summary["per_class"]["spleen"]["n_absent_in_gt"] == 1
    assert 0.0 <= summary["paper_mean"]["dice"] <= 1.0
    assert set(summary["mean"]) == {"1", "2"} and "Dice" in summary["foreground_mean"]   # nnU-Net layout too
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert len(rows) == 4 and {r["case_id"] for r in rows} == {"ts_lower", "ts_upper"}
    for case in ("ts_lower", "ts_upper"):
        image = nib.load(str(tiny_nnunet_dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        pred = nib.load(str(out / "validation" / f"{case}.nii.gz"))
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        values = np.unique(np.asanyarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_predict_nifti_and_dicom_keep_original_geometry(trained_run: Path, tiny_nnunet_dataset: Path, real_data: Path,
                                                          tmp_path: Path):
    from finetune.predict import main as predict_main

    scan = tiny_nnunet_dataset / "imagesTr" / "msd_spleen_b_0000.nii.gz"
    outputs = predict_main(["--model", str(trained_run), "--input", str(scan), "--output", str(tmp_path / "nifti")])
    assert [p.name for p in outputs] == ["msd_spleen_b.nii.gz"]
    ref, pred = nib.load(str(scan)), nib.load(str(outputs[0]))
    assert pred.shape == ref.shape
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)

    dicom_dir = real_data / "dcmqi_ct3slice" / "dicom"
    outputs = predict_main(["--model", str(trained_run / "model_final.pt"), "--input", str(dicom_dir),
                            "--output", str(tmp_path / "dicom")])
    pred = nib.load(str(outputs[0]))
    reference = nib.load(str(real_data / "dcmqi_ct3slice" / "liver_spine_seg.nii.gz"))  # geometry from the series
    assert pred.shape == reference.shape == (512, 512, 3)
    np.testing.assert_allclose(pred.affine, reference.affine, atol=1e-3)
    assert pred.get_data_dtype() == np.uint8

    with pytest.raises(FileNotFoundError, match="plans.json|config.yaml|model"):
        predict_main(["--model", str(tmp_path), "--input", str(scan), "--output", str(tmp_path / "x")])


def test_fold_split_found_where_nnunet_keeps_it_matches_nnunet_trainer(tmp_path, monkeypatch, capsys):
    """A splits_final.json in $nnUNet_preprocessed/DatasetXXX_Name/ is used, and said so, with the cases nnU-Net's
    own trainer (nnUNetTrainer.do_split) takes from the same file; fold 'all' needs no split and writes none."""
    from types import SimpleNamespace

    trainer = pytest.importorskip("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    from finetune.run import build_config, fold_case_ids, parse_args

    raw = tmp_path / "raw" / "Dataset777_Three"
    ids = ["case_a", "case_b", "case_c"]
    for case in ids:
        (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
        (raw / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "liver": 1}}))
    pre = tmp_path / "pre" / raw.name
    pre.mkdir(parents=True)
    splits = [{"train": ["case_a", "case_b"], "val": ["case_c"]}, {"train": ["case_c"], "val": ["case_a", "case_b"]}]
    (pre / "splits_final.json").write_text(json.dumps(splits))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    out = tmp_path / "out"
    out.mkdir()
    cfg = build_config(parse_args(["--task", str(raw), "--fold", "1", "--output", str(out)]))
    ours = fold_case_ids(cfg, ids)
    assert f"split: {pre / 'splits_final.json'} (from $nnUNet_preprocessed), fold 1" in capsys.readouterr().out
    assert cfg.splits_file == str(pre / "splits_final.json") and not (out / "splits_final.json").exists()
    fake_trainer = SimpleNamespace(
        dataset_class=lambda *a, **k: SimpleNamespace(identifiers=ids), fold=1, preprocessed_dataset_folder=str(pre),
        preprocessed_dataset_folder_base=str(pre), folder_with_segs_from_previous_stage=None,
        print_to_log_file=lambda *a, **k: None)
    assert ours == tuple(trainer.nnUNetTrainer.do_split(fake_trainer))

    cfg = build_config(parse_args(["--task", str(raw), "--fold", "all", "--output", str(out)]))
    assert fold_case_ids(cfg, ids) == (ids, ids)  # 3 cases < 5 folds: fine for fold all
    assert "fold all" in capsys.readouterr().out and not (out / "splits_final.json").exists()
