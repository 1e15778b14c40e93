"""What an official-layout state dict says about its architecture (``ViTConfig`` field names)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .checkpoint_files import CheckpointError
from .rope import rope_periods
from .vision_transformer import SWIGLU_ALIGN


def swiglu_shape(hidden: int, dim: int) -> tuple[str, float]:
    """Find (ffn_layer, ffn_ratio) whose SwiGLU hidden width equals ``hidden``."""
    ratios = [1.5 * hidden / dim, 4.0, 6.0, 3.0, 3.777777778, 8 / 3]
    for name, align in SWIGLU_ALIGN.items():
        for ratio in ratios:
            d = int(int(dim * ratio) * 2 / 3)
            if d + (-d % align) == hidden:
                return name, ratio
    raise CheckpointError(f"cannot find a SwiGLU ffn_ratio giving hidden width {hidden} for embed_dim {dim}")


def infer_arch(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture facts visible in an official-layout state dict (``ViTConfig`` field names).

    Inferred: embed_dim, depth, n_storage_tokens, qkv_bias, mask_k_bias, ffn_layer/ffn_ratio, ffn_bias,
    proj_bias, patch_size, in_chans, layerscale presence, num_heads (from the RoPE periods: Dh = 4 *
    len(periods)), RoPE base and dtype. Not inferable: LayerNorm eps, RoPE coordinate settings.
    """
    if "cls_token" not in sd:
        raise CheckpointError("state dict has no 'cls_token'; not a DINOv3 ViT backbone")
    dim = int(sd["cls_token"].shape[-1])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    arch: dict[str, Any] = {"embed_dim": dim, "depth": depth}
    arch["n_storage_tokens"] = int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0
    if "patch_embed.proj.weight" in sd:
        w = sd["patch_embed.proj.weight"]
        arch["patch_size"], arch["in_chans"] = int(w.shape[-1]), int(w.shape[1])
    arch["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    if arch["qkv_bias"]:
        arch["mask_k_bias"] = "blocks.0.attn.qkv.bias_mask" in sd
    arch["proj_bias"] = "blocks.0.attn.proj.bias" in sd
    if "blocks.0.mlp.fc1.weight" in sd:
        arch["ffn_layer"], arch["ffn_ratio"] = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
        arch["ffn_bias"] = "blocks.0.mlp.fc1.bias" in sd
    elif "blocks.0.mlp.w1.weight" in sd:
        arch["ffn_layer"], arch["ffn_ratio"] = swiglu_shape(int(sd["blocks.0.mlp.w1.weight"].shape[0]), dim)
        arch["ffn_bias"] = "blocks.0.mlp.w1.bias" in sd
    if depth and "blocks.0.ls1.gamma" not in sd:
        arch["layerscale_init"] = None
    periods = sd.get("rope_embed.periods")
    if periods is not None and periods.numel() > 0:
        head_dim = 4 * periods.numel()
        if dim % head_dim == 0:
            arch["num_heads"] = dim // head_dim
        arch["pos_embed_rope_dtype"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(periods.dtype, "fp32")
        if periods.numel() > 1:
            base = float(periods[-1].double() ** (head_dim / (4 * (periods.numel() - 1))))
            base = round(base) if abs(base - round(base)) < 1e-3 * max(1.0, base) else base
            if torch.allclose(rope_periods(head_dim, base).to(periods.dtype).float(), periods.float(), rtol=1e-2):
                arch["pos_embed_rope_base"] = float(base)
    return arch
