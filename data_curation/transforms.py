"""Default train-time intensity transform for CT-3M samples (shards store raw HU; windowing happens here).

The released MedDINOv3 model expects HU clamped to ``[-1000, 1000]``, then ``(x - 65.1084) / 178.0166``, repeated to
3 channels. The numbers live in ``configs/data/ct3m.yaml`` (block ``train_transform``); this function only applies
them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def normalize_hu(hu: np.ndarray | torch.Tensor, clip_hu: Sequence[float], mean: float, std: float, channels: int = 3) -> torch.Tensor:
    """int16/float HU ``[H, W]`` (or ``[N, H, W]``) -> float32 ``[channels, H, W]`` (or ``[N, channels, H, W]``)."""
    x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu).to(torch.float32)
    x = (x.clamp(float(clip_hu[0]), float(clip_hu[1])) - float(mean)) / float(std)
    return x.unsqueeze(-3).expand(*x.shape[:-2], channels, *x.shape[-2:]).contiguous()


def normalize_from_config(hu: np.ndarray | torch.Tensor, cfg: dict) -> torch.Tensor:
    """:func:`normalize_hu` with the ``train_transform`` block of the curation config."""
    t = cfg["train_transform"]
    return normalize_hu(hu, t["clip_hu"], t["mean"], t["std"], int(t["channels"]))
