"""Frozen 2-D encoder -> 3-D window decoder (Usman, Khan & Syed 2026, ``frozen-dinov3-3d-window-decoder.md``).

A frozen DINOv3 encodes every axial slice of a sub-volume; four intermediate levels are *boxed* back into
volumetric maps ``[B, E, D, H/p, W/p]``; a learnable depth embedding (interpolated to the input depth) restores
through-plane position; a DPT-like light 3-D decoder turns them into voxel logits.

Training disassembles the crop into non-overlapping sub-cubes and uses the paper's two-pass scheme
(:func:`two_pass_backward`): pass 1 runs every cube without autograd, reassembles the full prediction and
computes the global loss to get ``dL/dY``; pass 2 re-runs each cube with autograd and back-propagates its slice
of ``dL/dY``. Gradients are exactly those of the loss on the reassembled prediction, while only one cube's graph
is ever alive (``benchmarks/window3d_memory.py`` measures it).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from finetune.heads.common import freeze
from finetune.heads.readout_utils import encode_slices, resolve_layers


@dataclass
class Window3DConfig:
    """Model hyperparameters (``configs/finetune/heads/window3d.yaml``, block ``head``)."""

    layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    reference_depth: int = 12
    slice_size: int | None = None
    depth_embedding: bool = True
    design_depth: int = 128
    proj_channels: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    fusion_channels: int = 256
    upsample_factor: int = 4
    encoder_chunk_size: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Window3DConfig":
        """From the (plain-dict) ``head`` block, strictly (`finetune.heads.common.head_settings`); the sub-cube and
        sliding-window keys are the recipe's."""
        from finetune.heads.common import head_settings

        return head_settings(cls, d, ("name", "cubes_per_axis", "reuse_encoder_features", "infer_overlap",
                                      "infer_gaussian"))


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3x3 conv -> InstanceNorm -> ReLU (the paper's decoder block)."""
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False), nn.InstanceNorm3d(out_ch, affine=True),
        nn.ReLU(inplace=True),
    )


