"""How the meta-architecture runs on the hardware: activation checkpointing, torch.compile, DDP or FSDP2.

Everything here follows ``compute`` in the config and acts on what the training step really calls: the blocks
are compiled as modules (the backbone calls them through ``__call__``, where compile and FSDP2's hooks live), DDP
and FSDP2 use the process group that serves the training device (:class:`pretrain.train.distributed.Comm`).
"""
from __future__ import annotations

import torch

from meddino_common.config import ConfigError
from meddino_common.precision import autocast_dtype
from pretrain.train.distributed import Comm
from pretrain.train.meta_arch import SSLMetaArch


def compile_enabled(setting, device: torch.device) -> bool:
    """``compute.compile``: ``auto`` compiles on GPU only; ``true`` / ``false`` force it either way."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ConfigError(f"compute.compile must be auto, true or false, got {setting!r}")
        return device.type == "cuda"
    return bool(setting)


def wrap_model(meta: SSLMetaArch, compute, device: torch.device, comm: Comm) -> str:
    """Activation checkpointing, torch.compile and DDP / FSDP2 according to ``compute``; returns the mode used
    (``none`` in one process, else ``ddp`` or ``fsdp``)."""
    if bool(compute.activation_checkpointing):
        meta.student["backbone"].set_grad_checkpointing(True)
    mode = str(compute.distributed) if comm.distributed else "none"
    if mode not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"compute.distributed must be 'ddp' or 'fsdp', got {mode!r}")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        # only the student trains: its forward is the DDP unit; the frozen teachers run unwrapped
        meta.wrap_forwards(lambda name, fwd: fwd if name != "student" else DDP(
            fwd, device_ids=[device.index] if device.type == "cuda" else None, process_group=comm.group,
            broadcast_buffers=False, find_unused_parameters=False))
        with torch.no_grad():  # identical teachers everywhere (student params were broadcast by DDP)
            for tree in (meta.teacher, meta.gram_teacher):
                for p in (tree.parameters() if tree is not None else ()):
                    comm.broadcast_(p.data)
    elif mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

        kw: dict = {"mesh": comm.mesh()}
        dtype = autocast_dtype(str(compute.precision), device)
        if dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for tree in (meta.student, meta.teacher):
            for blk in tree["backbone"].blocks:
                fully_shard(blk, **kw)
            fully_shard(tree["dino_head"], **kw)
            fully_shard(tree["ibot_head"], **kw)
        for blk in (meta.gram_teacher.blocks if meta.gram_teacher is not None else ()):
            fully_shard(blk, **kw)
        meta.wrap_forwards(lambda name, fwd: fully_shard(fwd, **kw))  # the roots: what a step calls
    if compile_enabled(compute.compile, device):
        for backbone in (meta.student["backbone"], meta.teacher["backbone"], meta.gram_teacher):
            for blk in (backbone.blocks if backbone is not None else ()):
                blk.compile()
    return mode
