"""Model summary: the ViT-B/16 parameter count of the released DINOv3 model, and fvcore GFLOPs that
agree with the analytic multiply-add count of a ViT."""
from __future__ import annotations

import pytest
import torch

from pretrain.models import build_backbone
from pretrain.models.summary import count_parameters, main, summarize


def test_vitb16_parameter_count_matches_dinov3_release():
    assert count_parameters(build_backbone("vitb16")) == 85_669_632


def test_preset_parameter_counts():
    with torch.device("meta"):  # structure only: no memory, no init cost
        assert count_parameters(build_backbone("vitb16")) == 85_669_632
        # no qkv bias in MedDINOv3's release: 12 blocks x 3*768 biases fewer
        assert count_parameters(build_backbone("meddinov3_vitb16")) == 85_669_632 - 12 * 3 * 768
        assert count_parameters(build_backbone("vitt16")) == 5_492_160


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_gflops_match_analytic_count(hw):
    model = build_backbone("vitb16", embed_dim=64, depth=2, num_heads=4)
    s = summarize(model, hw)
    d, hidden, p = 64, 256, 16
    n_patch = (hw[0] // p) * (hw[1] // p)
    n = 1 + 4 + n_patch
    macs = n_patch * d * 3 * p * p  # patch embedding
    macs += 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden)  # qkv, attention, proj, mlp
    # fvcore also counts LayerNorms (a few FLOPs per element); allow that small excess only
    assert macs / 1e9 <= s.gflops_per_image <= 1.03 * macs / 1e9
    assert s.n_tokens == n and s.parameters == count_parameters(model)


def test_cli_prints_parameters_and_gflops(capsys):
    main(["--arch", "vitt16", "--img", "32", "48"])
    out = capsys.readouterr().out
    assert "parameters    5,492,160" in out and "GFLOPs/image" in out and "32x48 -> 11 tokens" in out
