"""``slurm/stage{1,2,3}.sh`` and ``slurm/pipeline.sh`` on a real local SLURM cluster, CPU tasks over gloo.

The scripts run unedited: their #SBATCH lines ask for GPUs, the tests drop that request with
``SBATCH_GPUS_PER_NODE=0`` and size the job with sbatch flags, exactly as a site would override them. Every run
trains the tiny config on CT-3M shards built from the embedded real CT by ``data_curation/build_ct3m.py``.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "pretrain"
TINY = str(CONFIGS / "tiny.yaml")
# one thread per task (2-core CI box), no FLOP counting, checkpoints only when asked
FAST = ["logging.flops=false", "compute.num_threads=1"]
# sbatch flags of a 2-task CPU job (slurm/common.sh sends USR1 a tenth of --time before the limit: 3 min here)
CPU_JOB = ["--ntasks-per-node=2", "--cpus-per-task=1", "--time=30"]


def _assert_finished_run(cluster, run_dir: Path, iterations: int, log: str) -> None:
    assert (run_dir / "teacher_backbone.pth").is_file(), f"no teacher export in {run_dir}\n{log}"
    assert (run_dir / "checkpoints" / f"checkpoint_{iterations:08d}.pth").is_file(), log
    assert cluster.metrics_iterations(run_dir) == list(range(iterations)), log


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node-2-tasks", "two-nodes-1-task-each"])
def test_stage1_sbatch_wait_two_tasks(slurm_cluster, ct3m_shards, tmp_path, nodes):
    """`sbatch --wait slurm/stage1.sh` exits 0 and leaves a checkpoint and the teacher export."""
    iterations = 3
    env = slurm_cluster.stage_env(tmp_path / "runs", ct3m_shards, MEDDINO_OVERLAY="tiny")
    tasks = ["--ntasks-per-node=1" if nodes == 2 else "--ntasks-per-node=2"]
    # submitted from a directory outside the repository: the script finds the repo via SLURM's Command=
    job_id, proc = slurm_cluster.sbatch(
        ["--wait", f"--nodes={nodes}", *tasks, "--cpus-per-task=1", "--time=30",
         str(REPO_ROOT / "slurm" / "stage1.sh"), f"train.iterations={iterations}", "checkpointing.period=2",
         "checkpointing.teacher_snapshots=[]", *FAST],
        env=env, cwd=tmp_path, timeout=600,
    )
    log = slurm_cluster.read_logs(tmp_path)
    assert proc.returncode == 0, f"job {job_id} failed ({proc.returncode}): {proc.stderr}\n{log}"
    run_dir = tmp_path / "runs" / "stage1"
    _assert_finished_run(slurm_cluster, run_dir, iterations, log)
    assert f"world 2 (slurm, ddp)" in log, log
    assert (run_dir / "checkpoints" / "checkpoint_00000002.pth").is_file()  # the periodic one too
    if nodes == 2:
        assert f"on 2 node(s) {slurm_cluster.node_names[0][:-1]}" in log, log


def test_stage1_preemption_requeues_and_resumes(slurm_cluster, ct3m_shards, tmp_path):
    """USR1 mid-run: the trainer checkpoints after the current iteration, requeues the job, the requeued job
    resumes from that checkpoint and ends at the same final iteration with every iteration run exactly once."""
    iterations = 8
    env = slurm_cluster.stage_env(tmp_path / "runs", ct3m_shards, MEDDINO_CONFIG=TINY)
    run_dir = tmp_path / "runs" / "stage1"
    job_id, proc = slurm_cluster.sbatch(
        ["--nodes=1", *CPU_JOB, str(REPO_ROOT / "slurm" / "stage1.sh"), f"train.iterations={iterations}",
         "checkpointing.period=100", *FAST],  # no periodic checkpoint: only the preemption can make one
        env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    deadline = time.time() + 400
    while len(slurm_cluster.metrics_iterations(run_dir)) < 2:  # mid-run: two iterations done, handler installed
        assert time.time() < deadline, f"no training progress\n{slurm_cluster.read_logs(tmp_path)}"
        assert slurm_cluster.job_info(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            slurm_cluster.read_logs(tmp_path)
        time.sleep(0.2)
    # the scripts' --signal=USR1@600 delivers USR1 to the job steps; so does scancel without --batch
    slurm_cluster.run(["scancel", "--signal=USR1", str(job_id)])
    slurm_cluster.wait_gone([job_id], timeout=600)

    log = slurm_cluster.read_logs(tmp_path)
    preempted = re.search(r"SIGUSR1 received: checkpointed at iteration (\d+)", log)
    assert preempted, f"the trainer did not checkpoint on SIGUSR1\n{log}"
    k = int(preempted.group(1))
    assert 2 <= k < iterations, log
    assert "requeued SLURM job" in log and "(restart 1)" in log, log
    assert f"resumed from {run_dir / 'checkpoints' / f'checkpoint_{k:08d}.pth'} at iteration {k}" in log, log
    _assert_finished_run(slurm_cluster, run_dir, iterations, log)


def test_pipeline_runs_stages_in_order(slurm_cluster, ct3m_shards, tmp_path):
    """`slurm/pipeline.sh` chains stage 1 -> 2 -> 3 with afterok; each stage continues the previous one."""
    runs = tmp_path / "runs"
    env = slurm_cluster.stage_env(
        runs, ct3m_shards,
        MEDDINO_OVERLAY="tiny",  # stage<N>.yaml + tiny.yaml + tiny_stage<N>.yaml
        MEDDINO_STAGE1_OVERRIDES="train.iterations=3 checkpointing.teacher_snapshots=[2]",
        MEDDINO_STAGE2_OVERRIDES="train.iterations=2 gram.teacher.iteration=2",
        MEDDINO_STAGE3_OVERRIDES="train.iterations=2 gram.teacher.iteration=2",
    )
    proc = slurm_cluster.run(
        ["bash", str(REPO_ROOT / "slurm" / "pipeline.sh"), "--nodes=1", *CPU_JOB, "--", "checkpointing.period=100",
         *FAST],
        env=env, cwd=tmp_path, timeout=60,
    )
    jobs = dict(re.findall(r"^(stage\d) (\d+)$", proc.stdout, flags=re.M))
    assert list(jobs) == ["stage1", "stage2", "stage3"], proc.stdout + proc.stderr
    ids = [int(jobs[s]) for s in ("stage1", "stage2", "stage3")]
    for prev, job in zip(ids, ids[1:]):
        dependency = slurm_cluster.job_info(job).get("Dependency", "")
        assert dependency.startswith(f"afterok:{prev}"), f"job {job}: Dependency={dependency!r}"
    slurm_cluster.wait_gone(ids, timeout=900)

    log = slurm_cluster.read_logs(tmp_path)
    expected_iters = {"stage1": 3, "stage2": 2, "stage3": 2}
    for stage, iters in expected_iters.items():
        _assert_finished_run(slurm_cluster, runs / stage, iters, log)
    # each stage started from its predecessor's final checkpoint, after that stage had ended
    cfg2 = OmegaConf.load(runs / "stage2" / "config.yaml")
    cfg3 = OmegaConf.load(runs / "stage3" / "config.yaml")
    assert cfg2.stage == "stage2" and cfg2.gram.use_loss and cfg3.stage == "stage3"
    assert cfg2.init.checkpoint == str(runs / "stage1" / "checkpoints" / "checkpoint_00000003.pth")
    assert cfg2.gram.teacher.run_dir == str(runs / "stage1")
    assert cfg3.init.checkpoint == str(runs / "stage2" / "checkpoints" / "checkpoint_00000002.pth")
    assert (runs / "stage1" / "teacher_backbone.pth").stat().st_mtime <= (runs / "stage2" / "config.yaml").stat().st_mtime
    assert (runs / "stage2" / "teacher_backbone.pth").stat().st_mtime <= (runs / "stage3" / "config.yaml").stat().st_mtime
