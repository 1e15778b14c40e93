"""DINO-Med3D (Hu et al., MICCAI 2026, ``dino-med3d.md``): progressive two-stage adaptation of a 2-D DINOv3.

Stage I (:class:`Med3DStage1Model`): the patch embedding is replaced by an *inter-slice context embedding*
(:class:`InterSliceEmbedding`, K adjacent slices; ``stack25d`` = the public code's 2.5-D stacking into the input
channels, ``conv3d`` = a learned depth-aware 3-D conv patch embedding) and the whole backbone is fine-tuned
through a proxy task: a light MLP head on the last block predicts the centre slice.

Stage II (:class:`Med3DModel`): the stage-I backbone is frozen and LoRA (``finetune.heads.lora``) is injected in
qkv/proj/fc1/fc2. Every slice of a slab is encoded with its K-slice context, blocks [2, 5, 8, 11] are stacked
into volumes and turned into a 4-level pyramid by a 3-D adapter (strides 4, 8, 16, 32 in-plane), a light 3-D
CNN detail stream (HRSE) gives full, 1/2 and 1/4 resolution features, adaptive gated fusion
``F = V + sigmoid(conv1x1x1([V; C])) * C`` injects them, and a 3-D UPerNet decodes. Loss 0.2 CE + 0.8 Dice.
Inference slides slabs along depth (:func:`predict_volume`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from finetune.heads.lora import apply_lora
from finetune.heads.common import freeze
from finetune.heads.readout_utils import crop_to, pad_to_multiple, resolve_layers


# ---------------------------------------------------------------- configuration
@dataclass
class Med3DConfig:
    """Head hyperparameters (``configs/finetune/heads/med3d.yaml``, block ``head``)."""

    context_slices: int = 3
    embedding: str = "conv3d"  # "stack25d" | "conv3d"
    layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    reference_depth: int = 12
    proxy_hidden: int = 256
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    freeze_embedding: bool = True
    pyramid_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 384])
    decoder_channels: int = 192
    detail_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    detail_stream: bool = True
    gate: str = "spatial"  # "spatial" (1-channel attention map) | "channel" (one gate per channel)
    ppm_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    encoder_chunk_size: int = 0

    @classmethod
    def from_cfg(cls, head_cfg: dict, arch: str | None = None) -> "Med3DConfig":
        """From the (plain-dict) ``head`` block, strictly (`finetune.heads.common.head_settings`);
        ``variants[arch]`` (Small/Base/Large) overrides the widths. The stage schedules and inference keys are the
        recipe's (``RECIPE_KEYS``)."""
        from finetune.heads.common import head_settings

        d = dict(head_cfg)
        variants = d.pop("variants", None) or {}
        if arch is not None and arch in variants:
            d.update(dict(variants[arch]))
        return head_settings(cls, d, RECIPE_KEYS)


