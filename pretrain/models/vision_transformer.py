"""DINOv3 Vision Transformer, numerically identical to facebookresearch/dinov3 (fp32, eval).

Why: every later stage (pretraining, finetuning, the companion readouts) runs this backbone, and
published DINOv3 / MedDINOv3 weights must load and give the same features. The parameter names and
shapes are exactly the official ones, so ``torch.save(model.state_dict())`` is the official format.

Token layout: ``[cls, storage x S, patches (row-major over the h x w grid)]``; no absolute position
embedding, 2-D RoPE on the patch tokens' q/k (see :mod:`pretrain.models.rope`).
Block: pre-norm, ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .rope import RopePositionEmbedding, rope_split_qkv

RopeTables = tuple[Tensor, Tensor]  # (sin, cos), each [N, Dh/2]: identity rows for prefix tokens
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NORM_LAYER_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}  # official `norm_layer` names -> eps
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


@dataclass
class ViTConfig:
    """Every architectural choice of :class:`DinoVisionTransformer`; names follow the official constructor."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    in_chans: int = 3
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"  # "mlp" | "swiglu" | "swiglu32" | "swiglu64" | "swiglu128"
    ffn_bias: bool = True
    proj_bias: bool = True
    qkv_bias: bool = True
    mask_k_bias: bool = True
    layerscale_init: float | None = 1e-5
    norm_eps: float = 1e-5
    n_storage_tokens: int = 4
    drop_path_rate: float = 0.0
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = 2.0
    pos_embed_rope_dtype: str = "fp32"
    attn_backend: str = "sdpa"  # "sdpa" (PyTorch) | "xformers" (memory_efficient_attention, if installed)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn_layer not in ("mlp", *SWIGLU_ALIGN):
            raise ValueError(f"ffn_layer must be 'mlp' or one of {sorted(SWIGLU_ALIGN)}, got {self.ffn_layer!r}")
        if self.attn_backend not in ("sdpa", "xformers"):
            raise ValueError(f"attn_backend must be 'sdpa' or 'xformers', got {self.attn_backend!r}")
        if self.pos_embed_rope_dtype not in _DTYPES:
            raise ValueError(f"pos_embed_rope_dtype must be one of {sorted(_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COMMON = dict(
    patch_size=16, in_chans=3, ffn_ratio=4.0, ffn_layer="mlp", qkv_bias=True, mask_k_bias=True,
    layerscale_init=1e-5, norm_eps=1e-5, n_storage_tokens=4, pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2.0,
)
# Official DINOv3 hub settings (dinov3/hub/backbones.py) for s/b/l; vitt16 is a CPU-sized sibling.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    "vitt16": dict(_COMMON, embed_dim=192, depth=12, num_heads=3),
    "vits16": dict(_COMMON, embed_dim=384, depth=12, num_heads=6),
    "vitb16": dict(_COMMON, embed_dim=768, depth=12, num_heads=12),
    "vitl16": dict(_COMMON, embed_dim=1024, depth=24, num_heads=16),
    # MedDINOv3's released CT ViT-B/16, as its own code builds it (official `vit_base` defaults plus
    # qkv_bias=False): LayerNorm eps 1e-6, no qkv bias, RoPE computed in bf16. load_backbone infers the
    # missing bias and the RoPE dtype (from the stored `periods`) from the weights; eps is not stored, so
    # load_backbone(path) with no arch takes 1e-6 for the release layout (teacher wrapper + dino/ibot
    # heads, no qkv bias) and logs it; arch="meddinov3_vitb16" or norm_eps=1e-6 say it explicitly.
    "meddinov3_vitb16": dict(
        _COMMON, embed_dim=768, depth=12, num_heads=12, qkv_bias=False, norm_eps=1e-6, pos_embed_rope_dtype="bf16"
    ),
}


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma`` (``gamma`` initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: ``[B, C, H, W] -> [B, h*w, D]`` plus the grid ``(h, w)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)  # [B, D, h, w]
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)


