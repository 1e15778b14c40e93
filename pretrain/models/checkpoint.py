"""Backbone checkpoint I/O: read every supported format, infer the architecture, load strictly; save ours.

Why: users arrive with the released DINOv3 file, the MedDINOv3 release, our own training checkpoints,
a Hugging Face directory or our safetensors export, and must not need to know which. Every format is
converted to the official DINOv3 key layout (the layout of our model), then loaded with
``strict=True`` after a readable diff, so a silently dropped key is impossible.

Formats (``detect_format`` names):
- ``official``: flat ``{key: tensor}`` in the official layout (``dinov3_vitb16_pretrain_lvd1689m-*.pth``);
- ``meddinov3_release``: ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``;
- ``training``: DINOv3/our trainer checkpoints: ``teacher``/``student``/``model``/``state_dict`` wrappers,
  ``backbone.``/``teacher.backbone.`` prefixes, ``module.``/``_orig_mod.``/``_checkpoint_wrapped_module.``/
  ``_fsdp_wrapped_module.`` segments anywhere in the keys;
- ``hf``: transformers ``dinov3_vit`` directory (``config.json`` + ``model.safetensors``), q/k/v split;
- ``export``: our safetensors with the architecture in the metadata (``save_backbone``);
- ``timm``: timm's ``vit_*_patch16_dinov3*`` state dict (``reg_token``, ``gamma_1/2``, ``q_bias``/``v_bias``;
  a flat ``.pth``/``.safetensors`` or a timm hub folder), converted back by inverting timm's checkpoint filter.
Pickle files are only ever read with ``torch.load(..., weights_only=True)``.

This module dispatches on the format and loads; the pieces live next to it: ``checkpoint_files`` (safe file
reading, wrapper unwrapping), ``arch_inference`` (architecture from the weights), ``hf_format`` and
``timm_format`` (conversions from and to the other layouts).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from meddino_common.atomic import atomic_write_to_path

from .arch_inference import infer_arch
from .checkpoint_files import (BackboneCheckpoint, CheckpointError, read_json, read_safetensors, select_backbone,
                               strip_wrapper_segments, torch_load, unwrap)
from .hf_format import from_hf, hf_prefix, read_hf_dir
from .timm_format import from_timm, is_timm, timm_folder_weights
from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer, ViTConfig, merge_overrides

logger = logging.getLogger(__name__)

EXPORT_FORMAT_TAG = "meddinov3-backbone"


# ------------------------------------------------------------------------------------------ reading
def _export_arch(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The architecture stored by :func:`save_backbone` (a clear error when the metadata was stripped)."""
    if "arch" not in metadata:
        raise CheckpointError(f"{path}: a {EXPORT_FORMAT_TAG} safetensors file without 'arch' metadata "
                              "(re-export it with python -m pretrain.models.export)")
    try:
        arch = json.loads(metadata["arch"])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the 'arch' metadata is not valid JSON ({exc})") from exc
    unknown = sorted(set(arch) - set(ViTConfig.__dataclass_fields__)) if isinstance(arch, dict) else ["<not a dict>"]
    if unknown:
        raise CheckpointError(f"{path}: the 'arch' metadata has unknown fields {unknown}")
    return arch


def read_backbone_checkpoint(path: str | os.PathLike, prefer: str = "teacher") -> BackboneCheckpoint:
    """Read any supported checkpoint into the official layout (no model is built).

    ``prefer`` chooses between ``teacher`` (default: the EMA model DINOv3 evaluates) and ``student``
    when a training checkpoint holds both.
    """
    if prefer not in ("teacher", "student"):
        raise ValueError(f"prefer must be 'teacher' or 'student', got {prefer!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") == EXPORT_FORMAT_TAG:
            return BackboneCheckpoint(path, "export", tensors, _export_arch(path, metadata))
        prefix = hf_prefix(tensors)
        if prefix is not None:
            config_path = path.parent / "config.json"
            if not config_path.exists():
                raise CheckpointError(f"{path}: Hugging Face key names but no config.json next to it")
            return from_hf(path, tensors, prefix, read_json(config_path))
        sd, fmt = tensors, "official"
        trail: tuple[str, ...] = ()
        top_keys: set = set()
    else:
        obj = torch_load(path)
        top_keys = set(obj) if isinstance(obj, Mapping) else set()
        sd, trail = unwrap(obj, path, prefer)
        fmt = "official" if not trail else "training"
    sd = strip_wrapper_segments(sd)
    picked, prefix, ignored = select_backbone(sd, path, prefer)
    if is_timm(picked):
        picked, hints, dropped = from_timm(picked)
        if dropped:
            logger.info("%s: timm layout; ignoring non-backbone entries %s", path, dropped)
        return BackboneCheckpoint(path, "timm", picked, hints, ignored + dropped)
    if prefix or trail:
        fmt = "training"
        release_like = trail == ("teacher",) and prefix == "backbone." and top_keys == {"teacher"}
        if release_like and {"dino_head", "ibot_head"} & set(ignored):
            fmt = "meddinov3_release"
    if ignored:
        logger.info("%s: using %r%s, ignoring non-backbone entries %s", path, "/".join(trail), prefix, ignored)
    return BackboneCheckpoint(path, fmt, picked, {}, ignored)


