"""The transformers ``dinov3_vit`` format, both ways: our model -> a folder ``AutoModel.from_pretrained`` reads
(``config.json`` + ``model.safetensors``, q/k/v split), and such a folder -> the official DINOv3 layout."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meddino_common.atomic import atomic_write_json, atomic_write_to_path

from .arch_inference import swiglu_shape
from .checkpoint_files import BackboneCheckpoint, CheckpointError, read_json, read_safetensors, torch_load, unwrap
from .rope import rope_periods
from .vision_transformer import DinoVisionTransformer

logger = logging.getLogger(__name__)

_HF_MODEL_TYPES = ("dinov3_vit", "DINOv3ViT")


def hf_prefix(sd: Mapping[str, Tensor]) -> str | None:
    """The key prefix before ``embeddings.cls_token`` (``""`` or ``"model."``...), None when not HF names."""
    for key in sd:
        if key.endswith("embeddings.cls_token"):
            return key[: -len("embeddings.cls_token")]
    return None


def _hf_key(key: str) -> str:
    """Official key -> transformers ``dinov3_vit`` key (q/k/v handled separately)."""
    fixed = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "storage_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
    }
    if key in fixed:
        return fixed[key]
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if not m:
        return key  # norm.weight / norm.bias
    i, rest = m.groups()
    rest = {
        "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1.weight": "mlp.up_proj.weight", "mlp.fc1.bias": "mlp.up_proj.bias",
        "mlp.fc2.weight": "mlp.down_proj.weight", "mlp.fc2.bias": "mlp.down_proj.bias",
        "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w1.bias": "mlp.gate_proj.bias",
        "mlp.w2.weight": "mlp.up_proj.weight", "mlp.w2.bias": "mlp.up_proj.bias",
        "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias",
    }.get(rest, rest)
    return f"layer.{i}.{rest}"


def to_hf(model: DinoVisionTransformer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our model -> (transformers ``DINOv3ViTModel`` state dict, ``config.json`` dict).

    Raises for settings transformers cannot express (non-"separate" coordinates, min/max periods).
    A K bias that is masked is dropped (HF has ``key_bias=False``); an unmasked one is kept.
    """
    cfg = model.config
    if cfg.pos_embed_rope_normalize_coords != "separate" or cfg.pos_embed_rope_base is None:
        raise ValueError("transformers dinov3_vit supports only RoPE base periods with 'separate' coordinates")
    if cfg.pos_embed_rope_dtype != "fp32":
        logger.warning("transformers computes RoPE in fp32; this model uses %s RoPE", cfg.pos_embed_rope_dtype)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dim = cfg.embed_dim
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith("qkv.bias_mask") or key == "rope_embed.periods":
            continue
        if ".attn.qkv." in key:
            base, kind = key.split(".attn.qkv.")
            i = base.split(".")[1]
            q, k, v = value.split(dim, dim=0)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                if kind == "bias" and name == "k_proj" and cfg.mask_k_bias:
                    continue
                out[f"layer.{i}.attention.{name}.{kind}"] = t.contiguous().clone()
            continue
        new = _hf_key(key)
        out[new] = value.reshape(1, 1, dim).clone() if key == "mask_token" else value.contiguous().clone()
    if not cfg.layerscale_init:
        for i in range(cfg.depth):
            out[f"layer.{i}.layer_scale1.lambda1"] = torch.ones(dim)
            out[f"layer.{i}.layer_scale2.lambda1"] = torch.ones(dim)
    if cfg.n_storage_tokens == 0:
        out["embeddings.register_tokens"] = torch.zeros(1, 0, dim)
    gated = cfg.ffn_layer != "mlp"
    hidden = model.blocks[0].mlp.w1.out_features if gated else model.blocks[0].mlp.fc1.out_features
    config = {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": dim,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "hidden_act": "silu" if gated else "gelu",
        "use_gated_mlp": gated,
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.pos_embed_rope_base,
        "image_size": 224,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "query_bias": cfg.qkv_bias,
        "key_bias": cfg.qkv_bias and not cfg.mask_k_bias,
        "value_bias": cfg.qkv_bias,
        "proj_bias": cfg.proj_bias,
        "mlp_bias": cfg.ffn_bias,
        "layerscale_value": cfg.layerscale_init or 1.0,
        "drop_path_rate": cfg.drop_path_rate,
        "num_register_tokens": cfg.n_storage_tokens,
        "pos_embed_shift": cfg.pos_embed_rope_shift_coords,
        "pos_embed_jitter": cfg.pos_embed_rope_jitter_coords,
        "pos_embed_rescale": cfg.pos_embed_rope_rescale_coords,
        "torch_dtype": "float32",
    }
    return out, config


