"""Small pieces shared by the companion readouts (``mvr``, ``med3d``, ``window3d``).

Plain functions on tensors: which backbone blocks to read, slice-wise encoding through
``get_intermediate_layers``, and padding to patch multiples. (Losses, sampling and foreground-aware crops
are the common ones in ``finetune.losses`` / ``finetune.data``.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resolve_layers(layers: Sequence[int], n_blocks: int, reference_depth: int = 12) -> list[int]:
    """Map block indices written for a ``reference_depth``-block ViT onto a backbone with ``n_blocks``.

    The papers name 0-based blocks of a 12-block ViT-B (e.g. [2, 5, 8, 11]). A ViT-L has 24 blocks and the CPU
    test backbones 2-4; index ``l`` is mapped to ``round((l + 1) * n_blocks / reference_depth) - 1`` so the
    relative depth is kept ([2, 5, 8, 11] -> [5, 11, 17, 23] for 24 blocks, [0, 1, 2, 3] for 4). Indices are
    returned unchanged when ``n_blocks == reference_depth``. Negative indices count from the end.
    """
    out: list[int] = []
    for layer in layers:
        if layer < 0:
            idx = n_blocks + layer
        elif n_blocks == reference_depth:
            idx = layer
        else:
            idx = max(0, round((layer + 1) * n_blocks / reference_depth) - 1)
        if not 0 <= idx < n_blocks:
            raise ValueError(f"block index {layer} is outside a backbone with {n_blocks} blocks")
        out.append(idx)
    return out


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """``[N, 1|3, H, W]`` -> ``[N, 3, H, W]``: a single CT/MR channel is repeated, as MedDINOv3 does."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"expected 1 or 3 input channels, got shape {tuple(x.shape)}")


def encode_slices(
    backbone: nn.Module, slices: torch.Tensor, layers: Sequence[int], chunk_size: int = 0
) -> list[torch.Tensor]:
    """Patch features of several blocks for a batch of 2-D slices.

    slices: ``[N, 1|3, H, W]`` with H, W multiples of the patch size. Returns one ``[N, E, H/p, W/p]`` tensor per
    entry of ``layers`` (final norm applied, cls/storage tokens dropped). ``chunk_size > 0`` bounds how many
    slices go through the backbone at once (peak memory), without changing the result.
    """
    p = backbone.patch_size
    if slices.shape[-1] % p or slices.shape[-2] % p:
        raise ValueError(f"slice size {tuple(slices.shape[-2:])} is not a multiple of the patch size {p}")
    x = to_three_channels(slices)
    chunks = [x] if chunk_size <= 0 else list(torch.split(x, chunk_size))
    outs = [backbone.get_intermediate_layers(c, n=list(layers), reshape=True, norm=True) for c in chunks]
    return [torch.cat([o[i] for o in outs]) for i in range(len(layers))]


def pad_to_multiple(x: torch.Tensor, multiples: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Pad the trailing ``len(multiples)`` dims of ``x`` at the end up to multiples; returns (padded, original sizes)."""
    sizes = list(x.shape[-len(multiples):])
    pad: list[int] = []
    for size, m in zip(reversed(sizes), reversed(list(multiples))):
        pad += [0, (-size) % m]
    if any(pad):
        x = F.pad(x, pad, value=value)
    return x, sizes


def crop_to(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on the trailing dims."""
    idx = (Ellipsis, *[slice(0, s) for s in sizes])
    return x[idx]
