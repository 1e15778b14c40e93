"""A real local SLURM cluster for the ``tests/slurm`` tests (session scope).

The fixture runs ``slurm/local_cluster.sh start`` with its state in a pytest temp dir and free ports, waits
until both emulated nodes are idle, hands the tests a :class:`LocalCluster` (environment with ``SLURM_CONF``
plus small sbatch/squeue helpers), and at the end runs ``local_cluster.sh stop``, which stops exactly the
daemons it started (pid files). When SLURM cannot be started (not root, no apt, ...) the tests are skipped
with the reason and the cluster log; under ``CI=true`` they fail instead, because CI must run them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
N_NODES = 2


def _ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_port_base(count: int) -> int:
    """A base port with ``count`` consecutive free ports (slurmctld + one per slurmd)."""
    start = 16817 + (os.getpid() % 200) * 10
    for base in range(start, start + 4000, 10):
        if _ports_free(base, count):
            return base
    raise RuntimeError("no free port range for the local SLURM cluster")


@dataclass
class LocalCluster:
    """Handle on the running test cluster: ``env`` for subprocesses, and job helpers."""

    state_dir: Path
    env: dict[str, str]
    node_names: list[str] = field(default_factory=list)

    def run(self, args: list[str], timeout: float = 60, check: bool = True, env: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=env or self.env, capture_output=True, text=True, timeout=timeout,
                              check=check, **kw)

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
               cwd: Path | None = None) -> tuple[int, subprocess.CompletedProcess]:
        """``sbatch --parsable ARGS`` -> (job id, completed process). ``--wait`` may be in ``args``."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], env=env or self.env, capture_output=True, text=True,
            timeout=timeout, cwd=cwd or REPO_ROOT,
        )
        match = re.search(r"^(\d+)", proc.stdout.strip())
        if not match:
            raise AssertionError(f"sbatch {args} did not submit:\n{proc.stdout}\n{proc.stderr}")
        return int(match.group(1)), proc

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job has left the controller, MinJobAge)."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", proc.stdout))

    def wait_gone(self, job_ids: list[int], timeout: float = 600) -> None:
        """Block until none of ``job_ids`` is pending, running or completing."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["squeue", "-h", "-o", "%i", "-j", ",".join(map(str, job_ids))], check=False).stdout
            if not out.strip():
                return
            time.sleep(1)
        raise AssertionError(f"jobs {job_ids} still queued after {timeout}s:\n{self.run(['squeue'], check=False).stdout}")

    def wait_state(self, job_id: int, states: set[str], timeout: float = 120) -> str:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_info(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never reached {states} (last state {state!r})")

    def log_tail(self, n: int = 30) -> str:
        out = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- pretraining runs on this CPU cluster
    def stage_env(self, output_root: Path, shards: Path, **extra: str) -> dict[str, str]:
        """Environment for ``sbatch slurm/stage<N>.sh``: no GPU request (the scripts' #SBATCH lines ask for 8 per
        node), CPU tasks (gloo), the given output root and CT-3M shards, plus ``extra``."""
        return {
            **self.env,
            "SBATCH_GPUS_PER_NODE": "0",
            "MEDDINO_DEVICE": "cpu",
            "MEDDINO_OUTPUT_ROOT": str(output_root),
            "MEDDINO_DATA": str(shards),
            **extra,
        }

    @staticmethod
    def metrics_iterations(run_dir: Path) -> list[int]:
        """Iterations logged in ``run_dir/metrics.jsonl``, in file order."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.strip()]

    @staticmethod
    def read_logs(directory: Path, pattern: str = "*.out") -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in sorted(directory.rglob(pattern)))


def _unavailable(msg: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"local SLURM cluster required in CI: {msg}")
    pytest.skip(f"SLURM tests skipped, local cluster unavailable: {msg}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        _unavailable("needs Linux")
    if os.geteuid() != 0:
        _unavailable("local_cluster.sh must run as root (it installs Debian's slurm packages and runs slurmd)")
    # not under pytest's 0700 temp root: munged (user munge) must reach its socket directory
    state_dir = Path(tempfile.mkdtemp(prefix="meddino-slurm-"))
    port = _free_port_base(N_NODES + 1)
    prefix = f"mdt{port}n"
    cluster_env = {
        **os.environ,
        "MEDDINO_SLURM_DIR": str(state_dir),
        "MEDDINO_SLURM_NODES": str(N_NODES),
        "MEDDINO_SLURM_PORT": str(port),
        "MEDDINO_SLURM_PREFIX": prefix,
    }
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], env=cluster_env, capture_output=True,
                           text=True, timeout=600)
    try:
        if start.returncode != 0:
            _unavailable(f"`local_cluster.sh start` failed ({start.returncode}):\n{start.stderr[-3000:]}")
        idle = subprocess.run(["bash", str(CLUSTER_SCRIPT), "wait-idle"], env=cluster_env, capture_output=True,
                              text=True, timeout=180)
        if idle.returncode != 0:
            _unavailable(f"nodes never became idle:\n{idle.stderr[-3000:]}")
        env = {**cluster_env, "SLURM_CONF": str(state_dir / "slurm.conf")}
        # jobs must not inherit a caller's SLURM job context or the test runner's torch.distributed settings
        for key in list(env):
            if key.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SBATCH_", "SRUN_")) or key in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
            ):
                env.pop(key)
        env["MEDDINO_PYTHON"] = sys.executable  # jobs run the interpreter of the test session
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        assert shutil.which("sbatch", path=env.get("PATH")), "sbatch not on PATH after installation"
        yield LocalCluster(state_dir=state_dir, env=env, node_names=[f"{prefix}{i}" for i in range(1, N_NODES + 1)])
    finally:
        stop = subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=cluster_env, capture_output=True,
                              text=True, timeout=120)
        if stop.returncode != 0:
            print(f"local_cluster.sh stop failed:\n{stop.stderr}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ real-CT shards, runs


@pytest.fixture(scope="session")
def ct3m_shards(tmp_path_factory: pytest.TempPathFactory, sample_ct: Path) -> Path:
    """CT-3M shards built by the curation CLI from the embedded real CT sample (TotalSegmentator + MSD spleen)."""
    out = tmp_path_factory.mktemp("ct3m")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "data_curation" / "build_ct3m.py"), "--out", str(out),
         "--root", f"folder={sample_ct}", "--no-progress", "output.samples_per_shard=32"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, f"build_ct3m.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    shards = sorted(out.glob("ct3m-*.tar"))
    assert len(shards) >= 2, f"expected several shards in {out}, got {shards}"
    return out
