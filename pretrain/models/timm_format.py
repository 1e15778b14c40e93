"""timm's DINOv3 weights (``timm.models.eva``, ``vit_*_patch16_dinov3*``) -> the official DINOv3 layout."""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint_files import CheckpointError
from .rope import rope_periods

# timm's DINOv3 models (``timm.models.eva``, ``vit_*_patch16_dinov3*``) build LayerNorm(eps=1e-5) and RoPE with
# temperature 100 in fp32, and do not store either; every released DINOv3 ViT up to H+ has 64-dim heads.
TIMM_DINOV3_HINTS: dict[str, Any] = {"norm_eps": 1e-5, "pos_embed_rope_base": 100.0, "pos_embed_rope_dtype": "fp32"}
TIMM_HEAD_DIM = 64
_TIMM_NON_BACKBONE = ("head.", "fc_norm.", "head_drop.")


def is_timm(sd: Mapping[str, Tensor]) -> bool:
    """timm's names for DINOv3 weights: register tokens and EVA-style LayerScale/bias names."""
    return "reg_token" in sd or "blocks.0.gamma_1" in sd or "blocks.0.attn.q_bias" in sd


def from_timm(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """timm DINOv3 state dict -> (official layout, architecture hints, dropped non-backbone prefixes).

    Inverts timm's ``eva.checkpoint_filter_fn`` for DINOv3: ``reg_token`` -> ``storage_tokens``,
    ``gamma_1/2`` -> ``ls1/ls2.gamma``, ``q_bias``/``v_bias`` -> one ``qkv.bias`` with a zero K part and the
    ``bias_mask`` that keeps it zero, SwiGLU ``fc1_g/fc1_x/fc2`` -> ``w1/w2/w3``. What timm drops is rebuilt:
    ``mask_token`` (zeros, its DINOv3 initial value; only used when pretraining) and ``rope_embed.periods``.
    """
    dim = int(sd["cls_token"].shape[-1])
    heads = max(1, dim // TIMM_HEAD_DIM)
    gated = "blocks.0.mlp.fc1_g.weight" in sd
    out: dict[str, Tensor] = {}
    dropped: set[str] = set()
    for key, value in sd.items():
        if key.startswith(_TIMM_NON_BACKBONE):
            dropped.add(key.split(".")[0])
            continue
        if key.endswith((".q_bias", ".k_bias", ".v_bias")) or key.startswith("rope."):
            continue  # biases merged below; timm's RoPE buffers are recomputed from the base period
        new = key.replace("reg_token", "storage_tokens")
        new = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", new)
        if gated:
            new = re.sub(r"\.mlp\.fc1_g\.", ".mlp.w1.", new)
            new = re.sub(r"\.mlp\.fc1_x\.", ".mlp.w2.", new)
            new = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", new)
        out[new] = value
    qkv_bias = "blocks.0.attn.q_bias" in sd
    for i in sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.attn\.q_bias$", k))}):
        q, v = sd[f"blocks.{i}.attn.q_bias"], sd[f"blocks.{i}.attn.v_bias"]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)])
    out.setdefault("mask_token", torch.zeros(1, dim, dtype=sd["cls_token"].dtype))
    out["rope_embed.periods"] = rope_periods(dim // heads, TIMM_DINOV3_HINTS["pos_embed_rope_base"])
    hints = {**TIMM_DINOV3_HINTS, "num_heads": heads, "qkv_bias": qkv_bias, "mask_k_bias": qkv_bias}
    return out, hints, sorted(dropped)


def timm_folder_weights(path: Path, config: Mapping[str, Any]) -> Path:
    """The weights file of a timm hub folder (``config.json`` with ``architecture``, no ``model_type``)."""
    weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
    if not weights:
        raise CheckpointError(f"{path}: timm folder ({config['architecture']}) without model.safetensors "
                              "or pytorch_model.bin")
    return weights[0]
