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
from torch.autograd.function import once_differentiable

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


def _rotate_into(out1: Tensor, out2: Tensor, x1: Tensor, x2: Tensor, sin: Tensor, cos: Tensor, sign: float) -> None:
    """``out1 = x1*cos - sign*x2*sin``, ``out2 = x2*cos + sign*x1*sin`` written in place (any strides).

    ``sign=+1`` is the forward rotation, ``sign=-1`` its transpose (the backward). Each product is
    rounded before the sum, exactly like the official ``x*cos + rotate_half(x)*sin`` (no fused
    multiply-add), so fp32 results are bit-identical to :func:`rope_apply`.
    """
    tmp = torch.empty(x2.shape, dtype=out1.dtype, device=out1.device)
    torch.mul(x1, cos, out=out1)
    torch.mul(x2, sin, out=tmp)
    out1.sub_(tmp) if sign > 0 else out1.add_(tmp)
    torch.mul(x2, cos, out=out2)
    torch.mul(x1, sin, out=tmp)
    out2.add_(tmp) if sign > 0 else out2.sub_(tmp)


class _RopeSplitQKV(torch.autograd.Function):
    """Fused ``qkv [B, N, 3*H*Dh] -> q, k [B, H, N, Dh] (rotated, contiguous), v [B, H, N, Dh] (a view)``.

    Why a custom function: written with plain tensor ops, this step costs several full-size copies in
    backward (autograd zero-fills a ``qkv``-sized gradient per slice, then sums and re-lays it out) and
    large temporaries that, on CPU, are fresh ``mmap`` allocations paid for in page faults. Here the
    forward writes q and k once, and the backward writes the three gradients straight into one
    ``qkv``-shaped buffer. Math is in the tables' dtype (fp32), cast back to the input dtype, as DINOv3.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, sin: Tensor, cos: Tensor, num_heads: int):  # type: ignore[override]
        B, N, C = qkv.shape
        head_dim = C // (3 * num_heads)
        q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        rotated = []
        for x in (q, k):
            out = torch.empty(B, num_heads, N, head_dim, dtype=sin.dtype, device=qkv.device)
            _rotate_into(*out.chunk(2, dim=-1), *x.chunk(2, dim=-1), sin, cos, sign=1.0)
            rotated.append(out.to(qkv.dtype))
        ctx.save_for_backward(sin, cos)
        ctx.num_heads = num_heads
        return rotated[0], rotated[1], v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor | None, grad_k: Tensor | None, grad_v: Tensor | None):  # type: ignore[override]
        sin, cos = ctx.saved_tensors
        like = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        B, H, N, Dh = like.shape
        grad = torch.empty(B, N, 3, H, Dh, dtype=like.dtype, device=like.device)
        slots = grad.permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh] views into ``grad``
        for i, g in enumerate((grad_q, grad_k)):
            if g is None:
                slots[i].zero_()
            elif g.dtype == sin.dtype:
                _rotate_into(*slots[i].chunk(2, dim=-1), *g.chunk(2, dim=-1), sin, cos, sign=-1.0)
            else:  # low-precision activations: rotate back in fp32 like autograd of the official code
                tmp = torch.empty(B, H, N, Dh, dtype=sin.dtype, device=g.device)
                _rotate_into(*tmp.chunk(2, dim=-1), *g.chunk(2, dim=-1), sin, cos, sign=-1.0)
                slots[i].copy_(tmp)
        if grad_v is None:
            slots[2].zero_()
        else:
            slots[2].copy_(grad_v)
        return grad.view(B, N, 3 * H * Dh), None, None, None


def rope_split_qkv(qkv: Tensor, num_heads: int, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Split a fused projection ``qkv [B, N, 3*D]`` into per-head ``q, k, v [B, H, N, D/H]`` and rotate q, k.

    ``rope`` holds half-width tables ``(sin, cos)``, each ``[N, Dh/2]``, whose cls/storage rows are the
    identity (``sin=0, cos=1``), so every token goes through one rotation and prefix tokens come out
    unchanged, bit for bit. Same result as the official ``x*cos + rotate_half(x)*sin`` with the tiled
    ``[N_patches, Dh]`` tables applied to patch tokens only (bit-identical in fp32).
    """
    B, N, C = qkv.shape
    if rope is None:
        q, k, v = qkv.view(B, N, 3, num_heads, C // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v
    sin, cos = rope
    if sin.shape != (N, C // (6 * num_heads)) or cos.shape != sin.shape:
        raise ValueError(f"RoPE tables {tuple(sin.shape)} do not fit {N} tokens of head width {C // (3 * num_heads)}")
    return _RopeSplitQKV.apply(qkv.contiguous(), sin, cos, num_heads)
