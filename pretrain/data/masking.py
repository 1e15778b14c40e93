"""iBOT block masking (BEiT style) and the per-batch mask set of DINOv2/v3.

For a batch of n = n_global_crops * B global-crop images, ``mask_sample_probability`` (0.5) of them get a mask;
their ratios are spread evenly over ``mask_ratio_min_max`` ([0.1, 0.5]) as the official DINOv2/v3 collate does:
``mask_ratio_min_max`` is cut into n_masked equal sub-intervals and image i masks exactly
``int(N * upper bound of sub-interval i)`` patches. Masks are built from random rectangles of at least
``min_num_patches`` (4) patches, aspect ratio in [``min_aspect``, 1 / ``min_aspect``] (0.3-3.3) and at most
``max_block_ratio`` (0.5, DINOv3's ``max_num_patches = 0.5 * N``) of the grid each; when blocks stop fitting, the
mask is topped up with random single patches to the exact count (DINOv3's ``complete_mask_randomly``).
All randomness comes from the ``numpy.random.Generator`` passed in (deterministic, resumable loaders).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockMasking:
    """Block mask generator on a ``height`` x ``width`` patch grid."""

    height: int
    width: int
    min_num_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect
    max_block_ratio: float | None = 0.5  # one block covers at most this share of the grid (None: no cap)
    max_attempts: int = 10

    @property
    def n_patches(self) -> int:
        return self.height * self.width

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try to mask one new rectangle adding between 1 and ``budget`` patches; returns how many were added."""
        max_aspect = self.max_aspect if self.max_aspect is not None else 1.0 / self.min_aspect
        log_aspect = (math.log(self.min_aspect), math.log(max_aspect))
        min_area = min(self.min_num_patches, budget)
        for _ in range(self.max_attempts):
            target_area = rng.uniform(min_area, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width) or h * w < min_area:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, n_masked_patches: int, rng: np.random.Generator) -> np.ndarray:
        """[height, width] bool mask with exactly ``min(n_masked_patches, N)`` True: blocks first, then random
        single patches when no further block fits."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_masked_patches:
            budget = n_masked_patches - count
            if self.max_block_ratio is not None:
                budget = min(budget, max(1, int(self.max_block_ratio * self.n_patches)))
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        missing = min(n_masked_patches, self.n_patches) - count
        if missing > 0:
            flat = mask.reshape(-1)
            flat[rng.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
        return mask


def sample_batch_masks(
    n_images: int,
    generator: BlockMasking,
    mask_ratio_min_max: tuple[float, float],
    mask_sample_probability: float,
    rng: np.random.Generator,
) -> dict[str, Tensor | int]:
    """Masks for ``n_images`` global crops (crop-major order) and the iBOT bookkeeping tensors.

    Returns:
        ``collated_masks`` [n_images, N] bool; ``mask_indices_list`` [M] long indices into the flattened
        [n_images * N] patch tokens; ``masks_weight`` [M] = 1 / masked count of the patch's image;
        ``n_masked_patches`` [1] long = M; ``upperbound`` int = sum of the masked images' ratio caps * N.
    """
    n_tokens = generator.n_patches
    n_masked_images = int(n_images * mask_sample_probability)
    bounds = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked_images + 1)
    masks, upperbound = [], 0
    for i in range(n_masked_images):
        n_masked = int(n_tokens * bounds[i + 1])
        masks.append(generator(n_masked, rng))
        upperbound += n_masked
    masks += [np.zeros((generator.height, generator.width), dtype=bool)] * (n_images - n_masked_images)
    order = rng.permutation(n_images)
    collated = torch.from_numpy(np.stack([masks[j] for j in order]).reshape(n_images, n_tokens))
    mask_indices = collated.flatten().nonzero().flatten()
    per_image = collated.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [n_images, 1]
    masks_weight = (1.0 / per_image).expand_as(collated)[collated]
    return {
        "collated_masks": collated,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "upperbound": upperbound,
    }
