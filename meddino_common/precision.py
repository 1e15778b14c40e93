"""Numeric precision on the training device: autocast dtype/context and TF32, one place for every trainer.

``precision`` is the config word ``bf16`` | ``fp16`` | ``fp32``. On CPU everything runs in fp32 whatever the word:
CPU autocast to bf16 is slow on most CPUs and would make the CPU tests numerically unlike a CPU fp32 reference.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if torch.device(device).type != "cuda" or precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for :func:`autocast_dtype`, or a no-op context when that is None."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def configure_tf32(enabled: bool, device: torch.device | str) -> None:
    """TF32 tensor-core matmuls and convolutions on GPU (DINOv3 turns them on); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)
