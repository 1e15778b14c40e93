"""DINO-Med3D (``finetune.heads.med3d``) and LoRA (``finetune.heads.lora``).

Real data: CT slabs around the spleen of the MSD case; the two-stage recipe trains end to end through
``finetune/run.py`` with a tiny backbone.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from finetune.heads.lora import LoRALinear, apply_lora, lora_parameters, merge_lora
from finetune.heads.med3d import (
    AdaptiveGatedFusion, InterSliceEmbedding, Med3DConfig, Med3DModel, Med3DStage1Model, UPerNet3D,
    install_inter_slice_embedding, predict_volume, slab_context_stacks,
)
from finetune.losses import dice_ce_loss
from pretrain.models import build_backbone

TINY = ["model.arch=vitt16", "model.init=random",
        "model.backbone_overrides={embed_dim: 64, depth: 4, num_heads: 4, n_storage_tokens: 4}"]
FAST = ["train.epochs=1", "train.val_iters=1", "train.progress=false", "train.precision=fp32", "infer.precision=fp32",
        "data.num_workers=0", "augment.enabled=false"]
TINY_HEAD = ["head.proxy_hidden=16", "head.pyramid_channels=[8,16,16,32]", "head.decoder_channels=16",
             "head.detail_channels=[4,8,8]", "head.ppm_scales=[1,2]", "head.lora_rank=4", "head.lora_alpha=4"]


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vitt16", embed_dim=64, depth=4, num_heads=4)


def tiny_cfg(**kw) -> Med3DConfig:
    base = dict(proxy_hidden=16, pyramid_channels=[8, 16, 16, 32], decoder_channels=16, detail_channels=[4, 8, 8],
                ppm_scales=[1, 2], lora_rank=4, lora_alpha=4.0)
    return Med3DConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def spleen_slab(real_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4 x 64 x 64 slab through the spleen of the real MSD case: ``[1, 1, 4, 64, 64]``, label ``[1, 4, 64, 64]``."""
    folder = real_data / "ivadomed_msd_spleen"
    ct = nib.load(str(folder / "sub-spleen2_ct.nii.gz")).get_fdata().transpose(2, 1, 0)
    seg = nib.load(str(folder / "sub-spleen2_ct_seg-manual.nii.gz")).get_fdata().transpose(2, 1, 0)
    z, y, x = np.argwhere(seg > 0).mean(0).astype(int)
    sl = (slice(z - 2, z + 2), slice(y - 32, y + 32), slice(x - 32, x + 32))
    img = np.clip(ct[sl], -160, 240)
    img = (img - img.mean()) / img.std()
    return (torch.from_numpy(img.astype(np.float32))[None, None],
            torch.from_numpy((seg[sl] > 0).astype(np.int64))[None])


# ---------------------------------------------------------------- LoRA
def test_lora_starts_at_identity_trains_only_low_rank_and_merges() -> None:
    bb = tiny_backbone()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = bb.get_intermediate_layers(x, n=1)[0]
    wrapped = apply_lora(bb, ["qkv", "proj", "fc1", "fc2"], rank=16, alpha=16)
    assert len(wrapped) == 4 * 4 and "patch_embed.proj" not in wrapped
    assert all(isinstance(dict(bb.named_modules())[n], LoRALinear) for n in wrapped)
    with torch.no_grad():
        assert torch.allclose(bb.get_intermediate_layers(x, n=1)[0], ref, atol=1e-6)  # B = 0 at init
        for p in lora_parameters(bb):
            if p.shape[1] == 16:  # B matrices: make the update non-zero
                p.normal_(std=0.05)
        adapted = bb.get_intermediate_layers(x, n=1)[0]
        assert not torch.allclose(adapted, ref)
        merge_lora(bb)
        assert not any(isinstance(m, LoRALinear) for m in bb.modules())
        assert torch.allclose(bb.get_intermediate_layers(x, n=1)[0], adapted, atol=1e-5)
    with pytest.raises(ValueError, match="matched no"):
        apply_lora(tiny_backbone(), ["q_proj"], rank=4, alpha=4)