# keys of the med3d head block read by the recipe, not by the network
RECIPE_KEYS = ("name", "stage1", "stage2", "infer_overlap", "infer_gaussian", "stage1_weights")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with >= 8 channels per group where possible (batch size 1 slabs rule out BatchNorm)."""
    return nn.GroupNorm(max(1, min(32, channels // 8)), channels)


def conv_norm_act(in_ch: int, out_ch: int, kernel: int | tuple = 3) -> nn.Sequential:
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    pad = tuple(s // 2 for s in k)
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, k, padding=pad, bias=False), group_norm(out_ch), nn.GELU())


# ---------------------------------------------------------------- stage I: inter-slice context embedding
class InterSliceEmbedding(nn.Module):
    """Replaces ``backbone.patch_embed.proj``: ``[N, K, H, W]`` K-slice stack -> ``[N, E, H/p, W/p]``.

    ``conv3d``: ``Conv3d(1, E, (K, p, p), stride (1, p, p))`` over the slab (depth-aware: one filter per slice
    offset). ``stack25d``: the K slices are input channels of a 2-D conv (the public code's 2.5-D input; for
    K = 3 it *is* the pretrained patch embedding). Both are initialised from the pretrained RGB filter
    ``W [E, 3, p, p]``: K = 3 stacking copies it, otherwise every slice gets ``sum_c W[:, c] / K`` — so a
    slab of K identical slices is embedded exactly as the pretrained model embeds that slice repeated to RGB.
    """

    def __init__(self, pretrained: nn.Conv2d, context_slices: int, mode: str) -> None:
        super().__init__()
        if mode not in ("stack25d", "conv3d"):
            raise ValueError(f"embedding must be 'stack25d' or 'conv3d', got {mode!r}")
        k = context_slices
        e, c_in, p, _ = pretrained.weight.shape
        self.mode, self.context_slices, self.patch_size = mode, k, p
        w = pretrained.weight.detach()
        per_slice = w.sum(1, keepdim=True) / k  # [E, 1, p, p]
        has_bias = pretrained.bias is not None
        if mode == "stack25d":
            self.proj = nn.Conv2d(k, e, p, stride=p, bias=has_bias)
            self.proj.weight.data.copy_(w if k == c_in else per_slice.expand(-1, k, -1, -1))
        else:
            self.proj = nn.Conv3d(1, e, (k, p, p), stride=(1, p, p), bias=has_bias)
            self.proj.weight.data.copy_(per_slice[:, :, None].expand(-1, -1, k, -1, -1))
        if has_bias:
            self.proj.bias.data.copy_(pretrained.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.context_slices:
            raise ValueError(f"inter-slice embedding expects {self.context_slices} slices, got {tuple(x.shape)}")
        if self.mode == "stack25d":
            return self.proj(x)
        return self.proj(x[:, None]).squeeze(2)


def install_inter_slice_embedding(backbone: nn.Module, context_slices: int, mode: str) -> nn.Module:
    """Swap the backbone's patch-embedding conv for an :class:`InterSliceEmbedding` (in place; returns it)."""
    pe = backbone.patch_embed
    original = pe.proj.proj if isinstance(pe.proj, InterSliceEmbedding) else pe.proj
    pe.proj = InterSliceEmbedding(original, context_slices, mode)
    if hasattr(pe, "in_chans"):
        pe.in_chans = context_slices
    config = getattr(backbone, "config", None)
    if config is not None and hasattr(config, "in_chans"):
        config.in_chans = context_slices  # the ViT checks the channel count of its input
    return backbone


