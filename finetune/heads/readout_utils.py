"""Small pieces shared by the companion readouts (``mvr``, ``med3d``, ``window3d``).

Everything here is a plain function on tensors/arrays: which backbone blocks to read, freezing, slice-wise
encoding through ``get_intermediate_layers``, the soft-Dice + cross-entropy loss used by all three papers, and
foreground-aware cropping / padding of volumes. Arrays are ``[D, H, W]`` (axial slices first), as produced by
the finetune preprocessing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad=False`` on every parameter (returns it)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool = False, batch_dice: bool = True,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """1 - mean soft Dice over classes.

    logits: ``[B, C, *S]``; target: ``[B, *S]`` integer labels. Softmax probabilities; ``batch_dice`` pools the
    batch into one Dice per class (nnU-Net's choice); background (class 0) excluded by default. ``smooth`` is
    added to numerator and denominator so an absent class predicted absent scores 1.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    start = 0 if include_background or num_classes == 1 else 1
    probs, onehot = probs[:, start:], onehot[:, start:]
    dims = (0, *range(2, probs.ndim)) if batch_dice else tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - dice.mean()


def dice_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 1.0, dice_weight: float = 1.0,
    include_background: bool = False, batch_dice: bool = True,
) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * soft Dice`` (logits ``[B, C, *S]``, target ``[B, *S]``)."""
    ce = F.cross_entropy(logits.float(), target.long())
    dice = soft_dice_loss(logits, target, include_background=include_background, batch_dice=batch_dice)
    return ce_weight * ce + dice_weight * dice


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


def foreground_crop_start(
    label: np.ndarray, crop_size: Sequence[int], rng: np.random.Generator | None, fg_probability: float,
) -> list[int]:
    """Start corner of a crop of ``crop_size`` inside a volume of ``label.shape``.

    With probability ``fg_probability`` (always when ``rng`` is None: deterministic validation crops) the crop is
    centred on the foreground: on the centre of the foreground bounding box without ``rng``, on a random
    foreground voxel with it. Otherwise a uniformly random crop. The start may be negative or exceed the volume
    (the caller pads), so small volumes are centred instead of failing.
    """
    shape = label.shape
    fg = np.argwhere(label > 0)
    use_fg = len(fg) > 0 and (rng is None or rng.random() < fg_probability)
    if use_fg:
        centre = (fg.min(0) + fg.max(0)) // 2 if rng is None else fg[rng.integers(len(fg))]
        start = [int(c) - s // 2 for c, s in zip(centre, crop_size)]
    elif rng is None:
        start = [(n - s) // 2 for n, s in zip(shape, crop_size)]
    else:
        start = [int(rng.integers(min(0, n - s), max(0, n - s) + 1)) for n, s in zip(shape, crop_size)]
    # keep the crop inside the volume whenever the volume is large enough
    return [min(max(st, min(0, n - s)), max(0, n - s)) if n >= s else (n - s) // 2
            for st, n, s in zip(start, shape, crop_size)]


def extract_crop(array: np.ndarray, start: Sequence[int], crop_size: Sequence[int], pad_value: float) -> np.ndarray:
    """``array[start:start+crop_size]`` on the leading dims, padded with ``pad_value`` where it leaves the array."""
    out = np.full(tuple(crop_size) + array.shape[len(crop_size):], pad_value, dtype=array.dtype)
    src, dst = [], []
    for st, s, n in zip(start, crop_size, array.shape):
        a, b = max(st, 0), min(st + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    out[tuple(dst)] = array[tuple(src)]
    return out
