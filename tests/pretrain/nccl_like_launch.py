"""Run ``python -m pretrain.train`` inside a process group whose device map is NCCL's: CUDA only.

A group created with backend ``"cuda:gloo"`` has no CPU backend, exactly like ``"nccl"`` on a GPU cluster, so any
collective the trainer sends with a CPU tensor fails here as it would there ("No backend type associated with
device type cpu"). Launched by torchrun from tests/pretrain/test_distributed.py; arguments are the trainer's.
"""
import sys

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group(backend="cuda:gloo")  # rank / world / master from torchrun's environment
    from pretrain.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
