"""2-D RoPE: periods, coordinate normalisation, table layout, train-only augmentation, rotation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.models.rope import (
    RopePositionEmbedding,
    augment_coords,
    patch_center_coords,
    rope_apply,
    rope_periods,
)
from pretrain.models.vision_transformer import _rotate_qk


def test_periods_base_formula():
    periods = rope_periods(64, base=100.0)
    expected = torch.tensor([100.0 ** (2 * j / 32) for j in range(16)])
    torch.testing.assert_close(periods, expected)
    mm = rope_periods(64, base=None, min_period=0.5, max_period=50.0)
    assert mm.shape == (16,) and math.isclose(mm[0].item(), 0.5, rel_tol=1e-6) and math.isclose(mm[-1].item(), 50.0, rel_tol=1e-6)
    with pytest.raises(ValueError):
        rope_periods(64, base=100.0, min_period=1.0, max_period=2.0)


@pytest.mark.parametrize(
    "mode, ys, xs",
    [
        ("separate", [-0.5, 0.5], [-0.75, -0.25, 0.25, 0.75]),
        ("max", [-0.75, -0.25], [-0.75, -0.25, 0.25, 0.75]),
        ("min", [-0.5, 0.5], [-0.5, 0.5, 1.5, 2.5]),
    ],
)
def test_patch_center_coords_normalisation(mode, ys, xs):
    coords = patch_center_coords(2, 4, mode)  # [h*w, 2] as (y, x), row-major
    assert coords.shape == (8, 2)
    np.testing.assert_allclose(coords[:, 0].reshape(2, 4)[:, 0].numpy(), ys, atol=1e-7)
    np.testing.assert_allclose(coords[:, 1].reshape(2, 4)[0].numpy(), xs, atol=1e-7)
    with pytest.raises(ValueError, match="normalize_coords"):
        patch_center_coords(2, 4, "diagonal")  # type: ignore[arg-type]


def test_tables_layout_y_then_x_tiled_twice():
    rope = RopePositionEmbedding(64, num_heads=4).eval()  # head dim 16 -> 4 periods
    sin, cos = rope(H=3, W=5)
    assert sin.shape == cos.shape == (15, 16)
    torch.testing.assert_close(sin[:, :8], sin[:, 8:], rtol=0, atol=0)  # tiled x2
    grid = sin[:, :8].reshape(3, 5, 8)
    # first Dh/4 angles depend on the row (y) only, the next Dh/4 on the column (x) only
    torch.testing.assert_close(grid[:, :1, :4].expand(3, 5, 4), grid[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(grid[:1, :, 4:].expand(3, 5, 4), grid[:, :, 4:], rtol=0, atol=0)
    coords = patch_center_coords(3, 5)
    expected = torch.sin(2 * math.pi * coords[:, 0:1] / rope.periods)
    torch.testing.assert_close(sin[:, :4], expected)


def test_golden_tables(golden_dir):
    arrays = np.load(golden_dir / "tiny_vit_io.npz")
    rope = RopePositionEmbedding(64, num_heads=4, rescale_coords=2.0).eval()
    sin, cos = rope(H=4, W=3)
    np.testing.assert_allclose(sin.numpy(), arrays["rope_sin"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(cos.numpy(), arrays["rope_cos"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(rope.periods.numpy(), arrays["rope_periods"], rtol=1e-7)


def test_augmentation_only_in_train_mode_and_varies():
    rope = RopePositionEmbedding(64, num_heads=4, shift_coords=0.1, jitter_coords=1.5, rescale_coords=2.0)
    rope.eval()
    a, b = rope(H=4, W=6), rope(H=4, W=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not rope.augments
    rope.train()
    assert rope.augments
    torch.manual_seed(0)
    c = rope(H=4, W=6)
    d = rope(H=4, W=6)
    assert not torch.equal(c[0], d[0]) and not torch.equal(c[0], a[0])
    no_aug = RopePositionEmbedding(64, num_heads=4).train()
    assert not no_aug.augments
    torch.testing.assert_close(no_aug(H=4, W=6), a, rtol=0, atol=0)


def test_augment_coords_distributions():
    coords = patch_center_coords(4, 4)
    torch.manual_seed(0)
    for _ in range(50):
        scaled = augment_coords(coords, rescale=2.0)
        factor = scaled / coords
        assert torch.allclose(factor, factor[0, 0])  # one factor for both axes
        assert 0.5 - 1e-6 <= factor[0, 0].item() <= 2.0 + 1e-6
        jittered = augment_coords(coords, jitter=1.5) / coords
        fy, fx = jittered[0, 0].item(), jittered[0, 1].item()
        assert 1 / 1.5 - 1e-6 <= fy <= 1.5 + 1e-6 and 1 / 1.5 - 1e-6 <= fx <= 1.5 + 1e-6
        shifted = augment_coords(coords, shift=0.25) - coords
        assert torch.allclose(shifted, shifted[0].expand_as(shifted), atol=1e-6) and shifted.abs().max() <= 0.25
    factors = torch.stack([(augment_coords(coords, rescale=2.0) / coords)[0, 0] for _ in range(400)])
    assert factors.log().mean().abs() < 0.1  # log-uniform, centred on 1
    assert factors.min() < 0.6 and factors.max() > 1.7


def test_fast_rotation_is_bit_identical_to_reference():
    torch.manual_seed(0)
    rope = RopePositionEmbedding(96, num_heads=6).eval()
    sin, cos = rope(H=3, W=4)  # [12, 16]
    n_prefix = 5
    qk = torch.randn(2, 2, 6, n_prefix + 12, 16)
    half = sin.shape[-1] // 2
    sin_h = torch.cat([torch.zeros(n_prefix, half), sin[:, :half]])
    cos_h = torch.cat([torch.ones(n_prefix, half), cos[:, :half]])
    fast = _rotate_qk(qk, (sin_h, cos_h))
    ref_patches = rope_apply(qk[..., n_prefix:, :], sin, cos)
    assert torch.equal(fast[..., n_prefix:, :], ref_patches)
    assert torch.equal(fast[..., :n_prefix, :], qk[..., :n_prefix, :])  # cls/storage untouched
