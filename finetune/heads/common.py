"""Pieces every head needs: the backbone from the config, encoder/decoder parameter groups, channel LayerNorm."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn


def _backbone_overrides(cfg) -> dict:
    """Constructor overrides for `pretrain.models.build_backbone` from ``cfg.model`` (drop path, LayerScale, ...)."""
    raw = cfg.model.get("backbone_overrides")
    overrides = dict(OmegaConf.to_container(raw, resolve=True)) if raw else {}
    overrides.setdefault("drop_path_rate", float(cfg.model.drop_path_rate))
    overrides.setdefault("layerscale_init", float(cfg.model.layerscale_init))
    rescale = cfg.model.rope_rescale_coords
    overrides.setdefault("pos_embed_rope_rescale_coords", None if rescale is None else float(rescale))
    return overrides


def build_backbone_from_cfg(cfg) -> nn.Module:
    """The ViT encoder described by ``cfg.model``, in train mode.

    ``model.init``: ``pretrained`` loads ``model.checkpoint`` (official DINOv3 .pth, MedDINOv3 release, our
    pretraining output; anything `pretrain.models.load_backbone` reads), ``random`` builds fresh weights
    (the paper's "randinit." row), ``none`` builds the architecture only because a full finetuned state
    dict is loaded right after (prediction).
    """
    from pretrain.models import build_backbone, load_backbone

    init = str(cfg.model.init)
    overrides = _backbone_overrides(cfg)
    if init == "pretrained":
        checkpoint = cfg.model.get("checkpoint")
        if not checkpoint:
            raise ValueError("model.init=pretrained needs a backbone checkpoint: pass --checkpoint PATH "
                             "(or model.init=random for a randomly initialised encoder)")
        if not Path(str(checkpoint)).exists():
            raise FileNotFoundError(f"backbone checkpoint not found: {checkpoint}")
        backbone = load_backbone(str(checkpoint), arch=cfg.model.arch, **overrides)
    elif init in ("random", "none"):
        backbone = build_backbone(cfg.model.arch, **overrides)
    else:
        raise ValueError(f"model.init must be pretrained|random|none, got {init!r}")
    backbone.train()
    return backbone


def encoder_lr(cfg) -> float:
    """Encoder lr: ``optim.encoder_lr`` if set, else by weight origin (``optim.encoder_lr_by_weights``)."""
    if cfg.optim.get("encoder_lr") is not None:
        return float(cfg.optim.encoder_lr)
    weights = "random" if str(cfg.model.init) == "random" else str(cfg.model.weights)
    table = cfg.optim.encoder_lr_by_weights
    if weights not in table:
        raise ValueError(f"model.weights={weights!r} has no entry in optim.encoder_lr_by_weights {list(table)}")
    return float(table[weights])


def encoder_decoder_param_groups(model: nn.Module, cfg) -> list[dict]:
    """AdamW groups: ``model.backbone`` at the encoder lr, the rest at ``optim.decoder_lr``; frozen params dropped.

    Each group carries ``base_lr`` so the schedule can scale every group by the same factor.
    """
    backbone = getattr(model, "backbone", None)
    encoder_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    weight_decay = float(cfg.optim.weight_decay)
    groups = []
    if encoder:
        lr = encoder_lr(cfg)
        groups.append({"name": "encoder", "params": encoder, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
    if decoder:
        lr = float(cfg.optim.decoder_lr)
        groups.append({"name": "decoder", "params": decoder, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, *spatial]`` maps (as ConvNeXt/Primus "LayerNorm2d")."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last view + fused layer_norm: same numbers as mean/var over dim 1, ~2x faster on CPU
        y = torch.nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


def freeze(module: nn.Module) -> None:
    """Stop gradients into ``module`` (its ``train()`` state is managed by the owner)."""
    for p in module.parameters():
        p.requires_grad_(False)
