"""One distributed set-up for a single CPU process, ``torchrun`` and SLURM ``srun``.

:func:`read_dist_env` works out rank / world size / local rank / master address and port from the environment:
- a process started by torchrun (``TORCHELASTIC_RUN_ID`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``);
- else, inside a SLURM ``srun`` step: SLURM's own variables (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
  ``SLURM_LOCALID``; master = first host of the step's node list, port hashed from the job and step ids). Launcher
  variables inherited from the submitting shell (``RANK``, ``WORLD_SIZE``, ``MASTER_*``, ``LOCAL_RANK``) are
  ignored there: with them two independent jobs would join one world, or ranks would wait for a wrong master;
- else ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set by hand;
- otherwise one process (rank 0 of 1).
:func:`init_distributed` then initialises the process group only when the world has more than one process, so
single-process code never pays for collectives. On GPU the group maps CUDA tensors to NCCL *and* CPU tensors to
gloo (``cpu:gloo,cuda:nccl``); :func:`communicator` gives the trainer one :class:`Comm` whose collectives always
use a group that serves the tensors' device (NCCL's device map has no CPU entry: a CPU tensor in an NCCL-only
collective fails with "No backend type associated with device type cpu"). The ``slurm/`` scripts and the
submitit entry point use the same helpers.

Preemption (SIGUSR1 / SIGTERM as a flag, SLURM requeue) lives in :mod:`pretrain.train.preemption`, which imports
no torch so that ``python -m pretrain.train`` can install it before its heavy imports.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 12000  # [20000, 32000): below Linux's ephemeral range (32768-60999), where clients bind


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


def master_port_for_job(job_id: str | int | None, step_id: str | int | None = None) -> int:
    """Deterministic per-job (and per-step) port in ``[20000, 32000)`` so that every task agrees without talking.

    A hash, not ``id % span``: consecutive or evenly spaced job ids (20000 apart, say) would otherwise map to
    the same port; two jobs sharing a master node collide only by chance (1 in 12000). ``MEDDINO_MASTER_PORT``
    chooses a port explicitly (``MASTER_PORT`` is ignored under srun: it may be a leftover of the submitting shell).
    """
    if job_id is None or str(job_id).strip() == "":
        return 29500
    digest = hashlib.blake2b(f"{job_id}.{step_id or 0}".encode(), digest_size=8).digest()
    return MASTER_PORT_BASE + int.from_bytes(digest, "big") % MASTER_PORT_SPAN


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank / world / local rank / master from torchrun or SLURM variables (see module docstring)."""
    env = os.environ if environ is None else environ
    by_torchrun = "TORCHELASTIC_RUN_ID" in env
    in_srun_step = "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env)
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and (by_torchrun or not in_srun_step):
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
    if in_srun_step:
        # inside an srun step (the batch script itself is one process and falls through to "single"); SLURM's
        # values win over launcher variables inherited from the submitting shell
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
            master_addr=master,
            master_port=int(env.get("MEDDINO_MASTER_PORT")
                            or master_port_for_job(env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID"))),
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
    backend = backend or process_group_backend(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{dist_env.master_addr}:{dist_env.master_port}",
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return dist_env


def process_group_backend(device: torch.device) -> str:
    """``cpu:gloo,cuda:nccl`` on GPU (training collectives on NCCL, CPU-side ones such as RNG-state gathering on
    gloo), ``gloo`` on CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _backend_device_types(group=None) -> set[str]:
    """Device types the group's backend map serves: ``"cuda:nccl"`` -> {cuda}; ``"gloo"`` -> {cpu, cuda}."""
    config = str(dist.get_backend_config(group)) if hasattr(dist, "get_backend_config") else dist.get_backend(group)
    types = {part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part}
    return types or ({"cuda"} if config == "nccl" else {"cpu", "cuda"})


@dataclass(frozen=True)
class Comm:
    """The trainer's collectives, each on a process group that serves its tensors' device.

    ``group`` carries tensors on the training ``device`` (the NaN and preemption checks, the metrics mean, DDP
    and FSDP); ``cpu_group`` carries Python objects and CPU tensors (RNG states, the resume decision, barriers).
    Either is None for the default group. In one process every method is a cheap local no-op.
    """

    device: torch.device
    distributed: bool = False
    group: object | None = None
    cpu_group: object | None = None

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank (one int all-reduce on the training device)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each value over ranks (one float64 all-reduce on the training device)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return dict(zip(keys, (t / dist.get_world_size(self.group)).tolist()))

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of a tensor on the training device from global rank ``src``."""
        if self.distributed:
            dist.broadcast(tensor, src=src, group=self.group)

    def gather_objects(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint rank 0 chose to resume from)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.cpu_group)

    def mesh(self):
        """Device mesh over ``group`` for FSDP2's ``fully_shard``."""
        from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415

        return DeviceMesh.from_group(self.group or dist.group.WORLD, self.device.type)


def communicator(device: torch.device) -> Comm:
    """The :class:`Comm` of this process for tensors on ``device``; collective (every rank calls it once, in the
    same order). When the default group does not serve a device type (an NCCL-only group and CPU tensors, or a
    group created elsewhere), a gloo group is created for it."""
    if not is_dist():
        return Comm(device=device)
    served = _backend_device_types()
    extra = None
    if "cpu" not in served or device.type not in served:
        if device.type not in served and device.type != "cpu":
            raise RuntimeError(f"the default process group ({dist.get_backend_config()}) has no backend for "
                               f"{device.type} tensors: create it with backend '{process_group_backend(device)}'")
        extra = dist.new_group(backend="gloo")
    return Comm(device=device, distributed=True,
                group=extra if device.type not in served else None,
                cpu_group=extra if "cpu" not in served else None)


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


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
