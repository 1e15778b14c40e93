"""nnU-Net's Dice + cross-entropy loss (``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``).

Soft Dice on softmax probabilities, background excluded (``do_bg=False``), batch Dice (tp/fp/fn summed over the
batch and all spatial axes, one Dice per class, then averaged over classes), smooth 1e-5 in numerator and
denominator. ``loss = w_ce * CE + w_dice * (1 - Dice)``; nnU-Net adds ``-Dice`` instead, which has the same gradient —
we add ``1 - Dice`` so the logged loss stays non-negative. Works for 2-D ``[B, K, H, W]`` and 3-D
``[B, K, D, H, W]`` logits with integer targets ``[B, *spatial]``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def soft_dice(probs: torch.Tensor, target: torch.Tensor, batch_dice: bool = True, do_bg: bool = False,
              smooth: float = 1e-5) -> torch.Tensor:
    """Mean soft Dice. ``probs [B, K, *S]`` (softmax), ``target [B, *S]`` int64 -> scalar in [0, 1]."""
    n_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), n_classes).movedim(-1, 1).to(probs.dtype)
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    intersect = (probs * onehot).sum(axes)
    sum_pred = probs.sum(axes)
    sum_gt = onehot.sum(axes)
    dice = (2 * intersect + smooth) / torch.clamp(sum_pred + sum_gt + smooth, min=1e-8)
    return dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """``logits [B, K, *S]``, ``target [B, *S]`` -> scalar. Computed in fp32 for AMP stability."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target.long())
    dice = soft_dice(torch.softmax(logits, 1), target, batch_dice, do_bg, smooth)
    return weight_ce * ce + weight_dice * (1.0 - dice)


def build_loss(cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss named by ``cfg.loss.name`` (only ``dice_ce``) with its config weights."""
    lc = cfg.loss
    if lc.name != "dice_ce":
        raise ValueError(f"unknown loss.name {lc.name!r} (available: dice_ce)")
    params = dict(weight_ce=float(lc.weight_ce), weight_dice=float(lc.weight_dice), batch_dice=bool(lc.batch_dice),
                  do_bg=bool(lc.do_bg), smooth=float(lc.smooth))
    return lambda logits, target: dice_ce_loss(logits, target, **params)


def pseudo_dice_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard tp/fp/fn per foreground class, ``[3, K-1]``, summed over the batch (nnU-Net's online pseudo-Dice)."""
    n_classes = logits.shape[1]
    pred = logits.argmax(1)
    stats = torch.zeros(3, n_classes - 1, dtype=torch.float64)
    for c in range(1, n_classes):
        p, g = pred == c, target == c
        stats[0, c - 1] = (p & g).sum()
        stats[1, c - 1] = (p & ~g).sum()
        stats[2, c - 1] = (~p & g).sum()
    return stats
