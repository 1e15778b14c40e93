"""The local SLURM cluster itself, and the shared rank/world/master helper under a real ``srun``."""
from __future__ import annotations

import json
import shlex
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
