"""Frozen 2-D encoder -> 3-D window decoder (``finetune.heads.window3d``).

The load-bearing test: parameter gradients of the two-pass sub-cube scheme equal those of one backward through
a single graph over all cubes (the same function: every cube decoded independently, reassembled, global loss).
Inputs are real CT (the MSD spleen case) so the loss and gradients are those of a realistic case.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from finetune.heads.window3d import (
    Window3DConfig, Window3DModel, cube_slices, predict_volume, single_graph_backward, two_pass_backward,
    two_pass_loss,
)
from finetune.losses import dice_ce_loss
from pretrain.models import build_backbone


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vitt16", embed_dim=64, depth=4, num_heads=4)


def tiny_cfg(**kw) -> Window3DConfig:
    base = dict(layers=[2, 5, 8, 11], reference_depth=12, design_depth=8, proj_channels=[8, 8, 16, 16],
                fusion_channels=8, upsample_factor=4)
    return Window3DConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def spleen_crop(real_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8 x 32 x 32 crop around the spleen of the real MSD case, CT z-scored: ``[1, 1, D, H, W]``, ``[1, D, H, W]``."""
    folder = real_data / "ivadomed_msd_spleen"
    ct = nib.load(str(folder / "sub-spleen2_ct.nii.gz")).get_fdata().transpose(2, 1, 0)
    seg = nib.load(str(folder / "sub-spleen2_ct_seg-manual.nii.gz")).get_fdata().transpose(2, 1, 0)
    z, y, x = (np.argwhere(seg > 0).mean(0)).astype(int)
    sl = (slice(max(z - 4, 0), max(z - 4, 0) + 8), slice(y - 16, y + 16), slice(x - 16, x + 16))
    img = np.clip(ct[sl], -160, 240)
    img = (img - img.mean()) / img.std()
    lab = seg[sl] > 0
    assert lab.any() and (~lab).any()
    return torch.from_numpy(img)[None, None].float(), torch.from_numpy(lab.astype(np.int64))[None]


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return dice_ce_loss(logits, target)


def _grads(model: Window3DModel) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("reuse", [True, False])
def test_two_pass_gradients_equal_single_graph_backward(spleen_crop, reuse: bool) -> None:
    image, label = spleen_crop
    model = Window3DModel(tiny_backbone(), 2, tiny_cfg()).double()
    model.train()
    x = image.double()
    loss_ref, logits_ref = single_graph_backward(model, x, label, loss_fn, [2, 2, 2])
    ref = _grads(model)
    loss_two, logits_two = two_pass_backward(model, x, label, loss_fn, [2, 2, 2], reuse_encoder_features=reuse)
    two = _grads(model)
    assert torch.allclose(loss_ref, loss_two, rtol=0, atol=1e-12)
    assert torch.allclose(logits_ref, logits_two, rtol=0, atol=1e-12)
    assert len(ref) == len(two) == len(list(model.trainable_parameters()))
    for g_ref, g_two in zip(ref, two):
        assert torch.allclose(g_ref, g_two, rtol=1e-9, atol=1e-12)
    # the gradients are not trivially zero, and the frozen encoder receives none
    assert sum(g.abs().sum() for g in ref) > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_two_pass_loss_backward_matches_and_respects_loss_scaling(spleen_crop) -> None:
    """The surrogate loss the common training loop calls ``backward()`` on runs pass 2 with the AMP scale."""
    image, label = spleen_crop
    model = Window3DModel(tiny_backbone(), 2, tiny_cfg()).double()
    x = image.double()
    single_graph_backward(model, x, label, loss_fn, [2, 1, 2])
    ref = _grads(model)
    loss, logits = two_pass_loss(model, x, label, loss_fn, [2, 1, 2])
    assert logits.shape == (1, 2, *x.shape[-3:])
    (1024.0 * loss).backward()
    scaled = _grads(model)
    for g_ref, g in zip(ref, scaled):
        assert torch.allclose(1024.0 * g_ref, g, rtol=1e-9, atol=1e-10)
    with torch.no_grad():  # validation: no pass 2, plain loss
        loss_eval, _ = two_pass_loss(model, x, label, loss_fn, [2, 1, 2])
    assert not loss_eval.requires_grad


