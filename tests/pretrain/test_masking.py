"""iBOT block masking: block sizes/aspects, per-image budgets, batch-level ratio spread and bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.data.masking import BlockMasking, sample_batch_masks


def test_each_block_has_at_least_min_patches_and_bounded_aspect() -> None:
    gen = BlockMasking(height=14, width=14, min_num_patches=4, min_aspect=0.3)
    rng = np.random.default_rng(0)
    for budget in (4, 10, 40, 98):
        for _ in range(200):
            mask = np.zeros((14, 14), dtype=bool)
            added = gen._add_block(mask, budget, rng)
            if added == 0:
                continue
            rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            h, w = len(rows), len(cols)
            assert added == h * w == mask.sum()  # one filled rectangle on an empty grid
            assert 4 <= added <= budget
            # rounding of sqrt(area * aspect) lets the realised aspect exceed [0.3, 3.3] only for tiny blocks
            assert h / w <= 1 / 0.3 * 2.5 and w / h <= 1 / 0.3 * 2.5


@pytest.mark.parametrize("target", [0, 5, 20, 40, 98])
def test_mask_count_stays_within_budget_and_close_to_it(target: int) -> None:
    gen = BlockMasking(height=14, width=14)
    rng = np.random.default_rng(1)
    counts = [int(gen(target, rng).sum()) for _ in range(100)]
    assert max(counts) <= target
    if target:
        assert np.mean(counts) >= 0.8 * target


def test_batch_masks_half_the_crops_with_ratios_spread_over_range() -> None:
    n_images, grid = 16, 14
    n_tokens = grid * grid
    gen = BlockMasking(height=grid, width=grid)
    ratios_by_rank = []
    for seed in range(30):
        out = sample_batch_masks(n_images, gen, (0.1, 0.5), 0.5, np.random.default_rng(seed))
        masks = out["collated_masks"]
        assert masks.shape == (n_images, n_tokens) and masks.dtype == torch.bool
        per_image = masks.sum(1)
        assert int((per_image > 0).sum()) == n_images // 2  # exactly half of the global crops masked
        ratios = np.sort(per_image[per_image > 0].numpy() / n_tokens)
        bounds = np.linspace(0.1, 0.5, n_images // 2 + 1)
        assert np.all(ratios <= bounds[1:] + 1e-9)  # the i-th smallest ratio stays under the i-th bucket cap
        ratios_by_rank.append(ratios)
        # bookkeeping
        flat = masks.flatten()
        assert torch.equal(out["mask_indices_list"], flat.nonzero().flatten())
        assert out["n_masked_patches"].tolist() == [int(flat.sum())]
        assert out["upperbound"] == sum(int(n_tokens * b) for b in bounds[1:])
        image_of_patch = out["mask_indices_list"] // n_tokens
        weights_per_image = torch.zeros(n_images).index_add_(0, image_of_patch, out["masks_weight"])
        expected = (per_image > 0).float()
        torch.testing.assert_close(weights_per_image, expected)  # every masked image weighs 1 in total
    mean_ratios = np.mean(ratios_by_rank, axis=0)
    assert mean_ratios[0] < 0.16 and mean_ratios[-1] > 0.4  # spread from ~0.1 to ~0.5
    assert abs(np.mean(mean_ratios) - 0.3) < 0.03


def test_masks_are_deterministic_given_the_generator() -> None:
    gen = BlockMasking(height=8, width=8)
    a = sample_batch_masks(6, gen, (0.1, 0.5), 0.5, np.random.default_rng(7))
    b = sample_batch_masks(6, gen, (0.1, 0.5), 0.5, np.random.default_rng(7))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    c = sample_batch_masks(6, gen, (0.1, 0.5), 0.5, np.random.default_rng(8))
    assert not torch.equal(a["collated_masks"], c["collated_masks"])


def test_masked_images_are_shuffled_across_positions() -> None:
    gen = BlockMasking(height=8, width=8)
    masked_positions = np.zeros(8)
    for seed in range(200):
        out = sample_batch_masks(8, gen, (0.1, 0.5), 0.5, np.random.default_rng(seed))
        masked_positions += (out["collated_masks"].sum(1) > 0).numpy()
    assert np.all(np.abs(masked_positions / 200 - 0.5) < 0.15)
    assert math.isclose(masked_positions.sum(), 200 * 4)


def test_masks_hold_exactly_the_official_counts() -> None:
    """As DINOv2/v3's collate: masked image i masks exactly int(N * upper bound of its ratio sub-interval) patches
    (blocks of at most half the grid, then single patches to top up), the others none."""
    gen = BlockMasking(height=14, width=14, max_block_ratio=0.5)
    n, rng = 16, np.random.default_rng(3)
    out = sample_batch_masks(n, gen, (0.1, 0.5), 0.5, rng)
    per_image = sorted(int(c) for c in out["collated_masks"].sum(-1))
    bounds = np.linspace(0.1, 0.5, 8 + 1)
    assert per_image == [0] * 8 + sorted(int(196 * b) for b in bounds[1:])
    assert out["upperbound"] == sum(int(196 * b) for b in bounds[1:]) == int(out["n_masked_patches"])
    for target in (1, 3, 97, 98, 150, 196):
        assert int(gen(target, rng).sum()) == target
