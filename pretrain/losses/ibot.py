"""iBOT masked-patch loss: student predicts the teacher's patch distribution at masked positions."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ibot_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    masks_weight: Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Weighted cross-entropy over masked patches.

    Args:
        student_logits: [M, K] student iBOT-head outputs at the M masked patches of the batch.
        teacher_probs: [M, K] centred teacher probabilities at the same patches.
        masks_weight: [M] weight of each patch, 1 / (number of masked patches of its image), so that every
            masked image contributes equally whatever its mask ratio.
        n_images: number of global-crop images the masks were drawn for, masked or not (n_global_crops * B).

    Returns:
        Scalar: sum_m w_m * CE(p_m, softmax(z_m / temp)) / n_images.
    """
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_patch = -(teacher_probs.float() * log_probs).sum(dim=-1)  # [M]
    return (per_patch * masks_weight.float()).sum() / n_images
