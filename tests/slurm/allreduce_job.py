"""Runs as one task of an ``srun`` step: a gloo all_reduce through the shared SLURM env helper.

Every task reads rank / world / local rank / master from SLURM's environment with
``pretrain.train.distributed.read_dist_env`` (the helper the trainer uses), joins the gloo group, sums the
ranks, and gathers where it ran; rank 0 writes ``OUT_JSON`` for the test to check.
Usage: ``srun python tests/slurm/allreduce_job.py OUT_JSON``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from pretrain.train.distributed import destroy, init_distributed, read_dist_env


def main(out_json: str) -> None:
    env = init_distributed(read_dist_env(), backend="gloo", timeout_s=120)
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    me = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "local_world_size": env.local_world_size,
        "node_rank": env.node_rank,
        "slurm_nodeid": int(os.environ["SLURM_NODEID"]),
        "nodename": os.environ.get("SLURMD_NODENAME", ""),
        "master": f"{env.master_addr}:{env.master_port}",
        "launcher": env.launcher,
        "rank_sum": total.item(),
    }
    gathered: list[dict] = [{} for _ in range(env.world_size)]
    dist.all_gather_object(gathered, me)
    if env.rank == 0:
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(gathered, f)
        os.replace(tmp, out_json)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1])
