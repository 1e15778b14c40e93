"""Whole-volume prediction: preprocess like training, predict, go back to the original voxel grid.

Slice-wise recipes (the default ``predict_volume``): every axial slice (with its 2.5-D neighbours when
``data.context_slices`` > 0) goes through in-plane sliding windows of the plans' ``patch_size`` with step
``infer.step`` (0.5 = half-window overlap, nnU-Net's default), Gaussian importance weighting (sigma =
``infer.gaussian_sigma_scale`` x window) and optional test-time mirroring over both in-plane axes (logits averaged
over the 4 flips, as nnU-Net). Predictions stay logits until the end, as nnU-Net's export: they are resampled back
to the cropped grid as logits, then the class is the argmax (= the argmax of their softmax).

Memory: the slice-wise predictor streams. Each batch of ``infer.batch_size`` slices goes through the sliding windows,
is resampled back to the original in-plane grid and reduced to labels at once, so peak memory is one slice batch's
class scores plus the uint8 label volume, whatever the number of slices (an AMOS case at 896 px with 16 classes
held 10 GB of fp32 probabilities before). `predict_volume_slicewise` (the whole volume's logits, for callers that
need them) stores them in float16.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from finetune.preprocess import Plans, Volume, preprocess_volume, restore_geometry, restore_geometry_chunks
from meddino_common.precision import autocast


@dataclass(frozen=True)
class SlidingWindow:
    """How the slice-wise predictor reads a volume, built once from the config (``infer.*``,
    ``data.context_slices``) and the plans (``patch_size``)."""

    patch_size: tuple[int, int]     # in-plane window [Y, X]
    context_slices: int             # 2.5-D neighbours on each side
    step: float                     # window step as a fraction of the window (nnU-Net 0.5)
    gaussian_sigma_scale: float
    mirror: bool
    batch_size: int                 # windows per forward, and slices per streamed batch
    precision: str                  # bf16 | fp16 | fp32 (CPU always fp32)

    @classmethod
    def from_config(cls, cfg, plans: Plans) -> "SlidingWindow":
        icfg = cfg.infer
        return cls(tuple(int(p) for p in plans.patch_size), int(cfg.data.context_slices), float(icfg.step),
                   float(icfg.gaussian_sigma_scale), bool(icfg.mirror), max(int(icfg.batch_size), 1),
                   str(icfg.precision))


def mirrored_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mirror: bool,
                    axes: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Mean of the model's logits over all flip combinations of ``axes`` (each flipped back)."""
    out = model(x).float()
    if not mirror:
        return out
    n = 1
    for r in range(1, len(axes) + 1):
        for combo in itertools.combinations(axes, r):
            out = out + torch.flip(model(torch.flip(x, combo)).float(), combo)
            n += 1
    return out / n


def context_stack(volume: torch.Tensor, z_indices: torch.Tensor, context: int) -> torch.Tensor:
    """``volume [Z, Y, X]`` -> ``[len(z), 1 + 2*context, Y, X]`` with edge-replicated neighbours (2.5-D input)."""
    offsets = torch.arange(-context, context + 1, device=volume.device)
    idx = (z_indices[:, None] + offsets[None]).clamp(0, volume.shape[0] - 1)
    return volume[idx]


@torch.no_grad()
def iter_slicewise_logits(model: nn.Module, volume: torch.Tensor, window: SlidingWindow,
                          slices_per_batch: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``volume [Z, Y, X]`` (preprocessed, on the model's device) -> ``(z0, logits [K, n, Y, X])`` float32 on the
    device, one batch of ``n`` slices at a time (in-plane Gaussian sliding windows, optional mirroring)."""
    model.eval()
    device = volume.device
    slices_per_batch = int(slices_per_batch or window.batch_size)
    predictor = lambda x: mirrored_logits(model, x, window.mirror)
    with autocast(window.precision, device):
        for z0 in range(0, volume.shape[0], slices_per_batch):
            zs = torch.arange(z0, min(z0 + slices_per_batch, volume.shape[0]), device=device)
            x = context_stack(volume, zs, window.context_slices).float()
            logits = sliding_window_inference(x, roi_size=window.patch_size, sw_batch_size=window.batch_size,
                                              predictor=predictor, overlap=1.0 - window.step, mode="gaussian",
                                              sigma_scale=window.gaussian_sigma_scale, padding_mode="constant",
                                              cval=0.0)
            yield z0, logits.float().permute(1, 0, 2, 3)


@torch.no_grad()
def predict_volume_slicewise(model: nn.Module, volume: torch.Tensor, window: SlidingWindow,
                             slices_per_batch: Optional[int] = None) -> torch.Tensor:
    """``volume [Z, Y, X]`` -> logits ``[K, Z, Y, X]`` float16 on CPU (half the memory of float32 probabilities)."""
    out = None
    for z0, logits in iter_slicewise_logits(model, volume, window, slices_per_batch):
        if out is None:
            out = torch.empty((logits.shape[0], volume.shape[0], *logits.shape[2:]), dtype=torch.float16)
        out[:, z0:z0 + logits.shape[1]] = logits.to(torch.float16).cpu()
    return out


def predict_case(model: nn.Module, recipe, image: Volume, plans: Plans, cfg, device: torch.device) -> np.ndarray:
    """One CT volume -> label map ``[Z, Y, X]`` uint8 on the image's original grid.

    Slice-wise recipes stream slice batches straight back to the original grid (bounded memory); other recipes
    return the whole volume's logits from ``predict_volume``, restored chunk by chunk."""
    arr, _, props = preprocess_volume(image, plans)
    volume = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    if recipe.streams_slices:
        window = SlidingWindow.from_config(cfg, plans)
        return restore_geometry_chunks(iter_slicewise_logits(model, volume, window), props, len(plans.labels))
    logits = recipe.predict_volume(model, volume, cfg, plans)
    if logits.shape[0] != len(plans.labels) or tuple(logits.shape[1:]) != tuple(arr.shape):
        raise ValueError(f"head {recipe.name}: predict_volume returned {tuple(logits.shape)}, expected "
                         f"({len(plans.labels)}, {', '.join(map(str, arr.shape))})")
    return restore_geometry(logits, props)
