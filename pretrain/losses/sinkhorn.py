"""Sinkhorn-Knopp centring of teacher outputs (DINOv3's default teacher centring).

The teacher's prototype scores are turned into soft assignments whose prototype marginals are (approximately)
uniform over the whole global batch, which prevents collapse without a running centre. Rows may be split
across ranks: every sum over rows is all-reduced when a process group is initialised, so N rows spread over
R ranks give exactly the result of one process holding all N rows. ``group`` is the process group to reduce over
(None: the default group); it must serve the logits' device (the trainer passes the one of its training device).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x: Tensor, op: "dist.ReduceOp.RedOpType" = None, group=None) -> Tensor:
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, group=None) -> Tensor:
    """Soft cluster assignments of teacher logits by ``n_iterations`` Sinkhorn-Knopp normalisations.

    Args:
        teacher_logits: [N_local, K] teacher head outputs on this rank (N = sum of N_local over ranks; ranks may
            hold different numbers of rows, e.g. masked patches).
        teacher_temp: temperature dividing the logits.
        n_iterations: alternating (prototype, sample) normalisations, 3 in DINOv2/v3.

    Returns:
        [N_local, K] float32 probabilities; every row sums to 1.

    Same result as the official ``exp(logits / T)`` formulation, but the maximum over rows (all ranks)
    of each prototype (all-reduced with MAX) is subtracted first. A factor common to one prototype cancels in
    the first prototype normalisation, so the output is mathematically identical to the official form (and
    to subtracting the single global max), while fp32 neither overflows for logits/T > 88 nor lets a whole
    prototype underflow. Sums are clamped to the smallest normal float so that a row whose scores all
    underflow gives zeros instead of NaN.
    """
    logits = teacher_logits.float()
    n_rows_local, n_prototypes = logits.shape
    device = logits.device

    if n_rows_local > 0:
        prototype_max = logits.max(dim=0, keepdim=True).values  # [1, K]
    else:
        prototype_max = torch.full((1, n_prototypes), float("-inf"), device=device)
    prototype_max = _all_reduce(prototype_max, dist.ReduceOp.MAX if _distributed() else None, group)
    n_rows = _all_reduce(torch.tensor(float(n_rows_local), device=device), group=group)
    tiny = torch.finfo(torch.float32).tiny

    q = torch.exp((logits - prototype_max) / teacher_temp)  # [N_local, K]
    q /= _all_reduce(q.sum(), group=group).clamp_min(tiny)
    for _ in range(n_iterations):
        per_prototype = _all_reduce(q.sum(dim=0, keepdim=True), group=group)  # [1, K]
        q /= per_prototype.clamp_min(tiny)
        q /= n_prototypes
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny)  # [N_local, 1]
        q /= n_rows
    q *= n_rows
    return q
