"""predict.py refuses what it cannot segment, by name, and says what it does (issue #18; progress and help: #20).

Every input is a real scan from shared/data/real or a damaged copy of one (NaN voxels, a 0 mm / 100 mm header,
Modality re-labelled MR); the model is a real (tiny, briefly trained) finetune run on real CT."""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from finetune.predict import ScanRefused, main as predict_main, parse_args

FAST = ["preprocess.target_spacing_mm=[4.5,4.5]", "train.epochs=1", "train.iters_per_epoch=1", "train.val_iters=1"]


@pytest.fixture(scope="module")
def model_dir(tiny_nnunet_dataset: Path, repo_root: Path, tmp_path_factory) -> Path:
    """A finished finetune run (config.yaml, plans.json, model_final.pt, checkpoints/latest.pt) on real CT."""
    from finetune.run import main as run_main

    out = tmp_path_factory.mktemp("predict_model") / "fold0"
    run_main(["--task", str(tiny_nnunet_dataset), "--head", "primus", "--config", str(repo_root / "configs/finetune/tiny.yaml"),
              "--output", str(out), *FAST])
    assert (out / "model_final.pt").exists() and (out / "checkpoints" / "latest.pt").exists()
    return out


@pytest.fixture
def scan(tiny_nnunet_dataset: Path) -> Path:
    """A real CT: the lower half of the MSD spleen case (164 x 166 x 13, 0.79 x 0.79 x 5 mm)."""
    return tiny_nnunet_dataset / "imagesTr" / "msd_spleen_b_0000.nii.gz"


def damaged_copy(scan: Path, dst: Path, data=None, zooms=None) -> Path:
    """``scan`` re-saved at ``dst`` with other voxel values and/or header pixdim (x, y, z)."""
    img = nib.load(str(scan))
    header = img.header.copy()
    array = np.asanyarray(img.dataobj) if data is None else data
    header.set_data_dtype(array.dtype)
    out = nib.Nifti1Image(array, img.affine, header)
    if zooms is not None:
        out.header["pixdim"][1:4] = zooms
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dst))
    return dst


def run(model_dir: Path, inp: Path, out: Path, *extra: str) -> list[Path]:
    return predict_main(["--model", str(model_dir), "--input", str(inp), "--output", str(out), "--device", "cpu", *extra])


def test_every_option_has_help_and_usage_shows_the_call(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python finetune/predict.py --model RUN_DIR --input SCAN|FOLDER --output DIR")
    for option in ("--model", "--input", "--output", "--device", "--overwrite", "--force", "key=value"):
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.split(maxsplit=2)) == 3 or option == "key=value", f"{option} has no help text"


@pytest.mark.slow
def test_output_that_is_a_file_is_refused_before_predicting(model_dir, scan, tmp_path, monkeypatch):
    import finetune.predict

    monkeypatch.setattr(finetune.predict, "predict_case", lambda *a: pytest.fail("predicted before checking --output"))
    target = tmp_path / "labels"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match=r"--output .*labels is a file"):
        run(model_dir, scan, target)


@pytest.mark.slow
def test_two_inputs_with_one_output_name_are_refused(model_dir, scan, tmp_path, monkeypatch):
    import finetune.predict

    monkeypatch.setattr(finetune.predict, "predict_case", lambda *a: pytest.fail("predicted despite a name collision"))
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(scan, folder / "case.nii.gz")
    shutil.copy(scan, folder / "case_0000.nii.gz")
    with pytest.raises(ValueError, match=r"case.nii.gz and case_0000.nii.gz would both be written as case.nii.gz"):
        run(model_dir, folder, tmp_path / "out")


@pytest.mark.slow
def test_weights_used_are_named_and_a_checkpoint_only_run_warns(model_dir, scan, tmp_path, capsys):
    run(model_dir, scan, tmp_path / "final")
    assert f"weights: {model_dir / 'model_final.pt'}" in capsys.readouterr().out
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial, ignore=shutil.ignore_patterns("model_final.pt", "validation"))
    run(partial, scan, tmp_path / "latest")
    out = capsys.readouterr().err
    assert "warning:" in out and "no model_final.pt" in out and str(partial / "checkpoints" / "latest.pt") in out