def test_single_cube_equals_plain_forward(spleen_crop) -> None:
    image, label = spleen_crop
    model = Window3DModel(tiny_backbone(), 2, tiny_cfg()).double()
    x = image.double()
    loss_fn(model(x), label).backward()
    plain = _grads(model)
    two_pass_backward(model, x, label, loss_fn, [1, 1, 1])
    for a, b in zip(plain, _grads(model)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_frozen_encoder_unchanged_and_decoder_trains(spleen_crop) -> None:
    image, label = spleen_crop
    model = Window3DModel(tiny_backbone(), 2, tiny_cfg())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = [p.detach().clone() for p in model.trainable_parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    assert not model.backbone.training
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss, _ = two_pass_backward(model, image, label, loss_fn, [2, 1, 1])
        assert all(p.grad is None for p in model.backbone.parameters())
        opt.step()
        losses.append(float(loss))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(head_before, model.trainable_parameters()))
    assert losses[-1] < losses[0]


def test_depth_embedding_switch_and_interpolation(spleen_crop) -> None:
    image, _ = spleen_crop
    bb = tiny_backbone()
    with_emb = Window3DModel(bb, 2, tiny_cfg(depth_embedding=True)).eval()
    without = Window3DModel(bb, 2, tiny_cfg(depth_embedding=False)).eval()
    without.decoder.load_state_dict(with_emb.decoder.state_dict())
    assert without.depth_embed is None and with_emb.depth_embed.shape == (4, 64, 8)
    with torch.no_grad():
        assert not torch.allclose(with_emb(image), without(image))
        feats = with_emb.encode(image[:, :, :4])  # depth 4 != design depth 8: interpolated, not an error
        assert with_emb.add_depth_embedding(feats)[0].shape == feats[0].shape
        # zero embedding == switched off
        with_emb.depth_embed.zero_()
        assert torch.allclose(with_emb(image), without(image), atol=1e-6)


def test_cube_slices_tile_without_overlap() -> None:
    cubes = cube_slices((16, 32, 32), (2, 2, 2))
    assert len(cubes) == 8
    cover = np.zeros((16, 32, 32), dtype=int)
    for sl in cubes:
        cover[sl] += 1
    assert (cover == 1).all()
    with pytest.raises(ValueError, match="cannot be split"):
        cube_slices((15, 32, 32), (2, 2, 2))


def test_layers_follow_backbone_depth() -> None:
    model = Window3DModel(tiny_backbone(), 3, tiny_cfg())
    assert model.layers == [0, 1, 2, 3]


def test_predict_volume_covers_a_real_volume_with_sliding_windows(spleen_crop) -> None:
    image, _ = spleen_crop
    model = Window3DModel(tiny_backbone(), 2, tiny_cfg())
    volume = image[0, 0, :3, :20, :18]  # smaller than the window in depth, not a multiple of it in-plane
    probs = predict_volume(model, volume, (4, 16, 16), (2, 1, 1), overlap=0.25, gaussian=True)
    assert probs.shape == (2, 3, 20, 18)
    assert torch.allclose(probs.sum(0), torch.ones(3, 20, 18), atol=1e-5)


@pytest.mark.slow
def test_window3d_trains_predicts_and_evaluates_spleen(spleen_nnunet_dataset, tmp_path: Path) -> None:
    """Two-pass training (8 sub-cubes) inside the common loop, sliding-window prediction, metrics."""
    import json

    from finetune.run import main

    ds, splits = spleen_nnunet_dataset
    out = tmp_path / "run"
    summary = main([
        "--task", str(ds), "--head", "window3d", "--output", str(out),
        "model.arch=vitt16", "model.init=random",
        "model.backbone_overrides={embed_dim: 64, depth: 4, num_heads: 4, n_storage_tokens: 4}",
        "train.epochs=1", "train.iters_per_epoch=2", "train.val_iters=1", "train.progress=false",
        "train.precision=fp32", "data.num_workers=0", f"splits_file={splits}",
        "preprocess.target_slice_px=null", "preprocess.target_spacing_mm=[2.4,2.4]", "data.slab_depth=8", "data.patch_size=[64,64]",
        "head.cubes_per_axis=[2,2,2]", "head.design_depth=8", "head.proj_channels=[8,8,16,16]",
        "head.fusion_channels=8", "head.infer_overlap=0.25"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and np.isfinite(metrics[-1]["train_loss"]) and metrics[-1]["grad_norm"] > 0
    pred = nib.load(str(out / "validation" / "spleen2.nii.gz"))
    ref = nib.load(str(ds / "imagesTr" / "spleen2_0000.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert 0.0 <= summary["per_class"]["spleen"]["dice"] <= 1.0
    assert json.loads((out / "validation" / "summary.json").read_text())["head"] == "window3d"


def test_slice_resize_to_encoder_resolution(spleen_crop) -> None:
    """``slice_size`` (the paper's resize to the native DINOv3 resolution) changes the features, not the output grid."""
    image, _ = spleen_crop
    bb = tiny_backbone()
    native = Window3DModel(bb, 2, tiny_cfg()).eval()
    resized = Window3DModel(bb, 2, tiny_cfg(slice_size=48)).eval()
    resized.load_state_dict(native.state_dict())
    with torch.no_grad():
        assert resized.encode(image)[0].shape[-2:] == (3, 3)
        out = resized(image)
        assert out.shape == native(image).shape == (1, 2, *image.shape[-3:])
        assert not torch.allclose(out, native(image))


def test_slices_resized_to_native_dinov3_resolution_by_default(tmp_path) -> None:
    """The shipped window3d head resizes every slice to 224 px (DINOv3's native resolution), as the paper."""
    from finetune.config import load_config

    (tmp_path / "Dataset1_X").mkdir()
    cfg = load_config(str(tmp_path / "Dataset1_X"), "window3d")
    assert cfg.head.slice_size == 224 and Window3DConfig.from_dict(dict(cfg.head)).slice_size == 224
    with pytest.raises(ValueError, match=r"^head.fusion_channel: not a setting of Window3DConfig"):
        Window3DConfig.from_dict({**cfg.head, "fusion_channel": 8})
