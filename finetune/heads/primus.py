"""MedDINOv3 "Primus multi-scale" head (paper §3.1, Table 1) and the Primus last-block baseline.

slice ``[B, 1, H, W]`` -> repeated to 3 channels -> ViT -> ``get_intermediate_layers`` at ``head.block_indices``
(final norm applied, cls/storage tokens dropped) -> concat ``[B, k*D, H/p, W/p]`` -> log2(p) x
[ConvTranspose2d(k2, s2) halving channels, channel LayerNorm(eps 1e-6), GELU] -> 1x1 conv -> ``[B, n_classes, H, W]``.
For ViT-B/16 and blocks [2, 5, 8, 11]: 3072 -> 1536 -> 768 -> 384 -> 192 -> classes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from finetune.heads import HeadRecipe
from finetune.heads.common import ChannelLayerNorm, build_backbone_from_cfg, freeze


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """He-normal (``a = 0.01``) weights and zero bias for (transposed) convolutions: the MedDINOv3 Primus decoder's
    ``InitWeights_He(1e-2)`` (dynamic_network_architectures), instead of PyTorch's default uniform init."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PrimusDecoder(nn.Module):
    """Transposed-conv upsampler: ``[B, C, h, w]`` -> ``[B, n_classes, h*2^n, w*2^n]``."""

    def __init__(self, in_channels: int, n_classes: int, n_upsample: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        stages = []
        channels = in_channels
        for _ in range(n_upsample):
            out = max(channels // 2, 1)
            stages += [nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2), ChannelLayerNorm(out, norm_eps), nn.GELU()]
            channels = out
        self.upsample = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, n_classes, kernel_size=1)
        self.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.upsample(x))


class PrimusSegmenter(nn.Module):
    """ViT encoder + multi-scale token aggregation + Primus decoder for 2-D slices."""

    def __init__(self, backbone: nn.Module, n_classes: int, block_indices: list[int], freeze_encoder: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        n_blocks = int(backbone.n_blocks)
        bad = [i for i in block_indices if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(f"head.block_indices {list(block_indices)} out of range for a backbone with {n_blocks} "
                             "blocks; set head.block_indices in the config (e.g. [0, 1, 2, 3] for depth 4)")
        patch = int(backbone.patch_size)
        if patch & (patch - 1):
            raise ValueError(f"Primus decoder needs a power-of-two patch size, got {patch}")
        self.backbone = backbone
        self.block_indices = [int(i) for i in block_indices]
        self.freeze_encoder = freeze_encoder
        self.in_chans = int(getattr(getattr(backbone, "config", None), "in_chans", 3) or 3)
        self.decoder = PrimusDecoder(backbone.embed_dim * len(self.block_indices), n_classes,
                                     int(math.log2(patch)), norm_eps)
        if freeze_encoder:
            freeze(self.backbone)

    def train(self, mode: bool = True) -> "PrimusSegmenter":
        super().train(mode)
        if self.freeze_encoder:
            self.backbone.eval()
        return self

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, c, H, W]`` (c = 1, or already 3) -> concatenated patch tokens ``[B, k*D, H/p, W/p]``."""
        if image.shape[1] != self.in_chans:
            if image.shape[1] != 1:
                raise ValueError(f"Primus expects 1 or {self.in_chans} input channels, got {image.shape[1]}")
            image = image.expand(-1, self.in_chans, -1, -1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            feats = self.backbone.get_intermediate_layers(image, n=self.block_indices, reshape=True, norm=True)
        return torch.cat(list(feats), dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(image))


def build_model(cfg, n_classes: int) -> PrimusSegmenter:
    """From ``cfg.model`` (backbone) and ``cfg.head`` (block_indices, last_block_only, freeze_encoder, norm_eps)."""
    backbone = build_backbone_from_cfg(cfg)
    if bool(cfg.head.last_block_only):
        blocks = [int(backbone.n_blocks) - 1]
    else:
        blocks = list(cfg.head.block_indices)
    return PrimusSegmenter(backbone, n_classes, blocks, freeze_encoder=bool(cfg.model.freeze_encoder),
                           norm_eps=float(cfg.head.norm_eps))


RECIPE = HeadRecipe(
    name="primus",
    build_model=build_model,
    sampling="slice2d",
    description="MedDINOv3 Primus multi-scale (blocks [2,5,8,11] concatenated; last_block_only=true is Primus)",
)
