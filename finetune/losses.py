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
import torch.distributed as dist
import torch.nn.functional as F


class _GatherSum(torch.autograd.Function):
    """Sum of ``x`` over all DDP ranks, differentiable: nnU-Net's ``AllGatherGrad`` followed by ``.sum(0)``. The
    backward all-reduces the incoming gradient, so each rank's share gets the gradient of every rank's loss (the
    Dice is the same global number everywhere; DDP's gradient averaging then gives the single-process gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def ddp_active() -> bool:
    """True inside a multi-process group (the batch-Dice terms are then summed over ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def soft_dice(probs: torch.Tensor, target: torch.Tensor, batch_dice: bool = True, do_bg: bool = False,
              smooth: float = 1e-5, ddp: bool = False) -> torch.Tensor:
    """Mean soft Dice. ``probs [B, K, *S]`` (softmax), ``target [B, *S]`` int64 -> scalar in [0, 1].

    ``ddp`` (with ``batch_dice``): the per-class intersection / prediction / reference sums are summed over all ranks
    before the Dice, so the Dice is the global batch's, as nnU-Net's ``MemoryEfficientSoftDiceLoss(ddp=True)``."""
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
    if ddp and batch_dice:
        intersect, sum_pred, sum_gt = _GatherSum.apply(intersect), _GatherSum.apply(sum_pred), _GatherSum.apply(sum_gt)
    dice = (2 * intersect + smooth) / torch.clamp(sum_pred + sum_gt + smooth, min=1e-8)
    return dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5, ddp: bool = False) -> torch.Tensor:
    """``logits [B, K, *S]``, ``target [B, *S]`` -> scalar. Computed in fp32 for AMP stability."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target.long())
    dice = soft_dice(torch.softmax(logits, 1), target, batch_dice, do_bg, smooth, ddp)
    return weight_ce * ce + weight_dice * (1.0 - dice)


def build_loss(cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss named by ``cfg.loss.name`` (only ``dice_ce``) with its config weights. Built inside a DDP process
    group, its batch Dice spans the global batch (nnU-Net builds its loss with ``ddp=self.is_ddp``); every rank must
    then call it the same number of times."""
    lc = cfg.loss
    if lc.name != "dice_ce":
        raise ValueError(f"unknown loss.name {lc.name!r} (available: dice_ce)")
    params = dict(weight_ce=float(lc.weight_ce), weight_dice=float(lc.weight_dice), batch_dice=bool(lc.batch_dice),
                  do_bg=bool(lc.do_bg), smooth=float(lc.smooth), ddp=ddp_active())
    return lambda logits, target: dice_ce_loss(logits, target, **params)


def pseudo_dice_stats(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard tp/fp/fn per foreground class, ``[3, K-1]`` int64 on the logits' device, summed over the batch (nnU-Net's
    online pseudo-Dice). Nothing leaves the device: the caller sums these small tensors and reads them when it logs."""
    pred = logits.argmax(1)
    target = target.to(pred.device)
    rows = []
    for c in range(1, logits.shape[1]):
        p, g = pred == c, target == c
        rows.append(torch.stack([(p & g).sum(), (p & ~g).sum(), (~p & g).sum()]))
    if not rows:
        return torch.zeros(3, 0, dtype=torch.int64, device=pred.device)
    return torch.stack(rows, 1)
