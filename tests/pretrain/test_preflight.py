"""``python -m pretrain.preflight``: the tiny CPU run of all three stages plus the finetune step passes, and a
deliberately broken setting fails with one line naming the stage and the check."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGE_KEYS = ("ok", "error", "plan", "iterations", "img_per_s", "step_time_s", "peak_memory_gb", "mfu",
              "student_training_mode", "loss_finite", "resume_identical", "resume_max_abs_diff",
              "projected_stage_hours")


def _preflight(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.preflight", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


@pytest.mark.slow
def test_tiny_preflight_of_every_stage_and_the_finetune_step_passes(tmp_path: Path) -> None:
    """What CI proves on every change: the shipped stage configs, sizes shrunk, on CT curated from the embedded
    sample (no data given), resume bit-identical, plus one finetune step and a sliding-window inference."""
    done = _preflight("--out", str(tmp_path), "--tiny")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["device"] == "cpu" and report["world_size"] == 1 and report["torch"]
    assert list(report["stages"]) == ["stage1", "stage2", "stage3"]
    for name, stage in report["stages"].items():
        assert set(STAGE_KEYS) <= set(stage), name
        assert stage["ok"] and stage["error"] is None, (name, stage)
        assert stage["student_training_mode"] and stage["drop_path_active"] and stage["loss_finite"]
        assert stage["resume_identical"] and stage["resume_max_abs_diff"] == 0.0
        assert stage["mfu"] is None and stage["img_per_s"] > 0 and stage["projected_stage_hours"] > 0
        assert stage["plan"]["global_batch"] == 4
    assert report["stages"]["stage3"]["plan"]["grad_accum_steps"] == 2  # stage 3 accumulates, as at full size
    finetune = report["finetune"]
    assert finetune["ok"] and finetune["patch_size"] == [64, 64] and finetune["inference_s"] > 0
    assert "stage3" in done.stdout and "resume_identical" in done.stdout  # the table


def test_an_unreachable_batch_fails_naming_the_stage_and_the_check(tmp_path: Path, ct3m_shards: Path) -> None:
    done = _preflight("--out", str(tmp_path), "--tiny", "--stages", "1", "--no-finetune", f"data.shards={ct3m_shards}",
                      "train.global_batch_size=3", "data.max_batch_size_per_rank=1", timeout=300)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "stage1: plan:" in failed[0] and "KoLeo needs at least 2" in failed[0], done.stderr
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["stages"]["stage1"]["failed"] == ["plan"]


def test_an_eval_mode_student_fails_the_train_mode_check(tmp_path: Path, ct3m_shards: Path, monkeypatch,
                                                         capsys) -> None:
    """The old FLOP counter's defect, put back: the student trains in eval mode from its first step."""
    from pretrain import preflight
    from pretrain.train.meta_arch import SSLMetaArch

    real = SSLMetaArch.forward_backward

    def eval_mode_student(self, batch, **kw):
        self.student.eval()
        return real(self, batch, **kw)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", eval_mode_student)
    rc = preflight.main(["--out", str(tmp_path), "--tiny", "--stages", "1", "--no-finetune", "--iterations", "2",
                         f"data.shards={ct3m_shards}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED stage1: student_training_mode: failed checks: student_training_mode" in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_cpu_tensor_in_a_collective_fails_the_collectives_check(tmp_path: Path, ct3m_shards: Path) -> None:
    """Under an NCCL-like (CUDA-only) process group, the old per-iteration check on a CPU tensor is named."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(REPO_ROOT / "tests" / "pretrain" / "nccl_like_launch.py"),
           "--module", "pretrain.preflight", "--cpu-tensor-collectives", "--out", str(tmp_path), "--tiny",
           "--stages", "1", "--no-finetune", "--iterations", "2", f"data.shards={ct3m_shards}"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "FAILED stage1: collectives: RuntimeError: No backend type associated with device type cpu" in done.stderr, \
        done.stderr[-3000:]


def test_slurm_preflight_script_runs_the_preflight(tmp_path: Path, ct3m_shards: Path) -> None:
    """slurm/preflight.sh outside a SLURM job: one process, same command (srun starts one per GPU inside a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "preflight.sh"), "--out", str(tmp_path), "--tiny",
                           "--stages", "1", "--no-finetune", "--iterations", "2", f"data.shards={ct3m_shards}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "MEDDINO_PYTHON": sys.executable, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "preflight.json").read_text())["stages"]["stage1"]["ok"]
