"""Reading checkpoint files safely, and finding the backbone inside whatever wraps it.

Pickle files are only ever read with ``torch.load(..., weights_only=True)``; a file that is not a checkpoint
(empty, text, truncated, corrupt, holding pickled objects) is one :class:`CheckpointError` naming it. Trainer
checkpoints wrap the backbone (``teacher``/``student``/``model``/``state_dict`` dicts, ``backbone.`` prefixes,
``module.``/``_orig_mod.``/``_checkpoint_wrapped_module.``/``_fsdp_wrapped_module.`` segments from DDP,
``torch.compile``, activation checkpointing and FSDP); :func:`unwrap`, :func:`strip_wrapper_segments` and
:func:`select_backbone` peel those off.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_WRAPPER_KEYS = ("teacher", "model", "state_dict", "model_state_dict", "module", "student", "backbone")
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(?:module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


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



_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive; legacy pickle (protocol >= 2)


def torch_load(path: Path) -> Any:
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


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (config.json, index files); a bad file is a one-line :class:`CheckpointError`."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read as JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot read as safetensors (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def unwrap(
    obj: Any, path: Path, prefer: str = "teacher", trail: tuple[str, ...] = ()
) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Find the tensor dict inside wrapper dicts (``teacher``/``model``/...); returns it and the keys taken."""
    if _is_state_dict(obj):
        return dict(obj), trail
    if isinstance(obj, Mapping):
        for key in (prefer, *_WRAPPER_KEYS):
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap(obj[key], path, prefer, trail + (key,))
        raise CheckpointError(
            f"{path}: no backbone state dict found; top-level entries are {sorted(map(str, obj))[:20]} "
            f"(expected a flat {{name: tensor}} dict or one of the wrappers {list(_WRAPPER_KEYS)})"
        )
    raise CheckpointError(f"{path}: contains a {type(obj).__name__}, expected a dict of tensors (a state dict)")


def strip_wrapper_segments(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def select_backbone(sd: dict[str, Tensor], path: Path, prefer: str) -> tuple[dict[str, Tensor], str, list[str]]:
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