def detect_format(path: str | os.PathLike) -> str:
    """One of ``official, meddinov3_release, training, hf, export, timm`` (raises :class:`CheckpointError`)."""
    return read_backbone_checkpoint(path).format


def _read_folder(path: Path) -> BackboneCheckpoint:
    """A transformers ``dinov3_vit`` folder, or a timm hub folder (``config.json`` naming an ``architecture``)."""
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: a directory, but no config.json (expected a transformers dinov3_vit dir)")
    config = read_json(config_path)
    if "model_type" not in config and "architecture" in config:
        return read_backbone_checkpoint(timm_folder_weights(path, config))
    return read_hf_dir(path, config)


# --------------------------------------------------------------------------------- strict loading
def _diff_report(model: DinoVisionTransformer, sd: Mapping[str, Tensor]) -> str | None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or misshaped):
        return None

    def block(title: str, items: list[str]) -> str:
        if not items:
            return ""
        grouped = _group_block_keys(items)
        shown = grouped[:30] + ([f"... and {len(grouped) - 30} more"] if len(grouped) > 30 else [])
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown)

    parts = [block("shape mismatch", misshaped), block("missing from checkpoint", missing),
             block("unexpected in checkpoint", unexpected)]
    return "\n".join(p for p in parts if p)


def _group_block_keys(items: list[str]) -> list[str]:
    """``blocks.4.norm1.weight ... blocks.11.norm1.weight`` -> ``blocks.{4-11}.norm1.weight`` (readable errors)."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for item in items:
        m = re.match(r"blocks\.(\d+)\.(.*)$", item)
        pattern, idx = (f"blocks.{{i}}.{m.group(2)}", int(m.group(1))) if m else (item, -1)
        if pattern not in groups:
            groups[pattern] = []
            order.append(pattern)
        groups[pattern].append(idx)
    out = []
    for pattern in order:
        idx = sorted(i for i in groups[pattern] if i >= 0)
        if not idx:
            out.append(pattern)
            continue
        ranges, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                ranges.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(pattern.replace("{i}", "{" + ",".join(ranges) + "}"))
    return out


# MedDINOv3's code builds its backbone with the official ``vit_base(..., qkv_bias=False)`` and the default
# ``norm_layer="layernorm"``, i.e. LayerNorm eps 1e-6; the LVD-1689M ViT-B/16 uses "layernormbf16" (1e-5).
MEDDINOV3_RELEASE_NORM_EPS: float = ARCH_PRESETS["meddinov3_vitb16"]["norm_eps"]


def _default_norm_eps(ckpt: BackboneCheckpoint, inferred: Mapping[str, Any]) -> float | None:
    """LayerNorm eps for an inferred architecture whose file does not state it (None: the ``vitb16`` preset's).

    eps is not stored in the weights. A MedDINOv3 release layout (``teacher`` wrapper holding
    ``backbone.*`` plus ``dino_head``/``ibot_head``, no qkv bias) is what MedDINOv3's own code writes and
    reads back with eps 1e-6, so that layout gets 1e-6; any other file gets the DINOv3 preset's 1e-5.
    Both choices are logged with the option that overrides them.
    """
    if ckpt.format == "meddinov3_release" and not inferred["qkv_bias"]:
        logger.warning(
            "%s: MedDINOv3 release layout (teacher backbone + dino/ibot heads, no qkv bias); LayerNorm eps is "
            "not stored in the weights, using %g as MedDINOv3's code does. Pass norm_eps=1e-5 (finetune: "
            "model.backbone_overrides.norm_eps=1e-5) if this checkpoint was trained with DINOv3's 1e-5.",
            ckpt.path, MEDDINOV3_RELEASE_NORM_EPS,
        )
        return MEDDINOV3_RELEASE_NORM_EPS
    if not inferred["qkv_bias"]:
        logger.warning(
            "%s: no qkv bias (as in the MedDINOv3 release) but no MedDINOv3 wrapper either; LayerNorm eps is not "
            "stored in the weights, using the DINOv3 default %g. If this is a MedDINOv3 backbone, pass "
            "norm_eps=1e-6 or arch='meddinov3_vitb16' (finetune: model.arch=meddinov3_vitb16).",
            ckpt.path, ARCH_PRESETS["vitb16"]["norm_eps"],
        )
    return None


def _model_config(ckpt: BackboneCheckpoint, arch: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if arch is not None:
        if arch not in ARCH_PRESETS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_PRESETS)}")
        return merge_overrides(ARCH_PRESETS[arch], overrides)
    inferred = infer_arch(ckpt.state_dict)
    if "num_heads" not in inferred and "num_heads" not in ckpt.arch_hints:
        inferred["num_heads"] = max(1, inferred["embed_dim"] // 64)
    if "norm_eps" not in overrides and "norm_eps" not in ckpt.arch_hints and "norm_layer" not in overrides:
        eps = _default_norm_eps(ckpt, inferred)
        if eps is not None:
            inferred["norm_eps"] = eps
    return merge_overrides({**ARCH_PRESETS["vitb16"], **inferred, **ckpt.arch_hints}, overrides)


def _arch_hint(ckpt: BackboneCheckpoint, arch: str | None) -> str:
    """A one-line suggestion appended to a mismatch error when the file's layout points to another preset."""
    if arch is None or ckpt.format != "meddinov3_release":
        return ""
    if ARCH_PRESETS[arch]["qkv_bias"] and "blocks.0.attn.qkv.bias" not in ckpt.state_dict:
        return ("\n  hint: this is the MedDINOv3 release layout (no qkv bias): load it with arch=None (inferred, "
                "LayerNorm eps 1e-6) or arch='meddinov3_vitb16' (finetune: model.arch=meddinov3_vitb16)")
    return ""


def load_backbone(
    path: str | os.PathLike, arch: str | None = None, *, prefer: str = "teacher", **overrides: Any
) -> DinoVisionTransformer:
    """Load a backbone from any supported format; returns the model in eval mode.

    ``arch=None`` infers the architecture from the weights (and from config/metadata for HF/export),
    taking what cannot be inferred (RoPE coordinate settings, LayerNorm eps) from the ``vitb16`` preset,
    except that a MedDINOv3 release file (``teacher`` wrapper with dino/ibot heads, no qkv bias) gets
    LayerNorm eps 1e-6, the value MedDINOv3's code builds it with (logged, with the override to pass).
    A given ``arch`` is taken literally (preset + overrides) and the weights must fit it. ``overrides``
    (``ViTConfig`` names) win over everything, e.g. ``norm_eps=1e-5``. Any missing/unexpected/mis-shaped
    key raises one :class:`CheckpointError` listing them all.
    """
    ckpt = read_backbone_checkpoint(path, prefer=prefer)
    cfg = _model_config(ckpt, arch, overrides)
    try:
        model = DinoVisionTransformer(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: cannot build a backbone for this checkpoint: {exc}") from exc
    if ckpt.format == "timm":  # timm stores no RoPE periods: take the model's (num_heads may be overridden)
        ckpt.state_dict["rope_embed.periods"] = model.rope_embed.periods.detach().clone()
    report = _diff_report(model, ckpt.state_dict)
    if report is not None:
        how = f"arch={arch!r}" if arch else "the architecture inferred from the weights"
        raise CheckpointError(
            f"{ckpt.path} ({ckpt.format} format) does not match {how} "
            f"(embed_dim={model.embed_dim}, depth={model.n_blocks}, heads={model.num_heads}):\n{report}"
            f"{_arch_hint(ckpt, arch)}"
        )
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()


def save_backbone(model: DinoVisionTransformer, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights (official key layout) as safetensors with the architecture in metadata.

    Atomic: written to a temporary file in the same folder, then renamed.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": EXPORT_FORMAT_TAG, "arch": json.dumps(model.config.to_dict()), "version": "1"}
    return atomic_write_to_path(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
