"""A non-editable install (the wheel) works away from the checkout: configs ship inside it, the console scripts
exist, and the README's finetune and predict commands run from another folder on real CT."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

FAST = ["preprocess.target_spacing_mm=[4.5,4.5]", "train.epochs=2", "train.iters_per_epoch=2"]
SCRIPTS = ("meddino-curate", "meddino-pretrain", "meddino-finetune", "meddino-predict")


@pytest.fixture(scope="module")
def installed(repo_root: Path, tmp_path_factory) -> Path:
    """``pip install --no-deps --target`` of the wheel built from this checkout (dependencies: the test's venv)."""
    tmp = tmp_path_factory.mktemp("install")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(repo_root)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp / "dist").glob("meddinov3-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"configs/finetune/base.yaml", "configs/finetune/tiny.yaml", "configs/pretrain/base.yaml",
            "configs/finetune/heads/primus.yaml"} <= names
    assert all(f"{s} =" in entry_points for s in SCRIPTS)
    site = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def _run(site: Path, cwd: Path, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(site)}
    return subprocess.run([str(site / "bin" / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_console_script_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    from finetune.console import finetune

    monkeypatch.chdir(tmp_path)
    assert finetune(["--task", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --task 'nowhere' is neither") and err.count("\n") == 1


@pytest.mark.slow
def test_readme_finetune_and_predict_from_another_folder(installed: Path, spleen_nnunet_dataset, tmp_path: Path):
    """meddino-finetune --task 501 (found through $nnUNet_raw) --fold all on one real CT, then meddino-predict."""
    dataset, _ = spleen_nnunet_dataset
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import finetune; print(finetune.__file__)"], cwd=elsewhere,
                           env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(installed))  # the installed copy, not the checkout
    assert all((installed / "bin" / script).is_file() for script in SCRIPTS)
    for script in ("meddino-finetune", "meddino-predict"):
        proc = _run(installed, elsewhere, script, "--help")
        assert proc.returncode == 0 and f"usage: {script}" in proc.stdout, (script, proc.stderr[-2000:])
    env = {"nnUNet_raw": str(dataset.parent)}
    proc = _run(installed, elsewhere, "meddino-finetune", "--task", "501", "--fold", "all",
                "--config", "configs/finetune/tiny.yaml", "--output", "run", *FAST, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = elsewhere / "run"
    assert (run / "validation" / "summary.json").is_file() and (run / "progress.png").is_file()
    assert not (run / "splits_final.json").exists()  # fold all: one case, no 5-fold split needed
    image = dataset / "imagesTr" / "spleen2_0000.nii.gz"
    proc = _run(installed, elsewhere, "meddino-predict", "--model", "run", "--input", str(image), "--output", "masks")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert nib.load(str(elsewhere / "masks" / "spleen2.nii.gz")).shape == nib.load(str(image)).shape
