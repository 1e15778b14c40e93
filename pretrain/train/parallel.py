"""How the meta-architecture runs on the hardware: activation checkpointing, torch.compile, DDP or FSDP2.

Everything here follows ``compute`` in the config and acts on what the training step really calls: the blocks
are compiled as modules (the backbone calls them through ``__call__``, where compile and FSDP2's hooks live), DDP
and FSDP2 use the process group that serves the training device (:class:`pretrain.train.distributed.Comm`).
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.train.distributed import Comm
from pretrain.train.meta_arch import SSLMetaArch, StudentForward, TeacherForward


class GramTeacherForward(nn.Module):
    """Gram teacher patch tokens as one ``forward`` (so FSDP2 can wrap it)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)["x_norm_patchtokens"]


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 autocast on GPU (``compute.precision``), none (fp32) on CPU or for ``fp32``."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"compute.precision must be bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def configure_matmul_precision(tf32: bool, device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions on GPU (DINOv3 turns them on); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)


def compile_enabled(setting, device: torch.device) -> bool:
    """``compute.compile``: ``auto`` compiles on GPU only; ``true`` / ``false`` force it either way."""
    if isinstance(setting, str):
        if setting != "auto":
            raise ValueError(f"compute.compile must be auto, true or false, got {setting!r}")
        return device.type == "cuda"
    return bool(setting)


def wrap_model(meta: SSLMetaArch, compute, device: torch.device, comm: Comm) -> str:
    """Activation checkpointing, torch.compile and DDP / FSDP2 according to ``compute``; returns the mode used
    (``none`` in one process, else ``ddp`` or ``fsdp``)."""
    if bool(compute.activation_checkpointing):
        meta.student["backbone"].set_grad_checkpointing(True)
    mode = str(compute.distributed) if comm.distributed else "none"
    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"compute.distributed must be 'ddp' or 'fsdp', got {mode!r}")
    student_fwd: nn.Module = StudentForward(meta.student)
    teacher_fwd: nn.Module = TeacherForward(meta.teacher)
    gram_fwd: nn.Module | None = None
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        student_fwd = DDP(
            student_fwd,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=comm.group,
            broadcast_buffers=False,
            find_unused_parameters=False,
        )
        with torch.no_grad():  # identical teachers everywhere (student params were broadcast by DDP)
            for tree in (meta.teacher, meta.gram_teacher):
                for p in (tree.parameters() if tree is not None else ()):
                    comm.broadcast_(p.data)
    elif mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

        kw: dict = {"mesh": comm.mesh()}
        dtype = autocast_dtype_for(str(compute.precision), device)
        if dtype is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for tree in (meta.student, meta.teacher):
            for blk in tree["backbone"].blocks:
                fully_shard(blk, **kw)
            fully_shard(tree["dino_head"], **kw)
            fully_shard(tree["ibot_head"], **kw)
        student_fwd = fully_shard(student_fwd, **kw)
        teacher_fwd = fully_shard(teacher_fwd, **kw)
        if meta.gram_teacher is not None:
            for blk in meta.gram_teacher.blocks:
                fully_shard(blk, **kw)
            gram_fwd = fully_shard(GramTeacherForward(meta.gram_teacher), **kw)
    if compile_enabled(compute.compile, device):
        for backbone in (meta.student["backbone"], meta.teacher["backbone"], meta.gram_teacher):
            for blk in (backbone.blocks if backbone is not None else ()):
                blk.compile()
    meta.set_forward_modules(student_fwd, teacher_fwd, gram_fwd)
    return mode
