"""``python -m pretrain.submit`` (submitit) on the real local SLURM cluster: a tiny CPU run returns its result,
and a preemption goes through submitit's ``checkpoint()`` protocol (requeue, resume, same final iteration)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.submit import TrainingJob, with_resume_auto

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ["logging.flops=false", "compute.num_threads=1"]


def test_with_resume_auto_replaces_any_resume():
    assert with_resume_auto(["--config", "a.yaml", "--resume", "x.pth", "k=v"]) == \
        ["--config", "a.yaml", "k=v", "--resume", "auto"]
    assert with_resume_auto(["--resume=none"]) == ["--resume", "auto"]


def test_checkpoint_returns_resumable_submission(tmp_path):
    job = TrainingJob(trainer_args=["--config", "c.yaml", "--output-dir", str(tmp_path)], output_dir=str(tmp_path))
    delayed = job.checkpoint()
    assert isinstance(delayed.function, TrainingJob)
    assert delayed.function.trainer_args[-2:] == ["--resume", "auto"]
    assert delayed.function.output_dir == str(tmp_path)


def test_submitit_tiny_run_preempted_and_resumed(slurm_cluster, ct3m_shards, tmp_path):
    iterations = 8
    out = tmp_path / "run"
    submit = subprocess.Popen(
        [sys.executable, "-m", "pretrain.submit", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
         "--cpus-per-task", "1", "--timeout-min", "30", "--config", str(REPO_ROOT / "configs/pretrain/tiny.yaml"),
         "--output-dir", str(out), "--wait", f"data.shards={ct3m_shards}", f"train.iterations={iterations}",
         "checkpointing.period=100", *FAST],
        env=slurm_cluster.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 400
        while len(slurm_cluster.metrics_iterations(out)) < 2:
            assert submit.poll() is None, submit.communicate()
            assert time.time() < deadline, slurm_cluster.read_logs(out, "*_log.*")
            time.sleep(0.2)
        job_dirs = [p.name for p in (out / "submitit").iterdir() if p.is_dir() and p.name.isdigit()]
        assert len(job_dirs) == 1, job_dirs  # submitit folder: OUTPUT_DIR/submitit/<job id>
        job_id = job_dirs[0]
        slurm_cluster.run(["scancel", "--signal=USR1", job_id])
        stdout, stderr = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
    logs = slurm_cluster.read_logs(out, "*_log.*")
    assert submit.returncode == 0, f"{stdout}\n{stderr[-3000:]}\n{logs}"
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["iteration"] == iterations and Path(result["teacher_backbone"]).is_file(), result
    assert "Calling checkpoint method" in logs and "Requeued job" in logs, logs
    assert "SIGUSR1 received: checkpointed at iteration" in logs and "resumed from" in logs, logs
    assert slurm_cluster.metrics_iterations(out) == list(range(iterations)), logs