@pytest.mark.slow
def test_progress_bar_counts_scans(model_dir, scan, tiny_nnunet_dataset, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("msd_spleen_b_0000.nii.gz", "ts_lower_0000.nii.gz"):
        shutil.copy(tiny_nnunet_dataset / "imagesTr" / name, folder / name)
    outputs = run(model_dir, folder, tmp_path / "out")
    assert [p.name for p in outputs] == ["msd_spleen_b.nii.gz", "ts_lower.nii.gz"]
    err = capsys.readouterr().err
    assert re.search(r"predict: +100%.*2/2 \[", err), err  # i/N with elapsed<remaining (tqdm)


@pytest.mark.slow
def test_mr_dicom_is_refused_unless_forced(model_dir, real_data, tmp_path):
    series = tmp_path / "mr_series"
    series.mkdir()
    for src in sorted((real_data / "dcmqi_ct3slice" / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(str(src))
        ds.Modality = "MR"
        ds.save_as(str(series / src.name))
    with pytest.raises(ScanRefused, match=r"mr_series: DICOM Modality MR \(3 files\), but the model was trained on CT; --force"):
        run(model_dir, series, tmp_path / "out")
    assert not (tmp_path / "out" / "mr_series.nii.gz").exists()
    outputs = run(model_dir, series, tmp_path / "out", "--force")
    assert nib.load(str(outputs[0])).shape == (512, 512, 3)


@pytest.mark.slow
def test_mr_nifti_is_refused_by_the_curation_intensity_rule(model_dir, real_data, tmp_path):
    brain = real_data / "pyradiomics" / "brain1_image.nii.gz"
    with pytest.raises(ScanRefused, match=r"brain1_image.nii.gz: only 0.000% of voxels below -500 HU .* trained on CT"):
        run(model_dir, brain, tmp_path / "out")
    assert [p.name for p in run(model_dir, brain, tmp_path / "out", "predict.min_air_fraction=0")] == ["brain1_image.nii.gz"]


@pytest.mark.slow
def test_nan_voxels_are_filled_with_a_count_not_an_empty_mask(model_dir, scan, tmp_path, capsys):
    data = np.asanyarray(nib.load(str(scan)).dataobj).astype(np.float32)
    damaged = data.copy()
    damaged[40:60, 50:80, 2:5] = np.nan
    damaged[0, 0, 0] = np.inf
    n_bad = 20 * 30 * 3 + 1
    nan_scan = damaged_copy(scan, tmp_path / "in" / "nan_ct.nii.gz", damaged)
    filled = damaged.copy()
    filled[~np.isfinite(filled)] = -1024
    ref_scan = damaged_copy(scan, tmp_path / "ref" / "nan_ct.nii.gz", filled)
    got = nib.load(str(run(model_dir, nan_scan, tmp_path / "out")[0])).get_fdata()
    assert f"warning: {nan_scan}: {n_bad} NaN/Inf voxels filled with -1024 HU" in capsys.readouterr().err
    expected = nib.load(str(run(model_dir, ref_scan, tmp_path / "out_ref")[0])).get_fdata()
    np.testing.assert_array_equal(got, expected)

    with pytest.raises(ScanRefused, match=rf"{n_bad} voxels are NaN or Inf"):
        run(model_dir, nan_scan, tmp_path / "out2", "predict.nonfinite=refuse")
    all_nan = damaged_copy(scan, tmp_path / "in" / "all_nan.nii.gz", np.full(data.shape, np.nan, np.float32))
    with pytest.raises(ScanRefused, match="every voxel is NaN or Inf"):
        run(model_dir, all_nan, tmp_path / "out3")


@pytest.mark.slow
@pytest.mark.parametrize("zooms, shown", [((0.794922, 0.794922, 0.0), "0.794922, 0.794922, 0"),
                                          ((100.0, 100.0, 5.0), "100, 100, 5")])
def test_implausible_spacing_is_refused_before_resampling(model_dir, scan, tmp_path, monkeypatch, zooms, shown):
    import finetune.predict

    monkeypatch.setattr(finetune.predict, "predict_case", lambda *a: pytest.fail("resampled an implausible spacing"))
    bad = damaged_copy(scan, tmp_path / "in" / "bad_spacing.nii.gz", zooms=zooms)
    with pytest.raises(ScanRefused, match=rf"bad_spacing.nii.gz: voxel spacing \({shown}\) mm is outside the plausible"):
        run(model_dir, bad, tmp_path / "out")


@pytest.mark.slow
def test_memory_is_bounded_before_resampling(model_dir, scan, tmp_path):
    with pytest.raises(ScanRefused, match=r"~0.0 GiB .* more than predict.max_memory_gib=1e-05"):
        run(model_dir, scan, tmp_path / "out", "predict.max_memory_gib=0.00001")


@pytest.mark.slow
def test_refused_scan_does_not_stop_the_others(model_dir, scan, real_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(scan, folder / "ct.nii.gz")
    shutil.copy(real_data / "pyradiomics" / "brain1_image.nii.gz", folder / "brain.nii.gz")
    with pytest.raises(ScanRefused, match=r"1 of 2 scan\(s\) refused .*brain.nii.gz"):
        run(model_dir, folder, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct.nii.gz"]


@pytest.mark.slow
def test_config_typo_names_the_nearest_key(model_dir, scan, tmp_path):
    with pytest.raises(ValueError, match=r"^command line: unknown config key infer.mirorr \(did you mean infer.mirror\?\)$"):
        run(model_dir, scan, tmp_path / "out", "infer.mirorr=false")
    with pytest.raises(ValueError, match=r"^command line: predict.max_memory_gib='lots' is a string, but "
                                         r"predict.max_memory_gib takes a number \(default 16.0\)$"):
        run(model_dir, scan, tmp_path / "out", "predict.max_memory_gib=lots")


@pytest.mark.slow
def test_cli_prints_one_line_for_a_refusal(model_dir, real_data, repo_root, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "finetune/predict.py", "--model", str(model_dir), "--input",
                           str(real_data / "pyradiomics" / "brain1_image.nii.gz"), "--output", str(tmp_path / "o"), "--device", "cpu"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 scan(s) refused")


@pytest.mark.slow
def test_output_that_is_not_writable_is_one_line(model_dir, scan, repo_root, tmp_path, as_unprivileged):
    """--output inside a read-only folder: one line before any model is loaded (as root: without CAP_DAC_OVERRIDE)."""
    import os
    import subprocess

    parent = tmp_path / "readonly"
    parent.mkdir()
    os.chmod(parent, 0o555)
    proc = subprocess.run([*as_unprivileged, sys.executable, "finetune/predict.py", "--model", str(model_dir), "--input", str(scan),
                           "--output", str(parent / "masks"), "--device", "cpu"], cwd=repo_root, capture_output=True, text=True,
                          timeout=300)
    os.chmod(parent, 0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"error: --output {parent / 'masks'}: cannot create the folder (Permission denied)"
