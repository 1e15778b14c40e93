"""``slurm/finetune.sh`` (array over tasks x folds) and ``slurm/reproduce.sh`` (pretraining -> Table 2 finetunes ->
table). The job graph is checked with a recording ``sbatch`` (fast, no cluster); the scripts themselves run
unedited on the real local SLURM cluster (CPU tasks, gloo), as ``test_stage_scripts.py`` runs the stage scripts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune.conftest import build_tiny_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_FT = ["--config", "configs/finetune/tiny.yaml"]

FAKE_SBATCH = """#!/usr/bin/env bash
# records each call (arguments + the finetune/pretraining settings of its environment) and prints a job id
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 101 ))
python3 - "$n" "$@" >> "$SBATCH_LOG" <<'PY'
import json, os, sys
keys = [k for k in os.environ if k.startswith("MEDDINO_")]
print(json.dumps({"id": sys.argv[1], "args": sys.argv[2:], "env": {k: os.environ[k] for k in keys}}))
PY
echo "$n"
"""


@pytest.fixture
def recording_sbatch(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDINO_", "SLURM_"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "SBATCH_LOG": str(tmp_path / "sbatch.log")}


def _calls(env: dict[str, str]) -> list[dict]:
    return [json.loads(line) for line in Path(env["SBATCH_LOG"]).read_text().splitlines()]


def test_reproduce_chains_stages_finetunes_and_table(recording_sbatch, tmp_path):
    env = {**recording_sbatch, "MEDDINO_OUTPUT_ROOT": str(tmp_path / "runs" / "pretrain"), "MEDDINO_DATA": "/shards",
           "MEDDINO_FT_DATA": "/datasets", "MEDDINO_FT_SBATCH": "--gpus-per-node 4", "MEDDINO_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "reproduce.sh"), "-p", "gpu", "--", "train.seed=1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(re.findall(r"^(stage\d|finetune|table) (\d+)$", proc.stdout, flags=re.M))
    assert list(jobs) == ["stage1", "stage2", "stage3", "finetune", "table"], proc.stdout
    calls = {c["id"]: c for c in _calls(recording_sbatch)}
    stage3, finetune, table = calls[jobs["stage3"]], calls[jobs["finetune"]], calls[jobs["table"]]
    assert "train.seed=1" in stage3["args"] and f"--dependency=afterok:{jobs['stage2']}" in stage3["args"]
    # the four Table 2 finetunes, one array task each, after stage 3, from its teacher, on the finetune datasets
    assert finetune["args"][-1].endswith("slurm/finetune.sh")
    assert "--array=0-3" in finetune["args"] and f"--dependency=afterok:{jobs['stage3']}" in finetune["args"]
    assert {"-p", "gpu", "--gpus-per-node", "4"} <= set(finetune["args"])
    assert finetune["env"]["MEDDINO_DATA"] == "/datasets"
    assert finetune["env"]["MEDDINO_FT_CHECKPOINT"] == str(tmp_path / "runs" / "pretrain" / "stage3" / "teacher_backbone.pth")
    assert finetune["env"]["MEDDINO_FT_TASKS"] == "amos22_ct_mri kits23 lits btcv"
    # one table after every finetune, comparing the four runs with the paper
    assert f"--dependency=afterok:{jobs['finetune']}" in table["args"]
    wrap = table["args"][table["args"].index("--wrap") + 1]
    ft_root = tmp_path / "runs" / "finetune"
    assert "-m finetune.metrics compare" in wrap and f"--out {ft_root}/table2.md" in wrap
    for task in ("amos22_ct_mri", "kits23", "lits", "btcv"):
        assert f"{ft_root}/{task}/primus/fold_0" in wrap


def test_finetune_array_size_follows_tasks_and_folds(recording_sbatch):
    env = {**recording_sbatch, "MEDDINO_FT_TASKS": "kits23 lits", "MEDDINO_FT_FOLDS": "0 1 2 3 4"}
    out = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "finetune.sh"), "--print-array"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0-9"
    bad = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "finetune.sh")], env={**env, "SLURM_ARRAY_TASK_ID": "10"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "array index 10 out of range" in bad.stderr


@pytest.mark.slow
def test_finetune_array_index_runs_its_task_and_fold(real_data, tmp_path):
    """Outside SLURM with an array index: index 1 of 1 task x folds (0 1) trains and scores fold 1."""
    dataset = build_tiny_dataset(real_data, tmp_path / "raw")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDDINO_", "SLURM_"))}
    env.update(MEDDINO_FT_TASKS=str(dataset), MEDDINO_FT_FOLDS="0 1", SLURM_ARRAY_TASK_ID="1",
               MEDDINO_FT_OUTPUT_ROOT=str(tmp_path / "ft"), MEDDINO_PYTHON=sys.executable, MEDDINO_DEVICE="cpu",
               MEDDINO_FT_CONFIG=str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml"))
    proc = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "finetune.sh"), "preprocess.target_spacing_mm=[4.5,4.5]"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "ft" / dataset.name / "primus" / "fold_1"
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["fold"] == "1" and "paper_mean" in summary and "foreground_mean" in summary


@pytest.mark.slurm
@pytest.mark.slow
def test_finetune_array_on_the_cluster(slurm_cluster, real_data, tmp_path):
    """`sbatch --wait --array=0-1 slurm/finetune.sh`: two (task, fold) jobs, each a full finetune run on CPU."""
    dataset = build_tiny_dataset(real_data, tmp_path / "raw")
    env = {**slurm_cluster.env, "SBATCH_GPUS_PER_NODE": "0", "MEDDINO_DEVICE": "cpu",
           "MEDDINO_FT_TASKS": str(dataset), "MEDDINO_FT_FOLDS": "0 1", "MEDDINO_FT_OUTPUT_ROOT": str(tmp_path / "ft"),
           "MEDDINO_FT_CONFIG": str(REPO_ROOT / "configs" / "finetune" / "tiny.yaml")}
    job_id, proc = slurm_cluster.sbatch(
        ["--wait", "--array=0-1", "--cpus-per-task=1", "--time=30", str(REPO_ROOT / "slurm" / "finetune.sh"),
         "preprocess.target_spacing_mm=[4.5,4.5]"], env=env, cwd=tmp_path, timeout=900)
    log = slurm_cluster.read_logs(tmp_path)
    assert proc.returncode == 0, f"job {job_id} failed: {proc.stderr}\n{log}"
    for fold in (0, 1):
        summary = json.loads((tmp_path / "ft" / dataset.name / "primus" / f"fold_{fold}" / "validation" / "summary.json").read_text())
        assert summary["fold"] == str(fold)
    assert f"finetune {job_id}_1: task {dataset} fold 1" in log


FT_FROM_TINY_PRETRAINING = """# finetune settings matching configs/pretrain/tiny.yaml's teacher (ViT-T/16, 2 blocks), CPU sizes
model: {arch: vitt16, backbone_overrides: {depth: 2}, drop_path_rate: 0.0}
head: {block_indices: [0, 1]}
preprocess: {target_slice_px: null, target_spacing_mm: [4.5, 4.5], foreground_samples_total: 1.0e6}
data: {patch_size: [64, 64], batch_size: 2, num_workers: 0}
train: {epochs: 1, iters_per_epoch: 2, val_iters: 1, precision: fp32, progress: false}
infer: {batch_size: 8, mirror: false, precision: fp32}
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_reproduce_on_the_cluster(slurm_cluster, ct3m_shards, real_data, tmp_path):
    """`slurm/reproduce.sh` for real: tiny stage 1 -> a finetune of its teacher (afterok) -> the table (afterok)."""
    dataset = build_tiny_dataset(real_data, tmp_path / "raw")
    (tmp_path / "ft_tiny.yaml").write_text(FT_FROM_TINY_PRETRAINING)
    runs = tmp_path / "runs"
    env = slurm_cluster.stage_env(
        runs / "pretrain", ct3m_shards, MEDDINO_STAGES="1", MEDDINO_OVERLAY="tiny",
        MEDDINO_STAGE1_OVERRIDES="train.iterations=3 checkpointing.teacher_snapshots=[] logging.flops=false "
                                 "compute.num_threads=1",
        MEDDINO_STAGE1_SBATCH="--ntasks-per-node=2", MEDDINO_FT_TASKS=str(dataset),
        MEDDINO_FT_CONFIG=str(tmp_path / "ft_tiny.yaml"))
    proc = slurm_cluster.run(["bash", str(REPO_ROOT / "slurm" / "reproduce.sh"), "--nodes=1", "--cpus-per-task=1",
                              "--time=30"], env=env, cwd=tmp_path, timeout=60)
    jobs = dict(re.findall(r"^(stage1|finetune|table) (\d+)$", proc.stdout, flags=re.M))
    assert list(jobs) == ["stage1", "finetune", "table"], proc.stdout + proc.stderr
    assert slurm_cluster.job_info(int(jobs["table"])).get("Dependency", "").startswith(f"afterok:{jobs['finetune']}")
    slurm_cluster.wait_gone([int(j) for j in jobs.values()], timeout=1200)
    log = slurm_cluster.read_logs(tmp_path)
    run = runs / "finetune" / dataset.name / "primus" / "fold_0"
    assert (run / "validation" / "summary.json").is_file(), log
    config = (run / "config.yaml").read_text()
    assert str(runs / "pretrain" / "stage1" / "teacher_backbone.pth") in config   # finetuned the pretrained teacher
    table = (runs / "finetune" / "table2.md").read_text()
    assert f"({dataset.name}) | 0 |" in table and "DSC % paper" in table, log