def test_lora_keeps_dinov3_masked_k_bias() -> None:
    bb = tiny_backbone()
    qkv = bb.blocks[0].attn.qkv
    assert hasattr(qkv, "bias_mask")
    apply_lora(bb, ["qkv"], rank=4, alpha=4)
    wrapped = bb.blocks[0].attn.qkv
    x = torch.randn(1, 5, 64)
    assert torch.equal(wrapped(x), qkv(x))
    assert "blocks.0.attn.qkv.base.bias_mask" in bb.state_dict()


# ---------------------------------------------------------------- stage I: inter-slice context embedding
@pytest.mark.parametrize("k", [1, 3, 5])
def test_ice_init_reproduces_the_pretrained_embedding_on_repeated_slices(spleen_slab, k: int) -> None:
    bb = tiny_backbone()
    original = bb.patch_embed.proj
    slice_ = spleen_slab[0][:, 0, :, :, :].reshape(4, 1, 64, 64)[:1]  # [1, 1, H, W]
    ref = original(slice_.expand(-1, 3, -1, -1))
    stack = slice_.expand(-1, k, -1, -1)
    for mode in ("conv3d", "stack25d"):
        ice = InterSliceEmbedding(original, k, mode)
        assert torch.allclose(ice(stack), ref, atol=1e-5), mode
    # K = 3 plain stacking IS the pretrained embedding for arbitrary (different) slices
    three = spleen_slab[0][0, :, :3].permute(0, 1, 2, 3)  # [1, 3, H, W]
    assert torch.allclose(InterSliceEmbedding(original, 3, "stack25d")(three), original(three), atol=1e-6)


def test_ice_modes_differ_after_training_and_check_inputs(spleen_slab) -> None:
    bb = tiny_backbone()
    conv3d = InterSliceEmbedding(bb.patch_embed.proj, 3, "conv3d")
    assert conv3d.proj.weight.shape == (64, 1, 3, 16, 16)
    with pytest.raises(ValueError, match="expects 3 slices"):
        conv3d(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="stack25d"):
        InterSliceEmbedding(bb.patch_embed.proj, 3, "mean")


def test_slab_context_stacks_zero_pad_at_the_ends() -> None:
    x = torch.arange(1, 5, dtype=torch.float32).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    stacks = slab_context_stacks(x, 3)  # [4, 3, 2, 2]
    assert stacks[:, :, 0, 0].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0]]
    assert slab_context_stacks(x, 2)[:, :, 0, 0].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]


def test_stage1_trains_the_whole_backbone(spleen_slab) -> None:
    image, label = spleen_slab
    model = Med3DStage1Model(tiny_backbone(), 2, tiny_cfg())
    x = image[0, 0, :3][None]  # [1, 3, 64, 64]: context stack of the centre slice
    logits = model(torch.cat([x[:, :1], x, x[:, -1:]], 1))  # 5 context channels: the centre 3 are used
    assert logits.shape == (1, 2, 64, 64)
    dice_ce_loss(logits, label[:, 1]).backward()
    assert model.backbone.patch_embed.proj.proj.weight.grad is not None
    assert all(p.grad is not None for p in model.backbone.blocks[-1].parameters())


# ---------------------------------------------------------------- stage II
def test_agf_formula() -> None:
    torch.manual_seed(0)
    agf = AdaptiveGatedFusion(4, 4, "spatial")
    v, c = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    gate = torch.sigmoid(agf.gate(torch.cat([v, c], 1)))
    assert gate.shape[1] == 1
    assert torch.allclose(agf(v, c), v + gate * c)
    assert AdaptiveGatedFusion(4, 8, "channel").gate.out_channels == 4


def test_upernet_shapes() -> None:
    feats = [torch.randn(1, c, 4, s, s) for c, s in zip([8, 16, 16, 32], [16, 8, 4, 2])]
    assert UPerNet3D([8, 16, 16, 32], 16, [1, 2, 3, 6])(feats).shape == (1, 16, 4, 16, 16)


