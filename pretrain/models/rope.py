"""2-D rotary position embedding (RoPE) of DINOv3, numerically identical to the official one.

Why this module exists: DINOv3 has no absolute position embedding. Each patch token's query and key
are rotated by angles that depend on the patch-centre coordinates, so the same weights work at any
input size (224, 448, 896, non-square...). Class and storage tokens are never rotated.

Definition (per attention head of width ``Dh``):
- ``periods[j] = base ** (2j / (Dh/2))`` for ``j < Dh/4`` (or geometric between ``min_period`` and
  ``max_period``);
- patch-centre coordinates ``(i + 0.5) / h`` and ``(j + 0.5) / w`` ("separate"; "min"/"max" divide both
  axes by ``min(h, w)`` / ``max(h, w)``), mapped to ``[-1, 1]`` by ``2c - 1``;
- training-only augmentation of those coordinates: shift by ``U(-s, s)`` per axis, jitter by a
  log-uniform factor in ``[1/j, j]`` per axis, rescale by one log-uniform factor in ``[1/r, r]``;
- angles ``2*pi*coord/period`` laid out ``[y-angles (Dh/4), x-angles (Dh/4)]`` and tiled twice to
  ``Dh``; the rotation is the "half-split" form ``x*cos + rotate_half(x)*sin``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

NormalizeCoords = Literal["min", "max", "separate"]


def rope_periods(
    head_dim: int,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Return the ``[head_dim // 4]`` RoPE periods.

    Exactly one parametrisation must be given: ``base`` (periods ``base**(2j/(Dh/2))``) or both
    ``min_period`` and ``max_period`` (periods spaced geometrically from ``min_period`` to ``max_period``).
    """
    both = min_period is not None and max_period is not None
    if (base is None) == (not both):
        raise ValueError("RoPE needs either `base` or both `min_period` and `max_period`, not both/neither")
    if head_dim % 4 != 0:
        raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
    n = head_dim // 4
    if base is not None:
        return base ** (2 * torch.arange(n, dtype=dtype, device=device) / (head_dim // 2))
    ratio = max_period / min_period
    exponents = torch.linspace(0, 1, n, dtype=dtype, device=device)
    return ratio**exponents / ratio * max_period


def patch_center_coords(
    h: int, w: int, normalize_coords: NormalizeCoords = "separate", dtype=torch.float32, device=None
) -> Tensor:
    """Patch-centre coordinates in ``[-1, 1]``, row-major over ``(h, w)``: ``[h*w, 2]`` as (y, x)."""
    if normalize_coords == "separate":
        div_h, div_w = h, w
    elif normalize_coords == "max":
        div_h = div_w = max(h, w)
    elif normalize_coords == "min":
        div_h = div_w = min(h, w)
    else:
        raise ValueError(f"normalize_coords must be 'separate', 'min' or 'max', got {normalize_coords!r}")
    ys = torch.arange(0.5, h, dtype=dtype, device=device) / div_h
    xs = torch.arange(0.5, w, dtype=dtype, device=device) / div_w
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def augment_coords(
    coords: Tensor,
    shift: float | None = None,
    jitter: float | None = None,
    rescale: float | None = None,
) -> Tensor:
    """Training-time coordinate augmentation; ``coords`` is ``[N, 2]``; draws from the global RNG.

    Order and distributions follow DINOv3: shift (uniform, per axis), jitter (log-uniform, per axis),
    rescale (log-uniform, one factor for both axes).
    """
    dd = {"dtype": coords.dtype, "device": coords.device}
    if shift is not None:
        coords = coords + torch.empty(2, **dd).uniform_(-shift, shift)[None, :]
    if jitter is not None:
        log_j = math.log(jitter)
        coords = coords * torch.empty(2, **dd).uniform_(-log_j, log_j).exp()[None, :]
    if rescale is not None:
        log_r = math.log(rescale)
        coords = coords * torch.empty(1, **dd).uniform_(-log_r, log_r).exp()
    return coords


def rope_rotate_half(x: Tensor) -> Tensor:
    """``[x0..x_{D/2-1}, x_{D/2}..x_{D-1}] -> [-x_{D/2}.., x0..]`` on the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Reference rotation ``x*cos + rotate_half(x)*sin`` (``sin``/``cos`` broadcast to ``x [..., D]``)."""
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """Produces the RoPE ``(sin, cos)`` tables, each ``[H*W, head_dim]``, for a ``H x W`` patch grid.

    The only state is the persistent ``periods`` buffer (``rope_embed.periods`` in the official
    checkpoints). Augmentations apply only in ``train()`` mode; eval is deterministic.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: NormalizeCoords = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4*num_heads ({4 * num_heads}) for RoPE")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = dtype
        self.register_buffer("periods", rope_periods(self.head_dim, base, min_period, max_period, dtype), persistent=True)

    @property
    def augments(self) -> bool:
        """True when a forward call in the current mode draws random coordinates."""
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    def reset_parameters(self) -> None:
        self.periods.copy_(rope_periods(self.head_dim, self.base, self.min_period, self.max_period, self.dtype))

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Return ``(sin, cos)``, each ``[H*W, head_dim]`` in ``self.dtype`` (fp32)."""
        coords = patch_center_coords(H, W, self.normalize_coords, dtype=self.dtype, device=self.periods.device)
        if self.training:
            coords = augment_coords(coords, self.shift_coords, self.jitter_coords, self.rescale_coords)
        angles = 2 * math.pi * coords.unsqueeze(-1) / self.periods.to(self.dtype)  # [HW, 2, Dh/4]
        angles = angles.flatten(-2, -1).tile(2)  # [HW, Dh]
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, normalize_coords={self.normalize_coords!r}, "
            f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}"
        )
