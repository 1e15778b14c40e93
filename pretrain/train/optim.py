"""AdamW parameter groups that carry their own lr / weight-decay multipliers.

Each trainable parameter of the student gets
- ``lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id)`` where the tokens and the patch embedding are
  layer 0, block ``i`` is layer ``i + 1`` and everything after the blocks (final norm, heads) is ``n_blocks + 1``
  (multiplier 1); the patch embedding is further scaled by ``patch_embed_lr_mult`` (0.2);
- ``wd_multiplier = 0`` for biases, norms and LayerScale gammas, ``dino_head_wd_multiplier`` for head weights, 1
  otherwise, the learned tokens (cls / storage / mask) included: the official DINOv3 parameter groups exempt only
  names ending in ``bias`` or containing ``norm`` / ``gamma``;
- ``is_last_layer`` for the heads' prototype layers, which follow the ``last_layer_lr`` schedule (frozen at first).

Parameters with identical multipliers are fused into one group so that the optimiser stays cheap.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

_TOKEN_NAMES = ("cls_token", "storage_tokens", "register_tokens", "mask_token", "pos_embed")


def layer_id_for(name: str, n_blocks: int) -> int:
    """Depth index of a backbone parameter name (without the ``backbone.`` prefix)."""
    if name.startswith(_TOKEN_NAMES) or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def _no_weight_decay(name: str) -> bool:
    return name.endswith("bias") or "norm" in name or "gamma" in name


def param_multipliers(
    name: str,
    n_blocks: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    head_wd_multiplier: float,
) -> dict[str, float | bool]:
    """Multipliers for one student parameter named ``<submodule>.<param path>`` (e.g. ``backbone.blocks.3.mlp.fc1.weight``,
    ``dino_head.last_layer.weight``)."""
    sub, _, rest = name.partition(".")
    if sub == "backbone":
        layer_id = layer_id_for(rest, n_blocks)
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id)
        if rest.startswith("patch_embed"):
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(rest) else 1.0
        is_last = False
    else:
        lr_mult = 1.0
        wd_mult = 0.0 if _no_weight_decay(rest) else head_wd_multiplier
        is_last = "last_layer" in rest
    return {"lr_multiplier": float(lr_mult), "wd_multiplier": float(wd_mult), "is_last_layer": bool(is_last)}


def build_param_groups(student: nn.Module, n_blocks: int, optim_cfg) -> list[dict]:
    """Fused AdamW groups for ``student`` (a ModuleDict with ``backbone``, ``dino_head``, ``ibot_head``).

    The group order is deterministic (first appearance in ``named_parameters``) so optimizer state dicts match
    between runs. Each group carries ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``.
    """
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        mult = param_multipliers(
            name,
            n_blocks=n_blocks,
            layerwise_decay=float(optim_cfg.layerwise_decay),
            patch_embed_lr_mult=float(optim_cfg.patch_embed_lr_mult),
            head_wd_multiplier=float(optim_cfg.dino_head_wd_multiplier),
        )
        key = (mult["lr_multiplier"], mult["wd_multiplier"], mult["is_last_layer"])
        if key not in groups:
            groups[key] = {"params": [], "names": [], **mult}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(student: nn.Module, n_blocks: int, optim_cfg) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups`; lr / weight decay are set every iteration by :func:`apply_schedules`."""
    groups = build_param_groups(student, n_blocks, optim_cfg)
    return torch.optim.AdamW(
        groups,
        lr=0.0,
        weight_decay=0.0,
        betas=(float(optim_cfg.adamw_beta1), float(optim_cfg.adamw_beta2)),
        eps=float(optim_cfg.adamw_eps),
    )


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this iteration's lr and weight decay into every group, scaled by the group's multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def clip_student_gradients(student: nn.ModuleDict, max_norm: float) -> dict[str, float]:
    """Clip the gradient norm of each part of the student (``backbone``, ``dino_head``, ``ibot_head``) to
    ``max_norm`` separately, as the official DINOv2/v3 loops do (one ``clip_grad_norm_`` per student module): a
    large head gradient (e.g. iBOT on near-zero masked tokens at random init) must not shrink the backbone's step.

    Returns the pre-clip norms per part and their root-sum-square (``total``, the norm of the whole student).
    """
    norms: dict[str, float] = {}
    for name, module in student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
            norm = norm.full_tensor()
        norms[name] = float(norm)
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms
