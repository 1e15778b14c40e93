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
    rope_split_qkv,
)


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


def _half_tables(sin: torch.Tensor, cos: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = sin.shape[-1] // 2
    return torch.cat([torch.zeros(n_prefix, half), sin[:, :half]]), torch.cat([torch.ones(n_prefix, half), cos[:, :half]])


def _reference_split_qkv(qkv, num_heads, sin, cos, n_prefix):
    """The official recipe: permute, rotate patch tokens of q and k with tiled tables, concat the prefix back."""
    B, N, C = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.cat([q[:, :, :n_prefix], rope_apply(q[:, :, n_prefix:], sin, cos)], dim=2)
    k = torch.cat([k[:, :, :n_prefix], rope_apply(k[:, :, n_prefix:], sin, cos)], dim=2)
    return q, k, v


def test_fused_rotation_is_bit_identical_to_reference():
    torch.manual_seed(0)
    rope = RopePositionEmbedding(96, num_heads=6).eval()
    sin, cos = rope(H=3, W=4)  # [12, 16]
    n_prefix = 5
    qkv = torch.randn(2, n_prefix + 12, 3 * 96)
    q, k, v = rope_split_qkv(qkv, 6, _half_tables(sin, cos, n_prefix))
    rq, rk, rv = _reference_split_qkv(qkv, 6, sin, cos, n_prefix)
    assert torch.equal(q, rq) and torch.equal(k, rk) and torch.equal(v, rv)
    assert torch.equal(q[:, :, :n_prefix], qkv.view(2, -1, 3, 6, 16)[:, :n_prefix, 0].transpose(1, 2))  # prefix untouched
    assert q.is_contiguous() and k.is_contiguous()  # what SDPA's CPU kernels like


def test_fused_rotation_gradients_match_autograd_of_reference():
    """The hand-written backward equals autograd through the reference (fp32), for q, k and v together."""
    torch.manual_seed(1)
    rope = RopePositionEmbedding(64, num_heads=4).eval()
    sin, cos = rope(H=2, W=5)
    n_prefix = 3
    qkv = torch.randn(3, n_prefix + 10, 3 * 64, dtype=torch.float32)
    weights = [torch.randn(3, 4, n_prefix + 10, 16) for _ in range(3)]
    grads = []
    for fn in (lambda t: rope_split_qkv(t, 4, _half_tables(sin, cos, n_prefix)),
               lambda t: _reference_split_qkv(t, 4, sin, cos, n_prefix)):
        t = qkv.clone().requires_grad_(True)
        sum((o * w).sum() for o, w in zip(fn(t), weights)).backward()
        grads.append(t.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    # only q and k used (v unused): v's slot of the gradient is zero
    t = qkv.clone().requires_grad_(True)
    q, k, _ = rope_split_qkv(t, 4, _half_tables(sin, cos, n_prefix))
    (q.sum() + k.sum()).backward()
    assert torch.count_nonzero(t.grad.view(3, -1, 3, 64)[:, :, 2]) == 0


def test_fused_rotation_low_precision_inputs_compute_in_table_dtype():
    """bf16 activations are rotated in fp32 and cast back, as DINOv3 does (``q.to(rope dtype)``)."""
    torch.manual_seed(2)
    rope = RopePositionEmbedding(64, num_heads=4).eval()
    sin, cos = rope(H=2, W=2)
    qkv = torch.randn(2, 1 + 4, 3 * 64).to(torch.bfloat16).requires_grad_(True)
    q, k, v = rope_split_qkv(qkv, 4, _half_tables(sin, cos, 1))
    rq, rk, _ = _reference_split_qkv(qkv.detach().float(), 4, sin, cos, 1)
    assert q.dtype == torch.bfloat16 and torch.equal(q, rq.to(torch.bfloat16)) and torch.equal(k, rk.to(torch.bfloat16))
    (q.float().sum() + k.float().square().sum() + v.float().sum()).backward()
    assert qkv.grad.dtype == torch.bfloat16 and torch.isfinite(qkv.grad.float()).all()
    with pytest.raises(ValueError, match="do not fit"):
        rope_split_qkv(qkv, 4, _half_tables(sin, cos, 2))
