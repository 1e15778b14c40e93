"""Loss vs MONAI, lr schedule, sampler (foreground oversampling, determinism, slab shapes), augmentation, Primus head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from finetune.config import load_config
from finetune.data import PatchSampler, PreprocessedCase
from finetune.losses import dice_ce_loss
from finetune.train import lr_factor


def test_dice_ce_matches_monai():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, 16)
    target = torch.randint(0, 4, (3, 16, 16))
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                     smooth_dr=1e-5)(logits, target[:, None])
    assert dice_ce_loss(logits, target) == pytest.approx(float(ref), abs=1e-5)
    logits3d, target3d = torch.randn(2, 3, 4, 8, 8), torch.randint(0, 3, (2, 4, 8, 8))
    ref3d = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5,
                       smooth_dr=1e-5)(logits3d, target3d[:, None])
    assert dice_ce_loss(logits3d, target3d) == pytest.approx(float(ref3d), abs=1e-5)


def test_linear_decay_to_zero():
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == 0.5
    assert lr_factor(99, 100) == pytest.approx(0.01)
    assert lr_factor(0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_factor(10, 100, warmup=10) == 1.0


def _cfg(tmp_path, **over):
    (tmp_path / "Dataset1_X").mkdir(exist_ok=True)
    cfg = load_config(str(tmp_path / "Dataset1_X"), "primus", ["tiny.yaml"], [f"{k}={v}" for k, v in over.items()])
    return cfg


def _case(rng):
    image = rng.normal(size=(12, 80, 70)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[5, 40:44, 30:33] = 1                               # a tiny structure on one slice
    return PreprocessedCase("c0", image, label, {1: np.argwhere(label == 1).astype(np.int32)}, {})


def test_sampler_oversamples_foreground_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    case = _case(rng)
    cfg = _cfg(tmp_path, **{"data.oversample_foreground": 1.0, "data.batch_size": 6})
    sampler = PatchSampler([case], cfg, "slice2d", cfg.data.patch_size, seed=3)
    batch = sampler.batch(7)
    assert batch["image"].shape == (6, 1, 64, 64) and batch["label"].shape == (6, 64, 64)
    assert all((batch["label"][i] == 1).any() for i in range(6))   # spatial aug may not lose a centred structure
    again = sampler.batch(7)
    assert torch.equal(batch["image"], again["image"]) and torch.equal(batch["label"], again["label"])
    assert not torch.equal(sampler.batch(8)["image"], batch["image"])
    cfg0 = _cfg(tmp_path, **{"data.oversample_foreground": 0.0, "data.batch_size": 20})
    hits = sum(int((PatchSampler([case], cfg0, "slice2d", cfg0.data.patch_size, 0).batch(i)["label"] == 1).any()) for i in range(3))
    assert hits < 20 * 3 // 4                                  # random slices rarely contain the structure


def test_forced_foreground_window_is_nnunet_get_bbox():
    """nnU-Net's get_bbox: a forced window is centred on the voxel and only clamped from below, so a structure at
    the far edge stays at the patch centre (the window sticks out, zero-padded)."""
    from finetune.data import _window_start

    rng = np.random.default_rng(0)
    assert _window_start(rng, 100, 64, 95) == 95 - 32                 # beyond ub = 36: not pulled back
    assert _window_start(rng, 100, 64, 3) == 0                        # clamped to lb = 0 at the near edge
    assert _window_start(rng, 40, 64, 39) == 7 and _window_start(rng, 40, 64, 1) == -12   # lb = -12 (need 24)
    assert all(-12 <= _window_start(rng, 40, 64, None) <= 0 for _ in range(50))           # random: [lb, ub]


def test_slab_and_context_shapes(tmp_path):
    case = _case(np.random.default_rng(1))
    cfg = _cfg(tmp_path, **{"data.slab_depth": 4, "data.context_slices": 1})
    slab = PatchSampler([case], cfg, "slab3d", cfg.data.patch_size, 0).batch(0)
    assert slab["image"].shape == (2, 1, 4, 64, 64) and slab["label"].shape == (2, 4, 64, 64)
    ctx = PatchSampler([case], cfg, "slice2d", cfg.data.patch_size, 0).batch(0)
    assert ctx["image"].shape == (2, 3, 64, 64) and ctx["label"].shape == (2, 64, 64)


def test_disabled_augmentation_is_an_exact_crop(tmp_path):
    from finetune.augment import augment_sample, rotate_scale_window

    image = torch.arange(40 * 50, dtype=torch.float32).view(1, 40, 50)
    label = (image > 1000).to(torch.uint8)
    acfg = OmegaConf.create({"enabled": False})
    img, lab = augment_sample(image, label, (5, 7), (16, 16), np.random.default_rng(0), acfg)
    assert torch.equal(img, image[:, 5:21, 7:23]) and torch.equal(lab, label[:, 5:21, 7:23])
    # identity rotation/scale through grid_sample reproduces the crop (bilinear interpolation at the nodes)
    img2, lab2 = rotate_scale_window(image, label, (5, 7), (16, 16), 0.0, 1.0)
    torch.testing.assert_close(img2, image[:, 5:21, 7:23], atol=1e-2, rtol=0)
    assert torch.equal(lab2, label[:, 5:21, 7:23])
    # 90 degrees about the window centre (19.5, 19.5): output[r, c] = input[39 - c, r]
    img3, _ = rotate_scale_window(image, label, (0, 0), (40, 40), np.pi / 2, 1.0)
    torch.testing.assert_close(img3[0, 20], image[0, :40, 20].flip(0), atol=1e-2, rtol=0)
    # scale 2 about the centre (14, 14) of a 9x9 window: output[r, c] = input[2r + 6, 2c + 6]
    img4, _ = rotate_scale_window(image, label, (10, 10), (9, 9), 0.0, 2.0)
    torch.testing.assert_close(img4[0], image[0, 6:23:2, 6:23:2], atol=1e-2, rtol=0)


def test_primus_multiscale_shapes_and_options(tmp_path):
    from finetune.heads import get_recipe

    cfg = _cfg(tmp_path)
    model = get_recipe("primus").build_model(cfg, 3)
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 3, 64, 64)
    assert model.decoder.upsample[0].in_channels == 4 * 64    # 4 blocks concatenated
    chans = [m.out_channels for m in model.decoder.upsample if isinstance(m, torch.nn.ConvTranspose2d)]
    assert chans == [128, 64, 32, 16]                          # 4 stages halving channels (patch 16)
    last = get_recipe("primus").build_model(OmegaConf.merge(cfg, {"head": {"last_block_only": True}}), 3)
    assert last.block_indices == [3] and last.decoder.upsample[0].in_channels == 64
    frozen = get_recipe("primus").build_model(OmegaConf.merge(cfg, {"model": {"freeze_encoder": True}}), 3)
    frozen.train()
    assert not frozen.backbone.training and all(not p.requires_grad for p in frozen.backbone.parameters())
    frozen(x).sum().backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    assert frozen.decoder.classifier.weight.grad is not None
    with pytest.raises(ValueError, match="block_indices"):
        get_recipe("primus").build_model(OmegaConf.merge(cfg, {"head": {"block_indices": [2, 5, 8, 11]}}), 3)


def test_channel_layernorm_normalises_over_channels():
    from finetune.heads.common import ChannelLayerNorm

    norm = ChannelLayerNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 6)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    ref = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)


def test_pseudo_dice_counts_stay_on_the_logits_device():
    """The per-iteration pseudo-Dice is counted where the logits are (no host copy of ``[B, K, 896, 896]``): on the
    meta device nothing can be copied to the host, yet the counts come back, and on CPU they are the exact counts."""
    from finetune.losses import pseudo_dice_stats

    meta = pseudo_dice_stats(torch.empty(12, 16, 896, 896, device="meta"), torch.empty(12, 896, 896, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (3, 15)
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    pred = logits.argmax(1)
    expected = [[int(((pred == c) & (target == c)).sum()) for c in (1, 2)],
                [int(((pred == c) & (target != c)).sum()) for c in (1, 2)],
                [int(((pred != c) & (target == c)).sum()) for c in (1, 2)]]
    assert pseudo_dice_stats(logits, target).tolist() == expected
