"""Primus head as the MedDINOv3 network builds it: decoder init, and the backbone without RoPE jitter by default."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from finetune.config import load_config
from finetune.heads import get_recipe


def _cfg(tmp_path: Path, *overrides: str):
    (tmp_path / "Dataset1_X").mkdir(exist_ok=True)
    return load_config(str(tmp_path / "Dataset1_X"), "primus", ["tiny.yaml"], list(overrides))


def test_decoder_is_he_normal_with_zero_bias(tmp_path):
    """InitWeights_He(1e-2) on every (transposed) conv of the decoder, as the MedDINOv3 Primus."""
    torch.manual_seed(0)
    model = get_recipe("primus").build_model(_cfg(tmp_path, "model.backbone_overrides.embed_dim=256"), 3)
    convs = [m for m in model.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 5                                       # 4 upsampling stages (patch 16) + classifier
    gain = math.sqrt(2.0 / (1 + 0.01 ** 2))
    for conv in convs:
        assert torch.count_nonzero(conv.bias) == 0
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(conv.weight)
        assert float(conv.weight.detach().std()) == pytest.approx(gain / math.sqrt(fan_in), rel=0.15)
        assert abs(float(conv.weight.detach().mean())) < 0.2 * gain / math.sqrt(fan_in)


def test_finetune_backbone_has_no_rope_jitter_by_default(tmp_path):
    """The MedDINOv3 network is DINOv3's ``vit_base`` with ``pos_embed_rope_rescale_coords=None``; the pretraining
    preset's 2.0 would rescale RoPE coordinates randomly at every training forward. One key turns it on."""
    cfg = _cfg(tmp_path)
    model = get_recipe("primus").build_model(cfg, 3).train()
    rope = model.backbone.rope_embed
    assert rope.rescale_coords is None and rope.training
    assert all(torch.equal(a, b) for a, b in zip(rope(H=4, W=4), rope(H=4, W=4)))   # same positions every step
    jitter = get_recipe("primus").build_model(OmegaConf.merge(cfg, {"model": {"rope_rescale_coords": 2.0}}), 3).train()
    assert jitter.backbone.rope_embed.rescale_coords == 2.0
    torch.manual_seed(0)
    assert not all(torch.equal(a, b) for a, b in zip(jitter.backbone.rope_embed(H=4, W=4),
                                                       jitter.backbone.rope_embed(H=4, W=4)))
