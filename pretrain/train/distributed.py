"""One distributed set-up for a single CPU process, ``torchrun`` and SLURM ``srun``.

:func:`read_dist_env` works out rank / world size / local rank / master address and port from the environment:
- torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` all set) wins;
- SLURM ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; master = first host of
  ``SLURM_JOB_NODELIST``, port derived from ``SLURM_JOB_ID`` so concurrent jobs on a node never collide);
- otherwise one process (rank 0 of 1).
:func:`init_distributed` then initialises the process group (NCCL on GPU, gloo on CPU) only when the world has
more than one process, so single-process code never pays for collectives. The ``slurm/`` scripts and the
submitit entry point use the same helpers.

Preemption: :class:`PreemptionHandler` turns SIGUSR1 / SIGTERM into a flag that the training loop polls after
each iteration (agreed across ranks with one tiny all-reduce); the loop checkpoints, and under SLURM rank 0 calls
:func:`requeue_slurm_job` before every rank exits.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``launcher`` is ``"single"``, ``"torchrun"`` or ``"slurm"``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _expand_range_list(body: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.append(str(i).zfill(width))
        else:
            out.append(part)
    return out


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1-2],b`` -> ``['a[1-2]', 'b']``."""
    items, depth, cur = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Pure-Python expansion of a SLURM host list.

    Handles zero padding and several bracket groups per name:
    ``"gpu[001-003,007],cpu-a[1-2]-x[0-1],login"`` -> ``gpu001, gpu002, gpu003, gpu007, cpu-a1-x0, cpu-a1-x1,
    cpu-a2-x0, cpu-a2-x1, login``.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        expansions = [""]
        for literal, bracket in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not literal and not bracket:
                continue
            choices = _expand_range_list(bracket) if bracket else [""]
            expansions = [prefix + literal + choice for prefix in expansions for choice in choices]
        hosts.extend(expansions)
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list: ``scontrol show hostnames`` when available, else :func:`parse_slurm_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20, check=True
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_slurm_nodelist(nodelist)


def master_port_for_job(job_id: str | int | None) -> int:
    """Deterministic per-job port in ``[20000, 40000)`` so that every task of a job agrees without talking."""
    if job_id is None or str(job_id).strip() == "":
        return 29500
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return MASTER_PORT_BASE + int(digits[-6:]) % MASTER_PORT_SPAN


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank / world / local rank / master from torchrun or SLURM variables (see module docstring)."""
    env = os.environ if environ is None else environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(local_world, 1))),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):
        # inside an srun step (the batch script itself is one process and falls through to "single")
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or 1)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            master = slurm_hostnames(nodelist)[0]
        else:
            master = "127.0.0.1"
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        local_world = _first_count(tasks_per_node) or world
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_world,
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR", master),
            master_port=int(env.get("MASTER_PORT", master_port_for_job(env.get("SLURM_JOB_ID")))),
            launcher="slurm",
        )
    return DistEnv()


def _first_count(tasks_per_node: str) -> int:
    """``"4(x2),3"`` -> 4 (the first node's task count); empty -> 0."""
    m = re.match(r"\s*(\d+)", tasks_per_node)
    return int(m.group(1)) if m else 0


def default_device(dist_env: DistEnv) -> torch.device:
    """``cuda:<local_rank>`` when a GPU is visible, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist_env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(dist_env: DistEnv | None = None, backend: str | None = None, timeout_s: int = 1800) -> DistEnv:
    """Initialise ``torch.distributed`` when the world has several processes (idempotent).

    Exports ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` for libraries that read them, selects the local
    GPU, and uses NCCL on GPU, gloo on CPU unless ``backend`` says otherwise.
    """
    dist_env = dist_env or read_dist_env()
    if not dist_env.distributed or (dist.is_available() and dist.is_initialized()):
        return dist_env
    os.environ.update(
        {
            "RANK": str(dist_env.rank),
            "WORLD_SIZE": str(dist_env.world_size),
            "LOCAL_RANK": str(dist_env.local_rank),
            "MASTER_ADDR": dist_env.master_addr,
            "MASTER_PORT": str(dist_env.master_port),
        }
    )
    device = default_device(dist_env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{dist_env.master_addr}:{dist_env.master_port}",
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return dist_env


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op in one process). Returns a new tensor."""
    t = t.detach().clone()
    if is_dist():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on at least one rank (one int all-reduce)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device or torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class PreemptionHandler:
    """Records SIGUSR1 / SIGTERM (SLURM's ``--signal=USR1@s`` warning and its kill) instead of dying mid-step.

    ``requested`` becomes true on the first signal; the loop finishes the iteration, checkpoints and exits.
    Previous handlers are restored by :meth:`uninstall`.
    """

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "PreemptionHandler":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): polling simply never fires
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("SLURM_JOB_ID"))


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (call on rank 0 only). Returns whether SLURM accepted it.

    For array jobs the requeued id is ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    scontrol = shutil.which("scontrol")
    if not job_id or not scontrol:
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        print(f"[pretrain] scontrol requeue {job_id} failed: {result.stderr.strip()}", flush=True)
        return False
    print(f"[pretrain] requeued SLURM job {job_id}", flush=True)
    return True