class VolumetricDPTDecoder(nn.Module):
    """DPT-like light 3-D decoder.

    Per level k: 1x1x1 projection ``E -> proj_channels[k]``, 3x3x3 refinement to ``fusion_channels``, learned
    transposed conv (kernel = stride = (1, f, f)) up to the shallowest level's target resolution; concatenation
    (``4 * fusion_channels``), two conv blocks (conv 3x3x3, InstanceNorm, ReLU), 1x1x1 logits.
    Input: list of ``[B, E, D, h, w]``; output ``[B, C, D, f*h, f*w]``.
    """

    def __init__(self, embed_dim: int, num_levels: int, num_classes: int, cfg: Window3DConfig):
        super().__init__()
        if len(cfg.proj_channels) != num_levels:
            raise ValueError(f"proj_channels has {len(cfg.proj_channels)} entries for {num_levels} levels")
        f, c = cfg.upsample_factor, cfg.fusion_channels
        self.project = nn.ModuleList(nn.Conv3d(embed_dim, pc, 1) for pc in cfg.proj_channels)
        self.refine = nn.ModuleList(nn.Conv3d(pc, c, 3, padding=1) for pc in cfg.proj_channels)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(c, c, kernel_size=(1, f, f), stride=(1, f, f)) if f > 1 else nn.Identity()
            for _ in cfg.proj_channels
        )
        self.fuse = nn.Sequential(conv_block(num_levels * c, c), conv_block(c, c))
        self.logits = nn.Conv3d(c, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        ups = [up(ref(proj(x))) for x, proj, ref, up in zip(feats, self.project, self.refine, self.upsample)]
        target = ups[0].shape[-3:]  # shallowest level defines the resolution
        ups = [u if u.shape[-3:] == target else F.interpolate(u, size=target, mode="trilinear") for u in ups]
        return self.logits(self.fuse(torch.cat(ups, 1)))


class Window3DModel(nn.Module):
    """Frozen slice-wise encoder + depth embedding + :class:`VolumetricDPTDecoder`.

    ``forward(x [B, 1, D, H, W]) -> logits [B, C, D, H, W]``. ``encode`` (frozen, no autograd) and ``decode``
    (trainable) are separate so training can reuse a cube's encoder features between the two passes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: Window3DConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = freeze(backbone)
        self.layers = resolve_layers(cfg.layers, len(backbone.blocks), cfg.reference_depth)
        e = backbone.embed_dim
        self.depth_embed = (
            nn.Parameter(torch.zeros(len(self.layers), e, cfg.design_depth)) if cfg.depth_embedding else None
        )
        if self.depth_embed is not None:
            nn.init.trunc_normal_(self.depth_embed, std=0.02)
        self.decoder = VolumetricDPTDecoder(e, len(self.layers), num_classes, cfg)

    def train(self, mode: bool = True) -> "Window3DModel":
        super().train(mode)
        self.backbone.eval()  # frozen: LayerScale/drop-path/dropout always in inference mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x ``[B, 1, D, H, W]`` -> per level ``[B, E, D, h, w]`` (each slice encoded independently, "boxing")."""
        b, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        if self.cfg.slice_size:
            slices = F.interpolate(slices, size=(self.cfg.slice_size,) * 2, mode="bilinear", align_corners=False)
        feats = encode_slices(self.backbone, slices, self.layers, self.cfg.encoder_chunk_size)
        return [f.reshape(b, d, *f.shape[1:]).permute(0, 2, 1, 3, 4).contiguous() for f in feats]

    def add_depth_embedding(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Add the learnable depth embedding, linearly interpolated from ``design_depth`` to the input depth."""
        if self.depth_embed is None:
            return feats
        depth = feats[0].shape[2]
        emb = self.depth_embed
        if depth != emb.shape[-1]:
            emb = F.interpolate(emb, size=depth, mode="linear", align_corners=True)
        return [f + emb[i][None, :, :, None, None] for i, f in enumerate(feats)]

    def decode(self, feats: list[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        """Trainable part: features -> logits ``[B, C, *out_size]``."""
        logits = self.decoder(self.add_depth_embedding(feats))
        if tuple(logits.shape[-3:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="trilinear", align_corners=False)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[-3:])


# ---------------------------------------------------------------- sub-cube disassembly and two-pass training
def cube_slices(shape: Sequence[int], cubes_per_axis: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """Non-overlapping sub-cubes tiling a ``[D, H, W]`` volume, ``cubes_per_axis`` per axis (equal parts)."""
    per_axis = []
    for n, k in zip(shape, cubes_per_axis):
        if k < 1 or n % k:
            raise ValueError(f"a size of {n} cannot be split into {k} equal sub-cubes; change crop_size or cubes")
        step = n // k
        per_axis.append([slice(i * step, (i + 1) * step) for i in range(k)])
    return [tuple(c) for c in itertools.product(*per_axis)]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PassOne:
    """Result of pass 1: the global loss, the reassembled logits and ``dL/dY`` (all detached)."""

    loss: torch.Tensor
    logits: torch.Tensor
    grad_logits: torch.Tensor
    cubes: list[tuple[slice, slice, slice]]
    features: list[list[torch.Tensor] | None]


def two_pass_first(
    model: Window3DModel, volume: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
    cubes_per_axis: Sequence[int], reuse_encoder_features: bool = True,
) -> PassOne:
    """Pass 1: every cube without autograd through the network, reassembled into ``Y [B, C, D, H, W]``;
    ``L = loss_fn(Y, target)`` and ``dL/dY`` (autograd on the loss only)."""
    cubes = cube_slices(volume.shape[-3:], cubes_per_axis)
    features: list[list[torch.Tensor] | None] = []
    full: torch.Tensor | None = None
    with torch.no_grad():
        for sl in cubes:
            cube = volume[(Ellipsis, *sl)]
            feats = model.encode(cube)
            logits = model.decode(feats, cube.shape[-3:])
            if full is None:
                full = logits.new_zeros((*logits.shape[:2], *volume.shape[-3:]))
            full[(Ellipsis, *sl)] = logits
            features.append(feats if reuse_encoder_features else None)
    assert full is not None
    with torch.enable_grad():
        full.requires_grad_(True)
        loss = loss_fn(full, target)
        (grad_full,) = torch.autograd.grad(loss, full)
    return PassOne(loss.detach(), full.detach(), grad_full, cubes, features)


def two_pass_second(model: Window3DModel, volume: torch.Tensor, first: PassOne, grad_scale: torch.Tensor | float = 1.0
                    ) -> None:
    """Pass 2: re-run each cube with autograd and back-propagate ``grad_scale * dL/dY[cube]``; gradients
    accumulate in ``.grad`` (only one cube's graph is alive at a time)."""
    with torch.enable_grad():
        for sl, feats in zip(first.cubes, first.features):
            cube = volume[(Ellipsis, *sl)]
            if feats is None:
                feats = model.encode(cube)
            logits = model.decode(feats, cube.shape[-3:])
            logits.backward(first.grad_logits[(Ellipsis, *sl)] * grad_scale)
            del logits


def two_pass_backward(
    model: Window3DModel, volume: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
    cubes_per_axis: Sequence[int], reuse_encoder_features: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate parameter gradients of ``loss_fn(reassembled prediction, target)`` cube by cube.

    volume: ``[B, 1, D, H, W]``; target: ``[B, D, H, W]``. Pass 1 (no autograd): every cube's logits are written
    into the full prediction ``Y``; ``L = loss_fn(Y, target)`` is differentiated w.r.t. ``Y`` only. Pass 2: each
    cube is re-run with autograd and ``backward(dL/dY[cube])`` adds ``J_cube^T dL/dY[cube]`` to ``.grad``; the sum
    over cubes is exactly ``dL/dtheta``. The caller takes one optimizer step. Returns (loss, detached logits).
    With ``reuse_encoder_features`` the frozen encoder runs once per cube (its output is the same in both passes).
    """
    first = two_pass_first(model, volume, target, loss_fn, cubes_per_axis, reuse_encoder_features)
    two_pass_second(model, volume, first)
    return first.loss, first.logits


class _TwoPassLoss(torch.autograd.Function):
    """A scalar equal to the pass-1 loss whose ``backward`` runs pass 2.

    Lets the common training loop (``loss.backward()``, AMP loss scaling, clipping, one optimizer step) drive the
    two-pass scheme unchanged: the incoming gradient (the AMP scale, or 1) multiplies ``dL/dY``. The ``anchor``
    (any trainable parameter) only makes the output part of the autograd graph; it receives no gradient here.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, loss: torch.Tensor, run_second_pass) -> torch.Tensor:  # noqa: ANN001
        ctx.run_second_pass = run_second_pass
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001
        ctx.run_second_pass(grad_output)
        return None, None, None


def two_pass_loss(model: Window3DModel, volume: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
                  cubes_per_axis: Sequence[int], reuse_encoder_features: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) for a training loop that calls ``loss.backward()``: pass 1 now, pass 2 inside backward."""
    first = two_pass_first(model, volume, target, loss_fn, cubes_per_axis, reuse_encoder_features)
    if not torch.is_grad_enabled():
        return first.loss, first.logits
    anchor = next(p for p in model.parameters() if p.requires_grad)
    loss = _TwoPassLoss.apply(anchor, first.loss, lambda scale: two_pass_second(model, volume, first, scale))
    return loss, first.logits


def assemble_cubes(parts: Sequence[torch.Tensor], cubes_per_axis: Sequence[int]) -> torch.Tensor:
    """Reassemble per-cube logits (``[B, C, d, h, w]`` each, in :func:`cube_slices` order) into ``[B, C, D, H, W]``
    with autograd tracking and without per-cube copies of the full volume."""
    kd, kh, kw = cubes_per_axis
    grid = torch.stack(list(parts)).unflatten(0, (kd, kh, kw))  # [kd, kh, kw, B, C, d, h, w]
    b, c, d, h, w = grid.shape[3:]
    return grid.permute(3, 4, 0, 5, 1, 6, 2, 7).reshape(b, c, kd * d, kh * h, kw * w)


def single_graph_backward(
    model: Window3DModel, volume: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
    cubes_per_axis: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`two_pass_backward`: all cubes in one autograd graph, one ``backward`` (all cube
    activations alive at once). Same loss, same parameter gradients, more memory."""
    slices = cube_slices(volume.shape[-3:], cubes_per_axis)
    full = assemble_cubes([model(volume[(Ellipsis, *sl)]) for sl in slices], cubes_per_axis)
    loss = loss_fn(full, target)
    loss.backward()
    return loss.detach(), full.detach()


# ---------------------------------------------------------------- inference
def cubewise_logits(model: Window3DModel, window: torch.Tensor, cubes_per_axis: Sequence[int]) -> torch.Tensor:
    """Logits of a window ``[B, 1, D, H, W]`` decoded cube by cube exactly as in training (reassembled)."""
    cubes = cube_slices(window.shape[-3:], cubes_per_axis)
    return assemble_cubes([model(window[(Ellipsis, *sl)]) for sl in cubes], cubes_per_axis)


@torch.no_grad()
def predict_volume(
    model: Window3DModel, volume: torch.Tensor, crop_size: Sequence[int], cubes_per_axis: Sequence[int],
    overlap: float, gaussian: bool, logits: bool = False,
) -> torch.Tensor:
    """Class probabilities ``[C, Z, Y, X]`` (CPU float32; the blended logits with ``logits=True``) for a whole
    preprocessed volume ``[Z, Y, X]``.

    Windows of ``crop_size`` slide over the volume with ``overlap`` (MONAI's sliding-window inferer, Gaussian
    or constant blending of logits, zero padding for small volumes); each window is disassembled into the
    training sub-cubes and reassembled (:func:`cubewise_logits`).
    """
    from monai.inferers import sliding_window_inference

    model.eval()
    x = volume.float()[None, None]
    out = sliding_window_inference(
        x, roi_size=tuple(int(s) for s in crop_size), sw_batch_size=1,
        predictor=lambda w: cubewise_logits(model, w, cubes_per_axis), overlap=overlap,
        mode="gaussian" if gaussian else "constant", padding_mode="constant")[0].float()
    return (out if logits else out.softmax(0)).cpu()


# ---------------------------------------------------------------- recipe for the common finetune pipeline
def _head_cfg(cfg) -> Window3DConfig:
    from omegaconf import OmegaConf

    return Window3DConfig.from_dict(OmegaConf.to_container(cfg.head, resolve=True))


def build_model(cfg, n_classes: int) -> Window3DModel:
    """Frozen backbone from ``cfg.model`` (``--checkpoint``) + depth embedding + 3-D decoder."""
    from finetune.heads.common import build_backbone_from_cfg

    return Window3DModel(build_backbone_from_cfg(cfg), n_classes, _head_cfg(cfg))


def training_step(model: nn.Module, batch: dict, loss_fn: LossFn, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass step on a ``slab3d`` batch (``image [B, 1, D, H, W]``, ``label [B, D, H, W]``).

    The returned loss's ``backward()`` runs pass 2 (see :class:`_TwoPassLoss`). Under DDP every cube's backward
    would trigger an all-reduce; wrap the model with ``no_sync`` or use ``cubes_per_axis: [1, 1, 1]`` there.
    """
    net = getattr(model, "module", model)
    return two_pass_loss(net, batch["image"], batch["label"], loss_fn, list(cfg.head.cubes_per_axis),
                         bool(cfg.head.reuse_encoder_features))


def recipe_predict_volume(model: nn.Module, volume: torch.Tensor, cfg, plans) -> torch.Tensor:
    crop = (int(cfg.data.slab_depth), *[int(s) for s in plans.patch_size])
    return predict_volume(getattr(model, "module", model), volume, crop, list(cfg.head.cubes_per_axis),
                          float(cfg.head.infer_overlap), bool(cfg.head.infer_gaussian), logits=True)


def _recipe():
    from finetune.heads import HeadRecipe

    return HeadRecipe(name="window3d", build_model=build_model, sampling="slab3d",
                      training_step=training_step, predict_volume=recipe_predict_volume,
                      description="frozen 2-D DINOv3 slice encoder -> 3-D window decoder, two-pass sub-cube training")


RECIPE = _recipe()
