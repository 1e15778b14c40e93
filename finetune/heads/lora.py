"""Low-rank adaptation (Hu et al. 2022) of the linear layers of a frozen ViT, for DINO-Med3D stage II.

Own small module rather than ``peft``: peft pulls in transformers/accelerate/huggingface_hub for what is ~40 lines
here, and it would have to wrap DINOv3's K-masked qkv linear (a Linear subclass with a ``bias_mask`` buffer).
:class:`LoRALinear` calls the wrapped layer's own ``forward``, so such subclasses keep their behaviour, and
:func:`merge_lora` folds the update back into a plain weight for export.

``y = base(x) + (alpha / r) * B(A(dropout(x)))`` with ``A [r, in]`` Kaiming-uniform and ``B [out, r]`` zero, so
a freshly wrapped model computes exactly what the frozen one did.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # modules that read ``.weight`` (e.g. dtype checks) see the base weight
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` ``[out, in]``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update


def apply_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
    prefix: str = "blocks.",
) -> list[str]:
    """Replace every ``nn.Linear`` under ``prefix`` whose attribute name is in ``targets`` by a :class:`LoRALinear`.

    ``targets`` are attribute names as in the DINOv3 layout (``qkv``, ``proj``, ``fc1``, ``fc2``); only modules
    whose qualified name starts with ``prefix`` are touched (so ``patch_embed.proj``, a conv, never is).
    Returns the qualified names that were wrapped; raises when nothing matched (a typo must not train silently).
    """
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (child_name in targets and isinstance(child, nn.Linear) and full.startswith(prefix)):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"LoRA targets {list(targets)} matched no nn.Linear under {prefix!r}")
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA matrices of ``model``."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` into its base layer (in place) and return ``model`` with plain layers."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(module, child_name, child.base)
    return model