class MaskedBiasLinear(nn.Linear):
    """qkv projection whose bias is multiplied by the ``bias_mask`` buffer (``[1]*D + [0]*D + [1]*D``).

    DINOv3 zeroes the K bias this way (``mask_k_bias``); the buffer is part of the official state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            self.register_buffer("bias_mask", self._default_mask(), persistent=True)

    def _default_mask(self) -> Tensor:
        o = self.out_features
        mask = torch.ones(o)
        mask[o // 3 : 2 * o // 3] = 0
        return mask

    def reset_bias_mask(self) -> None:
        if self.bias is not None:
            self.bias_mask.copy_(self._default_mask())

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(silu(w1(x)) * w2(x))``; hidden width ``int(2/3 * hidden)`` rounded up to ``align_to``."""

    def __init__(self, dim: int, hidden: int, bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        d = int(hidden * 2 / 3)
        d = d + (-d % align_to)
        self.w1 = nn.Linear(dim, d, bias=bias)
        self.w2 = nn.Linear(dim, d, bias=bias)
        self.w3 = nn.Linear(d, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv, RoPE on patch tokens and SDPA (or xformers)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, mask_k_bias: bool, proj_bias: bool, backend: str = "sdpa"
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim, bias=qkv_bias) if mask_k_bias else nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.backend = backend
        if backend == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError as exc:
                raise ImportError(
                    "attn_backend='xformers' needs xformers (pip install 'meddinov3[gpu]'); "
                    "use attn_backend='sdpa' (the default) otherwise"
                ) from exc

    def attend(self, qkv: Tensor, rope: RopeTables | None) -> Tensor:
        """``qkv [B, N, 3D] -> [B, N, D]`` (attention output before ``proj``)."""
        B, N, _ = qkv.shape
        q, k, v = rope_split_qkv(qkv, self.num_heads, rope)  # each [B, H, N, Dh]
        if self.backend == "xformers" and q.is_cuda:
            from xformers.ops import memory_efficient_attention

            out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.reshape(B, N, -1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        return out.transpose(1, 2).reshape(B, N, -1)

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rope))


