"""Run a pretraining entry point inside a process group whose device map is NCCL's: CUDA only.

A group created with backend ``"cuda:gloo"`` has no CPU backend, exactly like ``"nccl"`` on a GPU cluster, so any
collective sent with a CPU tensor fails here as it would there ("No backend type associated with device type cpu").
Launched by torchrun from the tests:

    nccl_like_launch.py [--module pretrain.preflight] [--cpu-tensor-collectives] ARGS...

``--module`` picks the entry point (default ``pretrain.train``); ``--cpu-tensor-collectives`` puts back the old
defect (the NaN/preemption check all-reduced as a CPU tensor on the default group), for checking that the
preflight names it.
"""
import importlib
import sys

import torch
import torch.distributed as dist

if __name__ == "__main__":
    args = sys.argv[1:]
    module = "pretrain.train.__main__"
    if args[:1] == ["--module"]:
        module, args = args[1] + (".__main__" if args[1] == "pretrain.train" else ""), args[2:]
    if args[:1] == ["--cpu-tensor-collectives"]:
        args = args[1:]
        from pretrain.train.distributed import Comm

        def any_on_cpu(self, flag: bool) -> bool:
            if not self.distributed:
                return bool(flag)
            t = torch.tensor([int(flag)], dtype=torch.int32)  # CPU, default group: what the trainer used to do
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item())

        Comm.any = any_on_cpu
    dist.init_process_group(backend="cuda:gloo")  # rank / world / master from torchrun's environment
    sys.exit(importlib.import_module(module).main(args))
