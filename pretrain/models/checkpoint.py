"""Backbone checkpoint I/O: read every supported format, infer the architecture, load strictly.

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
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .rope import rope_periods
from .vision_transformer import _SWIGLU_ALIGN, ARCH_PRESETS, DinoVisionTransformer, ViTConfig, merge_overrides

logger = logging.getLogger(__name__)

EXPORT_FORMAT_TAG = "meddinov3-backbone"
_WRAPPER_KEYS = ("teacher", "model", "state_dict", "model_state_dict", "module", "student", "backbone")
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(?:module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
_HF_MODEL_TYPES = ("dinov3_vit", "DINOv3ViT")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested architecture (message names the file)."""


@dataclass
class BackboneCheckpoint:
    """A backbone state dict in the official layout plus what the file said about its architecture."""

    path: Path
    format: str
    state_dict: dict[str, Tensor]
    arch_hints: dict[str, Any] = field(default_factory=dict)  # exact ViTConfig fields from config/metadata
    ignored_prefixes: list[str] = field(default_factory=list)  # non-backbone parts (heads, optimizer, ...)


# ------------------------------------------------------------------------------------------ reading
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive; legacy pickle (protocol >= 2)


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(_TORCH_MAGIC):
        kind = "an empty file" if not head else ("a text file" if _is_text(head) else "not a torch.save file")
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({kind}, starts with {head[:16]!r}); expected the zip archive "
            f"torch.save writes, a .safetensors file or a Hugging Face/timm folder"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled Python objects that are not plain tensors/"
            f"containers (torch.load(weights_only=True) rejected it). Only state dicts are accepted; "
            f"re-save the weights with torch.save(model.state_dict()). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint (truncated, corrupt or not a checkpoint): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def _is_text(head: bytes) -> bool:
    """No control bytes other than whitespace: a text file (a README or a JSON saved as ``.pth``)."""
    return all(b >= 32 or b in b"\t\n\r\f" for b in head)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (config.json, index files); a bad file is a one-line :class:`CheckpointError`."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read as JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot read as safetensors (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(
    obj: Any, path: Path, prefer: str = "teacher", trail: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Find the tensor dict inside wrapper dicts (``teacher``/``model``/...); returns it and the keys taken."""
    if _is_state_dict(obj):
        return dict(obj), trail
    if isinstance(obj, Mapping):
        for key in (prefer, *_WRAPPER_KEYS):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key], path, prefer, trail + (key,))
        raise CheckpointError(
            f"{path}: no backbone state dict found; top-level entries are {sorted(map(str, obj))[:20]} "
            f"(expected a flat {{name: tensor}} dict or one of the wrappers {list(_WRAPPER_KEYS)})"
        )
    raise CheckpointError(f"{path}: contains a {type(obj).__name__}, expected a dict of tensors (a state dict)")


def _strip_wrapper_segments(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        new = key
        while True:
            stripped = _WRAPPER_SEGMENTS.sub(r"\1", new)
            if stripped == new:
                break
            new = stripped
        out[new] = value
    return out


def _select_backbone(sd: dict[str, Tensor], path: Path, prefer: str) -> tuple[dict[str, Tensor], str, list[str]]:
    """Pick the backbone sub-dict: the prefix ``P`` with ``P + 'cls_token'`` present, preferring ``prefer``."""
    other = "student" if prefer == "teacher" else "teacher"
    candidates = [f"{prefer}.backbone.", "backbone.", f"{other}.backbone.", f"{prefer}.", f"{other}.", ""]
    candidates += sorted({k[: -len("cls_token")] for k in sd if k.endswith("cls_token")} - set(candidates))
    for prefix in candidates:
        if prefix + "cls_token" in sd:
            picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            ignored = sorted({k[len(prefix):].split(".")[0] if k.startswith(prefix) else k.split(".")[0]
                              for k in sd if not k.startswith(prefix)})
            return picked, prefix, ignored
    raise CheckpointError(
        f"{path}: no ViT backbone found (no '*cls_token' key among {len(sd)} tensors; first keys: "
        f"{sorted(sd)[:8]}). Is this a DINOv3 ViT checkpoint?"
    )


def _hf_prefix(sd: Mapping[str, Tensor]) -> str | None:
    for key in sd:
        if key.endswith("embeddings.cls_token"):
            return key[: -len("embeddings.cls_token")]
    return None


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
        return _read_hf_dir(path)
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") == EXPORT_FORMAT_TAG:
            return BackboneCheckpoint(path, "export", tensors, _export_arch(path, metadata))
        prefix = _hf_prefix(tensors)
        if prefix is not None:
            config_path = path.parent / "config.json"
            if not config_path.exists():
                raise CheckpointError(f"{path}: Hugging Face key names but no config.json next to it")
            return _from_hf(path, tensors, prefix, _read_json(config_path))
        sd, fmt = tensors, "official"
        trail: tuple[str, ...] = ()
        top_keys: set = set()
    else:
        obj = _torch_load(path)
        top_keys = set(obj) if isinstance(obj, Mapping) else set()
        sd, trail = _unwrap(obj, path, prefer)
        fmt = "official" if not trail else "training"
    sd = _strip_wrapper_segments(sd)
    picked, prefix, ignored = _select_backbone(sd, path, prefer)
    if _is_timm(picked):
        picked, hints, dropped = _from_timm(picked)
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


# ------------------------------------------------------------------------- architecture inference
def _swiglu_shape(hidden: int, dim: int) -> tuple[str, float]:
    """Find (ffn_layer, ffn_ratio) whose SwiGLU hidden width equals ``hidden``."""
    ratios = [1.5 * hidden / dim, 4.0, 6.0, 3.0, 3.777777778, 8 / 3]
    for name, align in _SWIGLU_ALIGN.items():
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
        arch["ffn_layer"], arch["ffn_ratio"] = _swiglu_shape(int(sd["blocks.0.mlp.w1.weight"].shape[0]), dim)
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
    if ckpt.format == "meddinov3_release" and not inferred.get("qkv_bias", True):
        logger.warning(
            "%s: MedDINOv3 release layout (teacher backbone + dino/ibot heads, no qkv bias); LayerNorm eps is "
            "not stored in the weights, using %g as MedDINOv3's code does. Pass norm_eps=1e-5 (finetune: "
            "model.backbone_overrides.norm_eps=1e-5) if this checkpoint was trained with DINOv3's 1e-5.",
            ckpt.path, MEDDINOV3_RELEASE_NORM_EPS,
        )
        return MEDDINOV3_RELEASE_NORM_EPS
    if not inferred.get("qkv_bias", True):
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
    if ARCH_PRESETS[arch].get("qkv_bias", True) and "blocks.0.attn.qkv.bias" not in ckpt.state_dict:
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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": EXPORT_FORMAT_TAG, "arch": json.dumps(model.config.to_dict()), "version": "1"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------ Hugging Face format
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
    atomic_write(out_dir / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out_dir / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out_dir


def _read_hf_dir(path: Path) -> BackboneCheckpoint:
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path}: a directory, but no config.json (expected a transformers dinov3_vit dir)")
    config = _read_json(config_path)
    if "model_type" not in config and "architecture" in config:  # a timm hub folder
        weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
        if not weights:
            raise CheckpointError(f"{path}: timm folder ({config['architecture']}) without model.safetensors "
                                  "or pytorch_model.bin")
        return read_backbone_checkpoint(weights[0])
    if config.get("model_type") not in _HF_MODEL_TYPES:
        raise CheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not 'dinov3_vit'")
    tensors: dict[str, Tensor] = {}
    if (path / "model.safetensors").exists():
        tensors, _ = _read_safetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").exists():
        index = _read_json(path / "model.safetensors.index.json")
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(_read_safetensors(path / shard)[0])
    elif (path / "pytorch_model.bin").exists():
        tensors, _ = _unwrap(_torch_load(path / "pytorch_model.bin"), path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or pytorch_model.bin) in the directory")
    prefix = _hf_prefix(tensors)
    if prefix is None:
        raise CheckpointError(f"{path}: weights have no 'embeddings.cls_token'; not a dinov3_vit model")
    return _from_hf(path, tensors, prefix, config)


def _from_hf(path: Path, tensors: Mapping[str, Tensor], prefix: str, config: Mapping[str, Any]) -> BackboneCheckpoint:
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
    ffn_layer, ffn_ratio = _swiglu_shape(hidden, dim) if gated else ("mlp", hidden / dim)
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


# ------------------------------------------------------------------------------------------ timm format
# timm's DINOv3 models (``timm.models.eva``, ``vit_*_patch16_dinov3*``) build LayerNorm(eps=1e-5) and RoPE with
# temperature 100 in fp32, and do not store either; every released DINOv3 ViT up to H+ has 64-dim heads.
TIMM_DINOV3_HINTS: dict[str, Any] = {"norm_eps": 1e-5, "pos_embed_rope_base": 100.0, "pos_embed_rope_dtype": "fp32"}
TIMM_HEAD_DIM = 64
_TIMM_NON_BACKBONE = ("head.", "fc_norm.", "head_drop.")


def _is_timm(sd: Mapping[str, Tensor]) -> bool:
    """timm's names for DINOv3 weights: register tokens and EVA-style LayerScale/bias names."""
    return "reg_token" in sd or "blocks.0.gamma_1" in sd or "blocks.0.attn.q_bias" in sd


def _from_timm(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
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