def test_stage2_frozen_backbone_lora_and_heads_train(spleen_slab) -> None:
    image, label = spleen_slab
    bb = install_inter_slice_embedding(tiny_backbone(), 3, "conv3d")
    model = Med3DModel(bb, 2, tiny_cfg(), install_embedding=False)
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    lora_before = [p.detach().clone() for p in lora_parameters(model.backbone)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.backbone.named_parameters() if p.requires_grad} == {
        n for n, _ in model.backbone.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    assert not model.backbone.training
    x = image[..., :60, :56]  # not a multiple of 32: padded inside, cropped back
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        assert logits.shape == (1, 2, 4, 60, 56)
        dice_ce_loss(logits, label[..., :60, :56]).backward()
        assert all(p.grad is None for n, p in model.backbone.named_parameters() if "lora_" not in n)
        opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_parameters(model.backbone)))


def test_ablation_switches_change_the_computation(spleen_slab) -> None:
    image, _ = spleen_slab
    outputs = {}
    for name, kw in {"full": {}, "no_detail": {"detail_stream": False}, "stack25d": {"embedding": "stack25d"},
                     "channel_gate": {"gate": "channel"}}.items():
        torch.manual_seed(1)
        model = Med3DModel(tiny_backbone(), 2, tiny_cfg(**kw)).eval()
        with torch.no_grad():
            outputs[name] = model(image)
    assert outputs["full"].shape == outputs["no_detail"].shape
    for name in ("no_detail", "stack25d", "channel_gate"):
        assert not torch.allclose(outputs[name], outputs["full"]), name


def _shipped_head() -> dict:
    from omegaconf import OmegaConf

    from finetune.config import DEFAULT_CONFIGS_DIR

    return OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIGS_DIR / "heads" / "med3d.yaml").head)


def test_variants_follow_the_backbone() -> None:
    head = {**_shipped_head(), "pyramid_channels": [1, 2, 3, 4],
            "variants": {"vitl16": {"pyramid_channels": [128, 256, 512, 1024]}}}
    assert Med3DConfig.from_cfg(head, "vitl16").pyramid_channels == [128, 256, 512, 1024]
    assert Med3DConfig.from_cfg(head, "vitb16").pyramid_channels == [1, 2, 3, 4]
    model = Med3DModel(tiny_backbone(), 2, tiny_cfg())
    assert model.layers == [0, 1, 2, 3]


def test_sliding_window_along_depth(spleen_slab) -> None:
    image, _ = spleen_slab
    model = Med3DModel(tiny_backbone(), 2, tiny_cfg())
    volume = image[0, 0, :, :40, :36]
    probs = predict_volume(model, volume, slab_depth=3, patch_size=[32, 32], overlap=0.5, gaussian=True)
    assert probs.shape == (2, 4, 40, 36)
    assert torch.allclose(probs.sum(0), torch.ones(4, 40, 36), atol=1e-5)


