"""DINO cross-entropy between teacher global-crop probabilities and student crop logits (class tokens)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dino_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> Tensor:
    """Mean cross-entropy over all (student crop, teacher crop) pairs of the same image.

    Args:
        student_logits: [S, B, K] student head outputs for S crops of B images.
        teacher_probs: [T, B, K] centred teacher probabilities (e.g. from ``sinkhorn_knopp``) for T global crops.
        student_temp: softmax temperature of the student.
        ignore_diagonal: drop pairs where student crop s and teacher crop t are the same view (s == t, for
            s, t < min(S, T)); used when the student crops are the teacher's global crops.

    Returns:
        Scalar: -sum_{s,t,b} <p_t,b, log softmax(z_s,b / temp)> divided by the number of summed pairs times B,
        i.e. B*S*T, or B*(S*T - min(S, T)) with ``ignore_diagonal``.
    """
    n_student, batch, _ = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    # [S, T]: cross-entropy summed over the batch, per crop pair
    pair_loss = -torch.einsum("sbk,tbk->st", log_probs, teacher_probs.float())
    if not ignore_diagonal:
        return pair_loss.sum() / (batch * n_student * n_teacher)
    n_diag = min(n_student, n_teacher)
    off_diagonal = ~torch.eye(n_student, n_teacher, dtype=torch.bool, device=pair_loss.device)
    return pair_loss[off_diagonal].sum() / (batch * (n_student * n_teacher - n_diag))