def slab_context_stacks(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, 1, D, H, W]`` -> ``[B * D, K, H, W]``: each slice with its K-slice context, zero-padded at the ends.

    Offsets run from ``-(K // 2)`` to ``K - 1 - K // 2`` (centred for odd K; one more slice below for even K).
    """
    b, _, d, h, w = x.shape
    before, after = k // 2, k - 1 - k // 2
    padded = F.pad(x[:, 0], (0, 0, 0, 0, before, after))  # [B, D + K - 1, H, W]
    stacks = padded.unfold(1, k, 1)  # [B, D, H, W, K]
    return stacks.permute(0, 1, 4, 2, 3).reshape(b * d, k, h, w)


class Med3DStage1Model(nn.Module):
    """Stage I: ICE + the whole (trainable) backbone + light MLP proxy head on the last block.

    ``forward(x [B, K', H, W]) -> logits [B, C, H, W]`` for the centre slice; K' >= K context channels as
    delivered by the 2-D sampler (``data.context_slices = ceil((K - 1) / 2)``), the K used are picked around
    the centre.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: Med3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = install_inter_slice_embedding(backbone, cfg.context_slices, cfg.embedding)
        e = backbone.embed_dim
        self.proxy_head = nn.Sequential(nn.Conv2d(e, cfg.proxy_hidden, 1), nn.GELU(),
                                        nn.Conv2d(cfg.proxy_hidden, num_classes, 1))

    def select_context(self, x: torch.Tensor) -> torch.Tensor:
        k, c = self.cfg.context_slices, x.shape[1]
        if c < k:
            raise ValueError(f"stage I needs {k} context slices per sample, the sampler gave {c}: "
                             f"set data.context_slices >= {(k - 1 + 1) // 2}")
        centre = c // 2
        start = centre - k // 2
        return x[:, start:start + k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.select_context(x)
        x, sizes = pad_to_multiple(x, [self.backbone.patch_size] * 2)
        (feat,) = self.backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)
        logits = self.proxy_head(feat)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return crop_to(logits, sizes)


# ---------------------------------------------------------------- stage II blocks
class VolumetricAdapter(nn.Module):
    """Stacked pseudo-3-D ViT levels ``[B, E, D, h, w]`` -> pyramid at in-plane strides 4, 8, 16, 32.

    Level i: 1x1x1 projection to ``channels[i]``; 3-D transposed convs (kernel = stride = (1, 2, 2)) x2 / x1,
    identity, or (1, 2, 2) max-pool; then a 3x3x3 conv block that mixes neighbouring slices — the step from
    stacked 2-D features to volumetric ones. Depth is kept at full resolution (slabs are only a few slices deep).
    """

    def __init__(self, embed_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the 3-D adapter builds 4 levels, got pyramid_channels={list(channels)}")
        self.levels = nn.ModuleList()
        for i, c in enumerate(channels):
            ops: list[nn.Module] = [nn.Conv3d(embed_dim, c, 1)]
            if i == 0:
                ops += [nn.ConvTranspose3d(c, c, (1, 2, 2), (1, 2, 2)), group_norm(c), nn.GELU(),
                        nn.ConvTranspose3d(c, c, (1, 2, 2), (1, 2, 2))]
            elif i == 1:
                ops += [nn.ConvTranspose3d(c, c, (1, 2, 2), (1, 2, 2))]
            elif i == 3:
                ops += [nn.MaxPool3d((1, 2, 2))]
            ops += [conv_norm_act(c, c)]
            self.levels.append(nn.Sequential(*ops))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [level(f) for level, f in zip(self.levels, feats)]


class ResBlock3d(nn.Module):
    """Two 3x3x3 convs with GroupNorm/GELU and an identity (or 1x1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.shortcut = (nn.Identity() if in_ch == out_ch and stride == (1, 1, 1)
                         else nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.gelu(y + self.shortcut(x))


class DetailRecoveryStream(nn.Module):
    """HRSE: light residual 3-D CNN on the raw slab; features at full, 1/2 and 1/4 in-plane resolution.

    ``[B, 1, D, H, W]`` -> ``[[B, c0, D, H, W], [B, c1, D, H/2, W/2], [B, c2, D, H/4, W/4]]``; only in-plane
    downsampling, so nothing of the through-plane detail is lost.
    """

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.stem = nn.Sequential(conv_norm_act(1, c0), ResBlock3d(c0, c0))
        self.down1 = ResBlock3d(c0, c1, stride=(1, 2, 2))
        self.down2 = ResBlock3d(c1, c2, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f0 = self.stem(x)
        f1 = self.down1(f0)
        return [f0, f1, self.down2(f1)]


class AdaptiveGatedFusion(nn.Module):
    """AGF: ``F = V + sigmoid(conv1x1x1([V; C])) * C`` (C first projected to V's channels by a 1x1x1 conv).

    ``gate="spatial"`` makes the attention a single-channel spatial map (the paper's wording), ``"channel"`` one
    gate per channel.
    """

    def __init__(self, semantic_ch: int, detail_ch: int, gate: str) -> None:
        super().__init__()
        if gate not in ("spatial", "channel"):
            raise ValueError(f"gate must be 'spatial' or 'channel', got {gate!r}")
        self.align = nn.Conv3d(detail_ch, semantic_ch, 1) if detail_ch != semantic_ch else nn.Identity()
        self.gate = nn.Conv3d(2 * semantic_ch, 1 if gate == "spatial" else semantic_ch, 1)

    def forward(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = self.align(c)
        attention = torch.sigmoid(self.gate(torch.cat([v, c], 1)))
        return v + attention * c


class UPerNet3D(nn.Module):
    """3-D UPerNet (Xiao et al. 2018): pyramid pooling on the top level, FPN top-down path, fusion at stride 4.

    Input: 4 levels ``[B, c_i, D, h_i, w_i]`` (finest first); output ``[B, decoder_channels, D, h_0, w_0]``.
    Pooling sizes are capped by the feature size (a 4-slice slab cannot be pooled to 6 slices).
    """

    def __init__(self, in_channels: Sequence[int], channels: int, ppm_scales: Sequence[int]) -> None:
        super().__init__()
        self.ppm_scales = list(ppm_scales)
        top = in_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.Conv3d(top, channels, 1, bias=False), group_norm(channels),
                                               nn.GELU()) for _ in ppm_scales)
        self.bottleneck = conv_norm_act(top + len(ppm_scales) * channels, channels)
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, channels, 1, bias=False), group_norm(channels), nn.GELU())
            for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_norm_act(channels, channels) for _ in in_channels[:-1])
        self.fuse = conv_norm_act(len(in_channels) * channels, channels)

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-3:]
        outs = [x]
        for scale, op in zip(self.ppm_scales, self.ppm):
            pooled = F.adaptive_avg_pool3d(x, tuple(min(scale, s) for s in size))
            outs.append(F.interpolate(op(pooled), size=size, mode="trilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])] + [self.pyramid_pooling(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-3:], mode="trilinear", align_corners=False)
        outs = [fpn(x) for fpn, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-3:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="trilinear", align_corners=False) for o in outs[1:]]
        return self.fuse(torch.cat(outs, 1))


# ---------------------------------------------------------------- stage II model
class Med3DModel(nn.Module):
    """Stage II dual-stream network. ``forward(x [B, 1, D, H, W]) -> logits [B, C, D, H, W]``.

    The backbone (with its stage-I ICE) is frozen; LoRA matrices in ``cfg.lora_targets`` are the only trainable
    backbone parameters. With ``detail_stream=False`` the network is stream 1 only (the paper's ablation row).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: Med3DConfig,
                 install_embedding: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        if install_embedding:
            install_inter_slice_embedding(backbone, cfg.context_slices, cfg.embedding)
        freeze(backbone)
        if not cfg.freeze_embedding:
            for p in backbone.patch_embed.parameters():
                p.requires_grad_(True)
        self.lora_modules = apply_lora(backbone, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        self.backbone = backbone
        self.layers = resolve_layers(cfg.layers, len(backbone.blocks), cfg.reference_depth)
        e = backbone.embed_dim
        self.adapter = VolumetricAdapter(e, cfg.pyramid_channels)
        c_dec = cfg.decoder_channels
        self.decoder = UPerNet3D(cfg.pyramid_channels, c_dec, cfg.ppm_scales)
        if cfg.detail_stream:
            c0, c1, c2 = cfg.detail_channels
            self.detail = DetailRecoveryStream(cfg.detail_channels)
            self.fuse_quarter = AdaptiveGatedFusion(cfg.pyramid_channels[0], c2, cfg.gate)
            self.fuse_half = AdaptiveGatedFusion(c_dec, c1, cfg.gate)
            self.fuse_full = AdaptiveGatedFusion(c_dec, c0, cfg.gate)
        else:
            self.detail = None
        self.refine = conv_norm_act(c_dec, c_dec)
        self.logits = nn.Conv3d(c_dec, num_classes, 1)

    def train(self, mode: bool = True) -> "Med3DModel":
        super().train(mode)
        self.backbone.eval()  # frozen backbone: no drop path; LoRA dropout is not used by default
        return self

    @property
    def size_multiple(self) -> int:
        """In-plane sizes must be multiples of this (patch size x 2 for the stride-32 level)."""
        return 2 * self.backbone.patch_size

    def context_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stream 1 encoder: slab ``[B, 1, D, H, W]`` -> per level ``[B, E, D, H/p, W/p]`` (LoRA active)."""
        b, _, d, _, _ = x.shape
        stacks = slab_context_stacks(x, self.cfg.context_slices)
        chunk = self.cfg.encoder_chunk_size
        pieces = [stacks] if chunk <= 0 else list(torch.split(stacks, chunk))
        outs = [self.backbone.get_intermediate_layers(p, n=self.layers, reshape=True, norm=True) for p in pieces]
        feats = [torch.cat([o[i] for o in outs]) for i in range(len(self.layers))]
        return [f.reshape(b, d, *f.shape[1:]).permute(0, 2, 1, 3, 4) for f in feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        x, sizes = pad_to_multiple(x, [m, m])
        pyramid = self.adapter(self.context_features(x))
        details = self.detail(x) if self.detail is not None else None
        if details is not None:
            pyramid[0] = self.fuse_quarter(pyramid[0], details[2])
        y = self.decoder(pyramid)
        if details is not None:
            y = F.interpolate(y, size=details[1].shape[-3:], mode="trilinear", align_corners=False)
            y = self.fuse_half(y, details[1])
            y = F.interpolate(y, size=details[0].shape[-3:], mode="trilinear", align_corners=False)
            y = self.fuse_full(y, details[0])
        else:
            y = F.interpolate(y, size=x.shape[-3:], mode="trilinear", align_corners=False)
        return crop_to(self.logits(self.refine(y)), sizes)


# ---------------------------------------------------------------- inference
@torch.no_grad()
def predict_volume(model: nn.Module, volume: torch.Tensor, slab_depth: int, patch_size: Sequence[int],
                   overlap: float, gaussian: bool, logits: bool = False) -> torch.Tensor:
    """Sliding-window probabilities ``[C, Z, Y, X]`` (CPU float32; the blended logits with ``logits=True``) for a
    preprocessed volume ``[Z, Y, X]``.

    Windows of ``slab_depth`` slices x ``patch_size`` slide along depth (and in-plane when the slice is larger)
    with ``overlap``; overlapping logits are blended with Gaussian importance weights (MONAI's sliding-window
    inferer), and smaller volumes are padded.
    """
    from monai.inferers import sliding_window_inference

    model.eval()
    roi = (int(slab_depth), *[int(s) for s in patch_size])
    x = volume.float()[None, None]
    out = sliding_window_inference(x, roi_size=roi, sw_batch_size=1, predictor=model, overlap=overlap,
                                   mode="gaussian" if gaussian else "constant", padding_mode="constant")[0].float()
    return (out if logits else out.softmax(0)).cpu()


# ---------------------------------------------------------------- recipe for the common finetune pipeline
STAGE1_WEIGHTS = "stage1_backbone.pt"


def _head_cfg(cfg) -> Med3DConfig:
    from omegaconf import OmegaConf

    return Med3DConfig.from_cfg(OmegaConf.to_container(cfg.head, resolve=True), str(cfg.model.arch))


def build_stage1_model(cfg, n_classes: int) -> Med3DStage1Model:
    """Stage I: backbone from ``cfg.model`` (``--checkpoint``) with ICE + proxy MLP head, all trainable."""
    from finetune.heads.common import build_backbone_from_cfg

    return Med3DStage1Model(build_backbone_from_cfg(cfg), n_classes, _head_cfg(cfg))


def build_model(cfg, n_classes: int) -> Med3DModel:
    """Stage II network. When ``head.stage1_weights`` names a file (set by :func:`fit`) and the backbone is not
    being rebuilt for a saved model (``model.init != none``), the stage-I backbone + ICE weights are loaded."""
    from finetune.heads.common import build_backbone_from_cfg

    head = _head_cfg(cfg)
    backbone = install_inter_slice_embedding(build_backbone_from_cfg(cfg), head.context_slices, head.embedding)
    weights = cfg.head.stage1_weights
    if weights and str(cfg.model.init) != "none":
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    return Med3DModel(backbone, n_classes, head, install_embedding=False)


def recipe_predict_volume(model: nn.Module, volume: torch.Tensor, cfg, plans) -> torch.Tensor:
    return predict_volume(getattr(model, "module", model), volume, int(cfg.data.slab_depth),
                          plans.patch_size, float(cfg.head.infer_overlap),
                          bool(cfg.head.infer_gaussian), logits=True)


def stage_configs(cfg, output_dir):
    """(stage I config, stage II config) derived from the merged config: per-stage epochs, batch size, sampler.
    The stage learning rates stay in ``head.stage1`` / ``head.stage2``, read by the stages' parameter groups."""
    from pathlib import Path

    from omegaconf import OmegaConf

    k = int(cfg.head.context_slices)
    s1, s2 = cfg.head.stage1, cfg.head.stage2
    cfg1 = OmegaConf.merge(cfg, {
        "output_dir": str(Path(output_dir) / "stage1"),
        "data": {"context_slices": k // 2, "batch_size": int(s1.batch_size)},
        "train": {"epochs": int(s1.epochs), "iters_per_epoch": int(s1.iters_per_epoch)},
        "model": {"freeze_encoder": False},
    })
    cfg2 = OmegaConf.merge(cfg, {
        "data": {"slab_depth": int(s2.slab_depth), "batch_size": int(s2.batch_size)},
        "train": {"epochs": int(s2.epochs), "iters_per_epoch": int(s2.iters_per_epoch)},
    })
    return cfg1, cfg2


def stage1_param_groups(model: nn.Module, cfg) -> list[dict]:
    """Stage I: backbone + ICE at ``head.stage1.encoder_lr``, proxy head at ``head.stage1.decoder_lr``."""
    from finetune.heads.common import split_param_groups

    s1 = cfg.head.stage1
    return split_param_groups(model, float(s1.encoder_lr), float(s1.decoder_lr), float(cfg.optim.weight_decay))


def stage2_param_groups(model: nn.Module, cfg) -> list[dict]:
    """Stage II: one lr (``head.stage2.lr``) for LoRA (under ``model.backbone``), adapter, detail stream, decoder."""
    from finetune.heads.common import split_param_groups

    lr = float(cfg.head.stage2.lr)
    return split_param_groups(model, lr, lr, float(cfg.optim.weight_decay))


class BestStage1Backbone:
    """Keeps the stage-I backbone (with its ICE) of the epoch with the best validation mean pseudo-Dice in
    ``<stage1 dir>/stage1_backbone.pt`` (+ ``.json`` with its score): DINO-Med3D's public code starts stage II from
    ``stage1_best.pth``, not from the last epoch. The score file makes a resumed stage I keep an earlier best."""

    def __init__(self, path) -> None:
        from pathlib import Path

        self.path = Path(path)
        self.score_path = self.path.with_suffix(".json")
        self.best = json.loads(self.score_path.read_text())["mean_pseudo_dice"] if self.score_path.exists() \
            and self.path.exists() else -math.inf

    def __call__(self, record: dict, model: nn.Module) -> None:
        from meddino_common.atomic import atomic_write, atomic_write_json

        score = float(record["mean_pseudo_dice"])
        if not math.isfinite(score) or score <= self.best:
            return
        self.best = score
        state = {k: v.detach().cpu() for k, v in getattr(model, "module", model).backbone.state_dict().items()}
        atomic_write(self.path, lambda f: torch.save(state, f))
        atomic_write_json(self.score_path, {"mean_pseudo_dice": score, "epoch": int(record["epoch"])}, indent=None)


def fit(cfg, recipe, train_cases, val_cases, output_dir, plans):
    """Stage I (ICE + proxy task, whole backbone trainable) then stage II (frozen + LoRA dual-stream network).

    Stage II starts from the stage-I epoch with the best validation pseudo-Dice (`BestStage1Backbone`,
    ``<output_dir>/stage1/stage1_backbone.pt``), as the public code's ``stage1_best.pth``; if no epoch gave a finite
    pseudo-Dice the last stage-I backbone is used. ``head.stage1.enabled=false`` skips stage I (the paper's ablation).
    """
    from pathlib import Path

    from omegaconf import OmegaConf

    from finetune.heads import HeadRecipe
    from finetune.train import fit as common_fit

    cfg1, cfg2 = stage_configs(cfg, output_dir)
    if bool(cfg.head.stage1.enabled):
        stage1_recipe = HeadRecipe(name="med3d_stage1", build_model=build_stage1_model, sampling="slice2d",
                                   param_groups=stage1_param_groups)
        stage1_dir = Path(cfg1.output_dir)
        weights = stage1_dir / STAGE1_WEIGHTS
        stage1_dir.mkdir(parents=True, exist_ok=True)
        best = BestStage1Backbone(weights)
        stage1 = common_fit(cfg1, stage1_recipe, train_cases, val_cases, stage1_dir, plans, on_epoch_end=best)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not weights.exists() and (not distributed or torch.distributed.get_rank() == 0):
            best({"mean_pseudo_dice": 0.0, "epoch": -1}, stage1)    # no finite pseudo-Dice: the last epoch
        if distributed:
            torch.distributed.barrier()
        cfg2 = OmegaConf.merge(cfg2, {"head": {"stage1_weights": str(weights)}})
    stage2_recipe = HeadRecipe(name="med3d", build_model=build_model, sampling="slab3d",
                               param_groups=stage2_param_groups, predict_volume=recipe_predict_volume)
    return common_fit(cfg2, stage2_recipe, train_cases, val_cases, output_dir, plans)


def _recipe():
    from finetune.heads import HeadRecipe

    return HeadRecipe(name="med3d", build_model=build_model, sampling="slab3d", param_groups=stage2_param_groups,
                      predict_volume=recipe_predict_volume, fit=fit,
                      description="DINO-Med3D: ICE + proxy task (stage I), frozen+LoRA dual-stream 3-D "
                                  "network (stage II)")


RECIPE = _recipe()