# ---------------------------------------------------------------- end to end through finetune/run.py
@pytest.mark.slow
def test_med3d_two_stages_train_predict_and_evaluate_spleen(spleen_nnunet_dataset, tmp_path: Path) -> None:
    from finetune.run import main

    ds, splits = spleen_nnunet_dataset
    out = tmp_path / "run"
    summary = main(["--task", str(ds), "--head", "med3d", "--output", str(out), *TINY, *FAST, *TINY_HEAD,
                    f"splits_file={splits}", "preprocess.target_slice_px=null", "preprocess.target_spacing_mm=[2.4,2.4]", "data.patch_size=[64,64]",
                    "head.stage1.epochs=1", "head.stage1.iters_per_epoch=2", "head.stage1.batch_size=2",
                    "head.stage2.epochs=1", "head.stage2.iters_per_epoch=2", "head.stage2.slab_depth=4",
                    "head.infer_overlap=0.25"])
    # stage I ran and its backbone initialised stage II
    stage1 = out / "stage1"
    assert (stage1 / "model_final.pt").exists() and (stage1 / "stage1_backbone.pt").exists()
    s1_backbone = torch.load(stage1 / "stage1_backbone.pt", weights_only=True)
    final = torch.load(out / "model_final.pt", weights_only=True)
    key = "blocks.0.mlp.fc1.weight"
    assert torch.equal(final["backbone.blocks.0.mlp.fc1.base.weight"], s1_backbone[key])
    assert final["backbone.patch_embed.proj.proj.weight"].shape[2] == 3  # conv3d ICE over K = 3 slices
    pred = nib.load(str(out / "validation" / "spleen2.nii.gz"))
    ref = nib.load(str(ds / "imagesTr" / "spleen2_0000.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert 0.0 <= summary["per_class"]["spleen"]["dice"] <= 1.0
    assert json.loads((out / "validation" / "summary.json").read_text())["head"] == "med3d"


# ---------------------------------------------------------------- stage hand-over and the public code's recipe
def test_stage2_starts_from_the_best_stage1_epoch(tmp_path: Path) -> None:
    """The backbone of the epoch with the best validation pseudo-Dice is kept (public code: stage1_best.pth), and a
    resumed stage I does not overwrite it with a worse epoch."""
    from finetune.heads.med3d import BestStage1Backbone

    class Net(torch.nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)
            torch.nn.init.constant_(self.backbone.weight, value)

    path = tmp_path / "stage1_backbone.pt"
    best = BestStage1Backbone(path)
    for epoch, (score, value) in enumerate([(0.2, 1.0), (0.5, 2.0), (0.3, 3.0), (float("nan"), 4.0)]):
        best({"epoch": epoch, "mean_pseudo_dice": score}, Net(value))
    assert torch.all(torch.load(path, weights_only=True)["weight"] == 2.0)
    resumed = BestStage1Backbone(path)
    resumed({"epoch": 4, "mean_pseudo_dice": 0.4}, Net(5.0))
    assert resumed.best == 0.5 and torch.all(torch.load(path, weights_only=True)["weight"] == 2.0)


def test_stage_lrs_and_clip_follow_the_public_code(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from finetune.config import load_config
    from finetune.heads.med3d import (RECIPE, build_model, build_stage1_model, stage1_param_groups,
                                      stage2_param_groups, stage_configs)

    (tmp_path / "Dataset1_X").mkdir()
    cfg = load_config(str(tmp_path / "Dataset1_X"), "med3d", [], TINY + TINY_HEAD)
    cfg1, cfg2 = stage_configs(cfg, tmp_path)
    torch.manual_seed(0)
    stage1 = build_stage1_model(cfg1, 2)
    groups1 = {g["name"]: g for g in stage1_param_groups(stage1, cfg1)}
    assert (groups1["encoder"]["lr"], groups1["decoder"]["lr"]) == (1e-5, 1e-5)    # configs/base.py s1_lr
    assert sum(len(g["params"]) for g in groups1.values()) == len(list(stage1.parameters()))   # all trainable
    stage2 = build_model(OmegaConf.merge(cfg2, {"model": {"init": "random"}}), 2)
    groups2 = stage2_param_groups(stage2, cfg2)
    assert {g["lr"] for g in groups2} == {1e-4}                                      # s2_lr: LoRA and the rest
    assert RECIPE.param_groups is stage2_param_groups                                # the saved model is stage II
    assert cfg1.optim.grad_clip == cfg2.optim.grad_clip == 1.0                       # max_grad_norm
    assert cfg1.optim == cfg.optim == cfg2.optim      # the stage lrs stay in head.stage1/2, optim is not rewritten


def test_head_settings_are_strict() -> None:
    from meddino_common.config import ConfigError

    assert Med3DConfig.from_cfg(_shipped_head(), "vitb16").pyramid_channels == [64, 128, 256, 384]
    with pytest.raises(ConfigError, match=r"^head.lora_rnak: not a setting of Med3DConfig"):
        Med3DConfig.from_cfg({**_shipped_head(), "lora_rnak": 4})
