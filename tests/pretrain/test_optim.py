"""AdamW parameter groups: layer-wise lr decay, patch-embed multiplier, no weight decay on biases/norms/LayerScale/
tokens, prototype layers on their own (frozen-at-first) schedule."""
from __future__ import annotations

import pytest
import torch

from pretrain.models import build_backbone
from pretrain.models.heads import DINOHead
from pretrain.train.config import default_config_dir, load_config
from pretrain.train.optim import apply_schedules, build_optimizer, build_param_groups, param_multipliers

OPTIM = load_config(default_config_dir() / "stage1.yaml").optim  # the shipped optimizer block


def tiny_student() -> torch.nn.ModuleDict:
    backbone = build_backbone("vitt16", embed_dim=64, num_heads=4, depth=3)
    return torch.nn.ModuleDict({
        "backbone": backbone,
        "dino_head": DINOHead(64, out_dim=32, hidden_dim=48, bottleneck_dim=16),
        "ibot_head": DINOHead(64, out_dim=32, hidden_dim=48, bottleneck_dim=16),
    })


@pytest.mark.parametrize(
    "name, lr_mult, wd_mult, last",
    [
        ("backbone.cls_token", 0.9**4, 1.0, False),  # decayed, as DINOv3's groups
        ("backbone.storage_tokens", 0.9**4, 1.0, False),  # decayed, as DINOv3's groups
        ("backbone.mask_token", 0.9**4, 1.0, False),  # decayed, as DINOv3's groups
        ("backbone.patch_embed.proj.weight", 0.9**4 * 0.2, 1.0, False),
        ("backbone.patch_embed.proj.bias", 0.9**4 * 0.2, 0.0, False),
        ("backbone.blocks.0.attn.qkv.weight", 0.9**3, 1.0, False),
        ("backbone.blocks.0.attn.qkv.bias", 0.9**3, 0.0, False),
        ("backbone.blocks.1.norm1.weight", 0.9**2, 0.0, False),
        ("backbone.blocks.2.ls1.gamma", 0.9**1, 0.0, False),
        ("backbone.blocks.2.mlp.fc2.weight", 0.9**1, 1.0, False),
        ("backbone.norm.weight", 1.0, 0.0, False),
        ("dino_head.mlp.0.weight", 1.0, 1.0, False),
        ("dino_head.mlp.0.bias", 1.0, 0.0, False),
        ("ibot_head.last_layer.weight", 1.0, 1.0, True),
    ],
)
def test_multipliers(name: str, lr_mult: float, wd_mult: float, last: bool) -> None:
    m = param_multipliers(name, n_blocks=3, layerwise_decay=0.9, patch_embed_lr_mult=0.2, head_wd_multiplier=1.0)
    assert m["lr_multiplier"] == pytest.approx(lr_mult)
    assert m["wd_multiplier"] == wd_mult
    assert m["is_last_layer"] is last


def test_groups_cover_every_trainable_parameter_once() -> None:
    student = tiny_student()
    groups = build_param_groups(student, n_blocks=3, optim_cfg=OPTIM)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in student.parameters() if p.requires_grad)
    names = {n for g in groups for n in g["names"]}
    assert "backbone.blocks.1.ls2.gamma" in names and "dino_head.last_layer.weight" in names


def test_apply_schedules_scales_lr_and_wd_per_group() -> None:
    student = tiny_student()
    opt = build_optimizer(student, n_blocks=3, optim_cfg=OPTIM)
    apply_schedules(opt, lr=1e-3, wd=0.05, last_layer_lr=0.0)
    for g in opt.param_groups:
        if g["is_last_layer"]:
            assert g["lr"] == 0.0
        else:
            assert g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])
    # a frozen prototype layer does not move, the rest does
    last = student["dino_head"].last_layer.weight.detach().clone()
    first = student["backbone"].blocks[0].mlp.fc1.weight.detach().clone()
    x = torch.randn(2, 3, 32, 32)
    out = student["backbone"].forward_features(x)["x_norm_clstoken"]
    (student["dino_head"](out).sum() + student["ibot_head"](out).sum()).backward()
    opt.step()
    assert torch.equal(student["dino_head"].last_layer.weight, last)
    assert not torch.equal(student["backbone"].blocks[0].mlp.fc1.weight, first)
