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
           "--config", "configs/finetune/tiny.yaml", "--output", str(out), *FAST]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DSC (%)" in proc.stdout and "MedDINOv3 (primus)" in proc.stdout
    return out


@pytest.mark.slow
def test_run_writes_model_predictions_and_metrics(trained_run: Path, tiny_nnunet_dataset: Path):
    out = trained_run
    for name in ("config.yaml", "plans.json", "splits_final.json", "metrics.jsonl", "model_final.pt",
                 "checkpoints/latest.pt", "summary.json", "per_case.csv"):
        assert (out / name).exists(), name
    splits = json.loads((out / "splits_final.json").read_text())
    assert splits[0]["val"] == ["ts_lower", "ts_upper"]           # nnU-Net fold 0 of the 6 sorted ids
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    summary = json.loads((out / "summary.json").read_text())
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