def save_hf_dir(model: DinoVisionTransformer, out_dir: str | os.PathLike) -> Path:
    """Write a transformers-loadable ``dinov3_vit`` directory (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, config = to_hf(model)
    atomic_write_to_path(out_dir / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", config)
    return out_dir



def read_hf_dir(path: Path, config: Mapping[str, Any]) -> BackboneCheckpoint:
    """A transformers ``dinov3_vit`` folder whose ``config.json`` is ``config`` -> official layout."""
    config_path = path / "config.json"
    if config.get("model_type") not in _HF_MODEL_TYPES:
        raise CheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not 'dinov3_vit'")
    tensors: dict[str, Tensor] = {}
    if (path / "model.safetensors").exists():
        tensors, _ = read_safetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").exists():
        index = read_json(path / "model.safetensors.index.json")
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(read_safetensors(path / shard)[0])
    elif (path / "pytorch_model.bin").exists():
        tensors, _ = unwrap(torch_load(path / "pytorch_model.bin"), path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or pytorch_model.bin) in the directory")
    prefix = hf_prefix(tensors)
    if prefix is None:
        raise CheckpointError(f"{path}: weights have no 'embeddings.cls_token'; not a dinov3_vit model")
    return from_hf(path, tensors, prefix, config)



def from_hf(path: Path, tensors: Mapping[str, Tensor], prefix: str, config: Mapping[str, Any]) -> BackboneCheckpoint:
    """transformers ``dinov3_vit`` weights + config -> official layout and exact architecture hints."""
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    absent = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in config]
    if absent:
        raise CheckpointError(f"{path}: config.json lacks {absent} (needed to rebuild the dinov3_vit architecture)")
    dim, depth = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    gated = bool(config.get("use_gated_mlp", config.get("use_swiglu_ffn", False)))
    hidden = int(config.get("intermediate_size", 4 * dim))
    q_bias, k_bias, v_bias = (bool(config.get(n, d)) for n, d in
                              (("query_bias", True), ("key_bias", False), ("value_bias", True)))
    if q_bias != v_bias:
        raise CheckpointError(f"{path}: query_bias={q_bias} but value_bias={v_bias}; DINOv3 has one qkv bias switch")
    ffn_layer, ffn_ratio = swiglu_shape(hidden, dim) if gated else ("mlp", hidden / dim)
    base = float(config.get("rope_theta", 100.0))
    hints: dict[str, Any] = {
        "embed_dim": dim, "depth": depth, "num_heads": heads, "patch_size": int(config.get("patch_size", 16)),
        "in_chans": int(config.get("num_channels", 3)), "ffn_layer": ffn_layer, "ffn_ratio": ffn_ratio,
        "ffn_bias": bool(config.get("mlp_bias", True)), "proj_bias": bool(config.get("proj_bias", True)),
        "qkv_bias": q_bias, "mask_k_bias": q_bias and not k_bias, "layerscale_init": 1e-5,
        "norm_eps": float(config.get("layer_norm_eps", 1e-5)), "n_storage_tokens": int(config.get("num_register_tokens", 0)),
        "pos_embed_rope_base": base, "pos_embed_rope_normalize_coords": "separate", "pos_embed_rope_dtype": "fp32",
        "pos_embed_rope_shift_coords": config.get("pos_embed_shift"),
        "pos_embed_rope_jitter_coords": config.get("pos_embed_jitter"),
        "pos_embed_rope_rescale_coords": config.get("pos_embed_rescale", 2.0),
    }
    inverse = {_hf_key(k): k for k in _official_keys_without_qkv(hints)}
    out: dict[str, Tensor] = {}
    leftovers = []
    for key, value in sd.items():
        m = re.match(r"layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            continue
        if key in inverse:
            official = inverse[key]
            out[official] = value.reshape(1, dim) if official == "mask_token" else value
        elif key == "rope_embeddings.inv_freq":
            continue  # non-persistent in transformers; recomputed from rope_theta
        else:
            leftovers.append(key)
    for i in range(depth):
        parts = {}
        for kind in ("weight", "bias"):
            q, k, v = (sd.get(f"layer.{i}.attention.{n}_proj.{kind}") for n in "qkv")
            if kind == "weight":
                if q is None or k is None or v is None:
                    raise CheckpointError(f"{path}: layer {i} lacks q/k/v projection weights")
                parts[kind] = torch.cat([q, k, v])
            elif q_bias:
                if q is None or v is None:
                    raise CheckpointError(f"{path}: config says query/value bias but layer {i} has none")
                parts[kind] = torch.cat([q, k if k is not None else torch.zeros_like(q), v])
            elif k is not None:
                leftovers.append(f"layer.{i}.attention.k_proj.bias")
        out[f"blocks.{i}.attn.qkv.weight"] = parts["weight"]
        if "bias" in parts:
            out[f"blocks.{i}.attn.qkv.bias"] = parts["bias"]
            if hints["mask_k_bias"]:
                mask = torch.ones(3 * dim)
                mask[dim: 2 * dim] = 0
                out[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    out["rope_embed.periods"] = rope_periods(dim // heads, base)
    if hints["n_storage_tokens"] == 0:
        out.pop("storage_tokens", None)
    if leftovers:
        raise CheckpointError(f"{path}: unexpected Hugging Face weights {sorted(leftovers)[:20]}")
    return BackboneCheckpoint(path, "hf", out, hints)


def _official_keys_without_qkv(hints: Mapping[str, Any]) -> list[str]:
    """Official non-qkv key names for an architecture (used to invert the HF key mapping)."""
    keys = ["cls_token", "mask_token", "storage_tokens", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"]
    fc = ("w1", "w2", "w3") if hints["ffn_layer"] != "mlp" else ("fc1", "fc2")
    for i in range(hints["depth"]):
        b = f"blocks.{i}."
        keys += [b + s for s in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                 "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "ls2.gamma")]
        keys += [f"{b}mlp.{n}.{kind}" for n in fc for kind in ("weight", "bias")]
    return keys