def _flat(xs: list[Tensor]) -> Tensor:
    """Concatenate the token rows of several ``[B_i, N_i, D]`` groups into one ``[sum B_i*N_i, D]``."""
    return xs[0].flatten(0, 1) if len(xs) == 1 else torch.cat([x.flatten(0, 1) for x in xs])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    if len(like) == 1:
        return [flat.view(*like[0].shape[:2], -1)]
    sizes = [x.shape[0] * x.shape[1] for x in like]
    return [t.view(*x.shape[:2], -1) for t, x in zip(flat.split(sizes), like)]


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block; accepts one ``[B, N, D]`` tensor or a list of crop groups.

    Crop groups of different sizes share the row-wise work (norms, projections, MLP) in one matmul;
    only attention runs per group. Drop path follows DINOv3: in training, the residual branch is
    computed on a random subset of ``max(int(B*(1-p)), 1)`` samples and added back scaled by
    ``B / subset`` (cheaper than masking, same expectation).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(dim, cfg.num_heads, cfg.qkv_bias, cfg.mask_k_bias, cfg.proj_bias, cfg.attn_backend)
        self.ls1 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        hidden = int(dim * cfg.ffn_ratio)
        if cfg.ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden, bias=cfg.ffn_bias)
        else:
            self.mlp = SwiGLUFFN(dim, hidden, bias=cfg.ffn_bias, align_to=SWIGLU_ALIGN[cfg.ffn_layer])
        self.ls2 = LayerScale(dim, cfg.layerscale_init) if cfg.layerscale_init else nn.Identity()
        self.drop_path_rate = cfg.drop_path_rate

    def _attn_branch(self, xs: list[Tensor], ropes: list[RopeTables | None]) -> list[Tensor]:
        qkv = _unflat(self.attn.qkv(self.norm1(_flat(xs))), xs)
        out = [self.attn.attend(t, r) for t, r in zip(qkv, ropes)]
        return _unflat(self.ls1(self.attn.proj(_flat(out))), xs)

    def _mlp_branch(self, xs: list[Tensor]) -> list[Tensor]:
        return _unflat(self.ls2(self.mlp(self.norm2(_flat(xs)))), xs)

    def forward_list(self, xs: list[Tensor], ropes: list[RopeTables | None]) -> list[Tensor]:
        if not (self.training and self.drop_path_rate > 0.0):
            xs = [x + r for x, r in zip(xs, self._attn_branch(xs, ropes))]
            return [x + r for x, r in zip(xs, self._mlp_branch(xs))]
        keep = [max(int(x.shape[0] * (1 - self.drop_path_rate)), 1) for x in xs]
        for branch in ("attn", "mlp"):
            idx = [torch.randperm(x.shape[0], device=x.device)[:k] for x, k in zip(xs, keep)]
            subsets = [x[i] for x, i in zip(xs, idx)]
            res = self._attn_branch(subsets, ropes) if branch == "attn" else self._mlp_branch(subsets)
            xs = [
                torch.index_add(x, 0, i, r.to(x.dtype), alpha=x.shape[0] / k)
                for x, i, r, k in zip(xs, idx, res, keep)
            ]
        return xs

    def forward(self, x: Tensor | list[Tensor], rope: RopeTables | None | list = None) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            return self.forward_list([x], [rope])[0]
        return self.forward_list(list(x), list(rope) if rope is not None else [None] * len(x))


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT. Build with :func:`build_backbone`; see the module docstring for the layout.

    Attributes used by other packages: ``embed_dim, num_heads, patch_size, n_storage_tokens, n_blocks,
    blocks, norm, config`` (a :class:`ViTConfig`).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("img_size", None)  # official arg; no absolute position embedding, so unused
        norm_layer = kwargs.pop("norm_layer", None)
        if norm_layer is not None:
            if norm_layer not in _NORM_LAYER_EPS:
                raise ValueError(f"norm_layer must be one of {sorted(_NORM_LAYER_EPS)}, got {norm_layer!r}")
            kwargs.setdefault("norm_eps", _NORM_LAYER_EPS[norm_layer])
        valid = {f.name for f in dataclasses.fields(ViTConfig)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(f"unknown backbone option(s) {unknown}; valid options: {sorted(valid)}")
        cfg = ViTConfig(**kwargs)
        self.config = cfg
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens
        self.n_blocks = cfg.depth

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, cfg.n_storage_tokens, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))
        self.rope_embed = RopePositionEmbedding(
            cfg.embed_dim,
            num_heads=cfg.num_heads,
            base=cfg.pos_embed_rope_base,
            min_period=cfg.pos_embed_rope_min_period,
            max_period=cfg.pos_embed_rope_max_period,
            normalize_coords=cfg.pos_embed_rope_normalize_coords,  # type: ignore[arg-type]
            shift_coords=cfg.pos_embed_rope_shift_coords,
            jitter_coords=cfg.pos_embed_rope_jitter_coords,
            rescale_coords=cfg.pos_embed_rope_rescale_coords,
            dtype=_DTYPES[cfg.pos_embed_rope_dtype],
        )
        self.blocks = nn.ModuleList([SelfAttentionBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    # ----------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self) -> None:
        """DINOv3 initialisation: trunc-normal(0.02) linears, N(0, 0.02) cls/storage, zero mask token."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, MaskedBiasLinear):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, LayerScale)):
                m.reset_parameters()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (activation memory ~ one block); only active in training."""
        self.grad_checkpointing = enabled

    # ----------------------------------------------------------------------------------- internals
    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_storage_tokens

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """``x [B, C, H, W]``, ``masks [B, h*w] bool`` -> tokens ``[B, 1+S+h*w, D]`` and the grid ``(h, w)``."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected images [B, {self.config.in_chans}, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}; crop or pad first")
        tokens, hw = self.patch_embed(x)
        B = tokens.shape[0]
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks must be [B, h*w] = {tuple(tokens.shape[:2])}, got {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph (DDP)
        parts = [cls_token.expand(B, -1, -1).to(tokens.dtype)]
        if self.n_storage_tokens > 0:
            parts.append(self.storage_tokens.expand(B, -1, -1).to(tokens.dtype))
        parts.append(tokens)
        return torch.cat(parts, dim=1), hw

    def _rope_tables(self, hw: tuple[int, int]) -> RopeTables:
        """Half-width ``(sin, cos) [1+S+h*w, Dh/2]`` with identity rows for the cls/storage tokens."""
        sin, cos = self.rope_embed(H=hw[0], W=hw[1])
        half = sin.shape[-1] // 2
        sin, cos = sin[:, :half], cos[:, :half]
        n = self.n_prefix_tokens
        sin = torch.cat([sin.new_zeros(n, half), sin])
        cos = torch.cat([cos.new_ones(n, half), cos])
        return sin, cos

    def _run_blocks(self, xs: list[Tensor], grids: list[tuple[int, int]], stop_after: int | None = None):
        """Yield ``(block_index, xs)`` after each block; RoPE is re-drawn per block when it augments."""
        ropes: list[RopeTables] | None = None
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        for i, blk in enumerate(self.blocks):
            if ropes is None or self.rope_embed.augments:
                ropes = [self._rope_tables(hw) for hw in grids]
            # through the module call, never ``blk.forward_list`` directly: torch.compile (``blk.compile()``) and
            # FSDP2's hooks both live on ``__call__``, and a direct method call would silently bypass them
            if use_ckpt:
                xs = checkpoint(blk, xs, ropes, use_reentrant=False)
            else:
                xs = blk(xs, ropes)
            yield i, xs
            if i >= last:
                return

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        # one split (its backward is a single concat) rather than three slices (three zero-filled,
        # full-size gradients summed in backward)
        cls, storage, patches = x_norm.split([1, self.n_storage_tokens, x.shape[1] - self.n_prefix_tokens], dim=1)
        return {
            "x_norm_clstoken": cls.squeeze(1),
            "x_storage_tokens": storage,
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    # ----------------------------------------------------------------------------------- public API
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None) -> list[dict]:
        """Several crop groups (e.g. global 224 px and local 96 px) through the shared blocks in one pass.

        Returns one :meth:`forward_features` dict per group, in order.
        """
        masks_list = list(masks_list) if masks_list is not None else [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} crop groups but {len(masks_list)} masks")
        prepared = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        xs = [t for t, _ in prepared]
        for _, xs in self._run_blocks(xs, [hw for _, hw in prepared]):
            pass
        return [self._output_dict(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence | None = None):
        """``x [B, C, H, W]`` -> dict ``x_norm_clstoken [B, D], x_storage_tokens [B, S, D],
        x_norm_patchtokens [B, h*w, D], x_prenorm [B, 1+S+h*w, D], masks``. A list input goes to
        :meth:`forward_features_list` and returns a list of dicts."""
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of selected blocks (``n`` int = last ``n``; a list = 0-based block indices), in block order.

        Each entry is the patch tokens ``[B, h*w, D]`` (``[B, D, h, w]`` with ``reshape``), zipped with
        the class token ``[B, D]`` and/or the storage tokens ``[B, S, D]`` when asked. ``norm`` applies
        the final LayerNorm to each selected output.
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} must be between 1 and depth={depth}")
            take = list(range(depth - n, depth))
        else:
            take = sorted({int(i) for i in n})
            bad = [i for i in take if not 0 <= i < depth]
            if bad or not take:
                raise ValueError(f"block indices {list(n)} must be non-empty and within [0, {depth - 1}]")
        tokens, hw = self.prepare_tokens_with_masks(x)
        wanted = set(take)
        outputs = [xs[0] for i, xs in self._run_blocks([tokens], [hw], stop_after=take[-1]) if i in wanted]
        if norm:
            outputs = [self.norm(o) for o in outputs]
        k = self.n_prefix_tokens
        cls_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1:k] for o in outputs]
        patches = [o[:, k:] for o in outputs]
        if reshape:
            B = x.shape[0]
            patches = [p.reshape(B, hw[0], hw[1], -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, cls_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)

    def forward(self, x: Tensor | Sequence[Tensor], masks=None, is_training: bool = False):
        """Class token ``[B, D]`` (through ``head``, an Identity); ``is_training=True`` returns the dicts."""
        out = self.forward_features(x, masks)
        return out if is_training else self.head(out["x_norm_clstoken"])


def build_backbone(arch: str = "vitb16", **overrides: Any) -> DinoVisionTransformer:
    """Build a randomly initialised backbone from a preset (:data:`ARCH_PRESETS`) plus overrides.

    ``overrides`` use the official DINOv3 constructor names (``embed_dim, depth, num_heads, ffn_ratio,
    qkv_bias, mask_k_bias, layerscale_init, norm_eps, n_storage_tokens, drop_path_rate, ffn_layer,
    patch_size, in_chans, pos_embed_rope_*``).
    """
    if arch not in ARCH_PRESETS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_PRESETS)}")
    return DinoVisionTransformer(**merge_overrides(ARCH_PRESETS[arch], overrides))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{**base, **overrides}``, where an official ``norm_layer`` override also replaces the base's eps."""
    merged = {**base, **overrides}
    if "norm_layer" in overrides and "norm_eps" not in overrides:
        merged.pop("norm_eps", None)  # let ``norm_layer`` set it
    return merged
