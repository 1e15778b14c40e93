"""Gram anchoring loss (DINOv3 stage 2/3): keeps the student's patch-similarity structure close to a Gram teacher's."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def resize_patch_grid(patches: Tensor, n_patches: int, mode: str = "bicubic", antialias: bool = False) -> Tensor:
    """Resample a square patch-token grid to another square grid (the Gram teacher's tokens onto the student's).

    Args:
        patches: [B, P2, D] tokens of a sqrt(P2) x sqrt(P2) grid (row-major, as the ViT emits them).
        n_patches: target token count P (a perfect square).
        mode, antialias: ``F.interpolate``'s; bicubic, align_corners=False, no antialias is DINOv3's
            Gram-teacher resize (``gram.resize_method`` / ``gram.resize_antialias``).

    Returns:
        [B, P, D] in the input dtype (interpolated in fp32); the input itself when the grids already agree.
    """
    side_in, side_out = math.isqrt(patches.shape[1]), math.isqrt(n_patches)
    if side_in * side_in != patches.shape[1] or side_out * side_out != n_patches:
        raise ValueError(
            f"Gram resize needs square patch grids, got {patches.shape[1]} -> {n_patches} tokens"
        )
    if side_in == side_out:
        return patches
    grid = patches.transpose(1, 2).unflatten(-1, (side_in, side_in))  # [B, D, s_in, s_in]
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    grid = F.interpolate(grid.float(), size=(side_out, side_out), mode=mode, align_corners=align, antialias=antialias)
    return grid.flatten(-2).transpose(1, 2).to(patches.dtype)  # [B, P, D]


def gram_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    img_level: bool = True,
    normalize: bool = True,
    remove_neg: bool = False,
) -> Tensor:
    """Mean squared error between student and teacher patch Gram matrices.

    Args:
        student_patches: [B, P, D] final-normed student patch tokens of the global crops.
        teacher_patches: [B, P2, D] Gram-teacher patch tokens; resized to P tokens when P2 != P (the teacher
            sees the same crops at a higher resolution).
        img_level: one P x P Gram matrix per image; False: one (B*P) x (B*P) matrix over the whole batch.
        normalize: L2-normalise tokens first (cosine similarities).
        remove_neg: clamp negative similarities of both Gram matrices to 0.

    Returns:
        Scalar: mean over all entries (diagonal included) of (G_student - G_teacher)^2, in fp32.
    """
    if teacher_patches.shape[1] != student_patches.shape[1]:
        teacher_patches = resize_patch_grid(teacher_patches, student_patches.shape[1])
    student = student_patches.float()
    teacher = teacher_patches.float()
    if normalize:
        student = F.normalize(student, dim=-1)
        teacher = F.normalize(teacher, dim=-1)
    if not img_level:
        student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)  # [B*P, D]
    student_gram = student @ student.transpose(-1, -2)
    teacher_gram = teacher @ teacher.transpose(-1, -2)
    if remove_neg:
        student_gram = student_gram.clamp_min(0.0)
        teacher_gram = teacher_gram.clamp_min(0.0)
    return F.mse_loss(student_gram, teacher_gram)
