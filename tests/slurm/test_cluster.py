"""The local SLURM cluster itself, and the shared rank/world/master helper under a real ``srun``."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB = Path(__file__).with_name("allreduce_job.py")


def _run_allreduce(slurm_cluster, tmp_path: Path, nodes: int, tasks_per_node: int) -> list[dict]:
    out = tmp_path / "ranks.json"
    python = slurm_cluster.env["MEDDINO_PYTHON"]
    job_id, proc = slurm_cluster.sbatch([
        "--wait", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
        f"--output={tmp_path / 'job-%j.out'}",
        "--wrap", f"srun {shlex.quote(python)} {shlex.quote(str(JOB))} {shlex.quote(str(out))}",
    ], timeout=180)
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert proc.returncode == 0, f"job {job_id} failed ({proc.returncode}):\n{proc.stderr}\n{log}"
    return json.loads(out.read_text())


def test_nodes_idle_and_named(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
    states = dict(line.split() for line in out if line.strip())
    assert states == {name: "idle" for name in slurm_cluster.node_names}


def test_allreduce_two_tasks_one_node(slurm_cluster, tmp_path):
    ranks = _run_allreduce(slurm_cluster, tmp_path, nodes=1, tasks_per_node=2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["launcher"] == "slurm" and r["world_size"] == 2 and r["rank_sum"] == 1.0 for r in ranks)
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert {r["node_rank"] for r in ranks} == {0}


def test_allreduce_two_emulated_nodes(slurm_cluster, tmp_path):
    ranks = _run_allreduce(slurm_cluster, tmp_path, nodes=2, tasks_per_node=2)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["world_size"] == 4 and r["local_world_size"] == 2 and r["rank_sum"] == 6.0 for r in ranks)
    # emulated nodes share the hostname: SLURM_NODEID tells them apart
    assert [r["slurm_nodeid"] for r in ranks] == [0, 0, 1, 1]
    assert [r["node_rank"] for r in ranks] == [0, 0, 1, 1]
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    assert {r["nodename"] for r in ranks} == set(slurm_cluster.node_names)
    # master = first host of the node list, on a per-job port, agreed by every rank
    masters = {r["master"] for r in ranks}
    assert len(masters) == 1 and masters.pop().startswith(slurm_cluster.node_names[0] + ":")


def test_local_cluster_stop_ends_exactly_its_daemons(slurm_cluster, tmp_path):
    """A second cluster (own dir, ports, node names) starts and stops without touching the session's cluster."""
    script = Path(__file__).resolve().parents[2] / "slurm" / "local_cluster.sh"
    state = Path(tempfile.mkdtemp(prefix="meddino-slurm-second-"))
    port = int(slurm_cluster.env["MEDDINO_SLURM_PORT"]) + 50
    env = {**slurm_cluster.env, "MEDDINO_SLURM_DIR": str(state), "MEDDINO_SLURM_NODES": "1",
           "MEDDINO_SLURM_PORT": str(port), "MEDDINO_SLURM_PREFIX": f"mdsecond{port}n"}
    try:
        subprocess.run(["bash", str(script), "start"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(["bash", str(script), "wait-idle"], env=env, check=True, capture_output=True, timeout=120)
        pid_files = [state / "munge" / "munged.pid", state / "slurmctld.pid", state / f"slurmd-mdsecond{port}n1.pid"]
        pids = [int(p.read_text()) for p in pid_files]
        assert f"mdsecond{port}n1" in Path("/etc/hosts").read_text()
    finally:
        stop = subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid
    assert f"mdsecond{port}n1" not in Path("/etc/hosts").read_text()
    # the session cluster is untouched
    states = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
    assert states == ["idle"] * len(slurm_cluster.node_names)
    shutil.rmtree(state, ignore_errors=True)
