"""Student / teacher / Gram teacher and what happens in one SSL step (DINOv3 recipe, MedDINOv3 stages 1-3).

- ``student`` and ``teacher``: ``nn.ModuleDict(backbone, dino_head, ibot_head)``; the teacher is an EMA of the
  student, gets no gradients, and sees only the global crops.
- Teacher targets: Sinkhorn-Knopp centring (``dino.sinkhorn_iterations``, 3) of the DINO-head logits of the class
  tokens and of the iBOT-head logits of the patches the student sees masked (rows spread over all ranks).
- Losses (:meth:`SSLMetaArch.compute_losses`): DINO over crop pairs, the global and local terms weighted by their
  share of pairs; iBOT on masked patches; KoLeo on the student's pre-head class tokens, per global crop over the
  per-rank batch and summed over crops; optional Gram anchoring against a frozen Gram teacher that sees the same
  global crops at a higher resolution. Total = eq. (1) (stage 1) or eq. (3) (stages 2-3) with config weights.

The meta-architecture reads the config once, at construction (:meth:`SSLMetaArch.from_config` builds the typed
:class:`ModelSettings` and :class:`LossSettings`); a step reads only those. Each network's forward is one
``nn.Module.forward`` (:class:`StudentForward`, :class:`TeacherForward`, :class:`GramTeacherForward`), owned by the
meta-architecture in :attr:`SSLMetaArch.forwards`, so DDP / FSDP2 wrap exactly what a step calls
(:meth:`SSLMetaArch.wrap_forwards`) without touching this file's logic.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from meddino_common.precision import autocast
from pretrain.losses import dino_loss, gram_loss, ibot_loss, koleo_loss, resize_patch_grid, sinkhorn_knopp
from pretrain.models import build_backbone
from pretrain.models.heads import DINOHead


@dataclass(frozen=True)
class HeadSettings:
    """One projection head (``dino.head_*`` / ``ibot.head_*``)."""

    n_prototypes: int
    hidden_dim: int
    bottleneck_dim: int
    n_layers: int

    @classmethod
    def from_config(cls, block) -> "HeadSettings":
        return cls(int(block.head_n_prototypes), int(block.head_hidden_dim), int(block.head_bottleneck_dim),
                   int(block.head_nlayers))

    def build(self, embed_dim: int) -> DINOHead:
        return DINOHead(embed_dim, out_dim=self.n_prototypes, hidden_dim=self.hidden_dim,
                        bottleneck_dim=self.bottleneck_dim, n_layers=self.n_layers)


@dataclass(frozen=True)
class ModelSettings:
    """What is built: the student architecture (``student.*``), the two heads, and whether a Gram teacher exists.
    No defaults here: the YAML is the one source of every value."""

    arch: str
    backbone_overrides: dict[str, Any]  # build_backbone keywords (student.overrides)
    drop_path_rate: float
    dino_head: HeadSettings
    ibot_head: HeadSettings
    use_gram: bool

    @classmethod
    def from_config(cls, cfg) -> "ModelSettings":
        return cls(arch=str(cfg.student.arch), backbone_overrides=backbone_overrides(cfg.student),
                   drop_path_rate=float(cfg.student.drop_path_rate),
                   dino_head=HeadSettings.from_config(cfg.dino), ibot_head=HeadSettings.from_config(cfg.ibot),
                   use_gram=bool(cfg.gram.use_loss))

    def backbone_kwargs(self, drop_path: bool = True) -> dict[str, Any]:
        """``build_backbone`` keywords; ``drop_path=False`` for frozen copies (teachers never drop paths)."""
        return {**self.backbone_overrides, "drop_path_rate": self.drop_path_rate if drop_path else 0.0}


def backbone_overrides(student_cfg) -> dict[str, Any]:
    """``student.overrides`` as a plain dict (architecture keywords besides the preset)."""
    return {str(k): v for k, v in (student_cfg.overrides or {}).items()}


@dataclass(frozen=True)
class LossSettings:
    """How a step's losses are formed (``dino.*``, ``ibot.*``, ``gram.*``, ``crops.global_crops_number``).

    ``gram_weight`` is the fixed weight; a ``schedules.gram_weight`` block overrides it per iteration.
    No defaults here: the YAML is the one source of every value."""

    n_global: int
    dino_weight: float
    dino_student_temp: float
    global_ignore_diagonal: bool
    koleo_weight: float
    ibot_weight: float
    ibot_student_temp: float
    sinkhorn_iterations: int
    use_gram: bool
    gram_weight: float
    gram_img_level: bool
    gram_normalized: bool
    gram_remove_neg: bool
    gram_resize_method: str
    gram_resize_antialias: bool

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        return cls(
            n_global=int(cfg.crops.global_crops_number),
            dino_weight=float(cfg.dino.loss_weight), dino_student_temp=float(cfg.dino.student_temp),
            global_ignore_diagonal=bool(cfg.dino.global_ignore_diagonal),
            koleo_weight=float(cfg.dino.koleo_loss_weight),
            ibot_weight=float(cfg.ibot.loss_weight), ibot_student_temp=float(cfg.ibot.student_temp),
            sinkhorn_iterations=int(cfg.dino.sinkhorn_iterations),
            use_gram=bool(cfg.gram.use_loss), gram_weight=float(cfg.gram.loss_weight),
            gram_img_level=bool(cfg.gram.img_level), gram_normalized=bool(cfg.gram.normalized),
            gram_remove_neg=bool(cfg.gram.remove_neg), gram_resize_method=str(cfg.gram.resize_method),
            gram_resize_antialias=bool(cfg.gram.resize_antialias),
        )


class StudentForward(nn.Module):
    """The student's whole forward as one module (the unit that DDP / FSDP2 wrap).

    ``forward(global_crops[n_g*B,3,G,G], local_crops[n_l*B,3,L,L] | None, masks[n_g*B,N], mask_indices[M])``
    returns a dict: ``global_cls [n_g*B,D]``, ``global_patches [n_g*B,N,D]``, ``global_logits [n_g*B,K]``,
    ``local_logits [n_l*B,K]`` (or None), ``masked_patch_logits [M,K_ibot]``.
    """

    def __init__(self, student: nn.ModuleDict) -> None:
        super().__init__()
        self.student = student

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor, mask_indices: Tensor) -> dict:
        backbone = self.student["backbone"]
        crops, crop_masks = [global_crops], [masks]
        if local_crops is not None and local_crops.shape[0] > 0:
            crops.append(local_crops)
            crop_masks.append(None)
        outs = backbone.forward_features_list(crops, crop_masks)
        g_cls = outs[0]["x_norm_clstoken"]
        g_patch = outs[0]["x_norm_patchtokens"]
        cls_tokens = [g_cls] + ([outs[1]["x_norm_clstoken"]] if len(outs) > 1 else [])
        logits = self.student["dino_head"](torch.cat(cls_tokens, dim=0))
        n_global = g_cls.shape[0]
        masked = g_patch.flatten(0, 1).index_select(0, mask_indices)  # [M, D]; may be empty, stays in the graph
        return {
            "global_cls": g_cls,
            "global_patches": g_patch,
            "global_logits": logits[:n_global],
            "local_logits": logits[n_global:] if len(outs) > 1 else None,
            "masked_patch_logits": self.student["ibot_head"](masked),
        }


class TeacherForward(nn.Module):
    """Teacher (EMA) forward on the global crops: class-token and masked-patch logits, no gradients.

    Returns ``cls_logits [n_g*B,K]``, ``masked_patch_logits [M,K_ibot]``.
    """

    def __init__(self, teacher: nn.ModuleDict) -> None:
        super().__init__()
        self.teacher = teacher

    @torch.no_grad()
    def forward(self, global_crops: Tensor, mask_indices: Tensor) -> dict:
        out = self.teacher["backbone"].forward_features(global_crops)
        masked = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return {
            "cls_logits": self.teacher["dino_head"](out["x_norm_clstoken"]),
            "masked_patch_logits": self.teacher["ibot_head"](masked),
        }


class GramTeacherForward(nn.Module):
    """Gram teacher final-normed patch tokens ``[n_g*B, N, D]`` of its crops, no gradients."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.forward_features(images)["x_norm_patchtokens"]


@dataclass(frozen=True)
class ForwardModules:
    """The modules a step calls. They share parameters with ``student`` / ``teacher`` / ``gram_teacher`` and are
    not registered as submodules (no duplicate state-dict entries); :meth:`SSLMetaArch.wrap_forwards` swaps them
    for their DDP / FSDP2-wrapped versions."""

    student: nn.Module
    teacher: nn.Module
    gram: nn.Module | None


@dataclass
class StepOutput:
    """Total loss (with graph) and detached per-term values for logging."""

    loss: Tensor
    logs: dict[str, float]


class SSLMetaArch(nn.Module):
    """Holds ``student``, ``teacher`` and (stages 2-3) ``gram_teacher``; computes one step's losses.

    Built from typed settings (:meth:`from_config` reads the config once); the forward modules it calls live in
    :attr:`forwards` (plain modules in one process, wrapped by :func:`pretrain.train.parallel.wrap_model`).
    """

    def __init__(self, model: ModelSettings, losses: LossSettings) -> None:
        super().__init__()
        if model.use_gram != losses.use_gram:
            raise ValueError("ModelSettings.use_gram and LossSettings.use_gram disagree")
        self.model_settings, self.losses = model, losses
        backbone = build_backbone(model.arch, **model.backbone_kwargs())
        self.embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_size
        self.n_blocks = backbone.n_blocks
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": model.dino_head.build(self.embed_dim),
                                      "ibot_head": model.ibot_head.build(self.embed_dim)})
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

        self.use_gram = model.use_gram
        if self.use_gram:
            self.gram_teacher = build_backbone(model.arch, **model.backbone_kwargs(drop_path=False))
            self.gram_teacher.requires_grad_(False)
        else:
            self.gram_teacher = None
        self.gram_teacher_initialized = False
        self.gram_refreshes_done = 0
        object.__setattr__(self, "forwards", ForwardModules(  # not submodules: see ForwardModules
            StudentForward(self.student), TeacherForward(self.teacher),
            GramTeacherForward(self.gram_teacher) if self.gram_teacher is not None else None))

    @classmethod
    def from_config(cls, cfg) -> "SSLMetaArch":
        return cls(ModelSettings.from_config(cfg), LossSettings.from_config(cfg))

    # ------------------------------------------------------------------ set-up
    def wrap_forwards(self, wrap: Callable[[str, nn.Module], nn.Module]) -> None:
        """Replace each forward module by ``wrap(name, module)`` (name: ``student`` | ``teacher`` | ``gram``)."""
        f = self.forwards
        object.__setattr__(self, "forwards", replace(
            f, student=wrap("student", f.student), teacher=wrap("teacher", f.teacher),
            gram=wrap("gram", f.gram) if f.gram is not None else None))

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def sync_teacher_from_student(self) -> None:
        """Teacher := student (start of a run, after loading initial weights)."""
        self.teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def load_backbone_weights(self, state_dict: dict[str, Tensor], source: str) -> None:
        """Load a flat official-layout backbone state dict into student and teacher backbones (strict)."""
        try:
            self.student["backbone"].load_state_dict(state_dict, strict=True)
            self.teacher["backbone"].load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"{source}: backbone weights do not fit the configured architecture "
                f"(student.arch={self.model_settings.arch}, overrides={self.model_settings.backbone_overrides}): "
                f"{err}"
            ) from err

    @torch.no_grad()
    def load_gram_teacher(self, state_dict: dict[str, Tensor], source: str) -> None:
        if self.gram_teacher is None:
            raise RuntimeError("gram.use_loss is false: there is no Gram teacher to load")
        try:
            self.gram_teacher.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise RuntimeError(f"{source}: Gram-teacher weights do not fit the configured backbone: {err}") from err
        self.gram_teacher_initialized = True

    @torch.no_grad()
    def refresh_gram_teacher_from_ema(self) -> None:
        """Gram teacher := current EMA teacher backbone (DINOv3's repeated Gram-teacher update)."""
        if self.gram_teacher is None:
            return
        self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())
        self.gram_teacher_initialized = True

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``teacher = momentum * teacher + (1 - momentum) * student`` over all parameters."""
        student_params = [p for p in self.student.parameters()]
        teacher_params = [p for p in self.teacher.parameters()]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    # ------------------------------------------------------------------ one step
    def gram_teacher_patches(self, gram_crops: Tensor, student_grid: int) -> Tensor:
        """Gram-teacher final-normed patch tokens of the (higher-resolution) global crops, resized to the student
        grid: ``[n_g*B, student_grid**2, D]``."""
        if not self.gram_teacher_initialized:
            raise RuntimeError(
                "Gram loss is on but the Gram teacher was never loaded: set gram.teacher.source "
                "(checkpoint / stage1_iteration / ema) in the config"
            )
        with torch.no_grad():
            patches = self.forwards.gram(gram_crops)
        return resize_patch_grid(patches, student_grid**2, mode=self.losses.gram_resize_method,
                                 antialias=self.losses.gram_resize_antialias)

    def forward_backward(
        self,
        batch: dict,
        *,
        teacher_temp: float,
        gram_weight: float | None = None,
        dino_local_weight: float | None = None,
        loss_scale: float = 1.0,
        device: torch.device | None = None,
        precision: str = "fp32",
        process_group=None,
    ) -> StepOutput:
        """Forward student/teacher(/Gram teacher) on one (micro-)batch, compute the losses and backpropagate
        ``loss * loss_scale`` (``1 / grad_accum_steps``). ``process_group`` carries Sinkhorn-Knopp's sums over
        ranks (None: the default group)."""
        device = device or next(self.student.parameters()).device
        n_global = self.losses.n_global
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local = batch.get("collated_local_crops", None)
        local_crops = local.to(device, non_blocking=True) if local is not None and local.numel() > 0 else None
        masks = batch["collated_masks"].to(device, non_blocking=True).bool()
        mask_indices = batch["mask_indices_list"].to(device, non_blocking=True).long()
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)
        if global_crops.shape[0] % n_global:
            raise ValueError(f"{global_crops.shape[0]} global crops are not a multiple of {n_global} crops per image")
        B = global_crops.shape[0] // n_global
        n_local = 0 if local_crops is None else local_crops.shape[0] // B

        with autocast(precision, device):
            teacher_out = self.forwards.teacher(global_crops, mask_indices)
            student_out = self.forwards.student(global_crops, local_crops, masks, mask_indices)
            gram_patches = None
            if self.use_gram:
                gram_crops = batch.get("collated_gram_teacher_crops", None)
                if gram_crops is None:
                    raise ValueError(
                        "gram.use_loss is true but the batch has no collated_gram_teacher_crops: "
                        "set crops.gram_teacher_crops_size"
                    )
                grid = global_crops.shape[-1] // self.patch_size
                gram_patches = self.gram_teacher_patches(gram_crops.to(device, non_blocking=True), grid)

        n_iter = self.losses.sinkhorn_iterations
        teacher_cls_probs = sinkhorn_knopp(teacher_out["cls_logits"].float(), teacher_temp, n_iter, process_group)
        teacher_cls_probs = teacher_cls_probs.unflatten(0, (n_global, B))  # [n_g, B, K]
        teacher_patch_probs = sinkhorn_knopp(teacher_out["masked_patch_logits"].float(), teacher_temp, n_iter,
                                             process_group)

        total, logs = self.compute_losses(
            student_out=student_out,
            teacher_cls_probs=teacher_cls_probs,
            teacher_patch_probs=teacher_patch_probs,
            masks_weight=masks_weight,
            n_global=n_global,
            n_local=n_local,
            batch_size=B,
            gram_patches=gram_patches,
            gram_weight=gram_weight,
            dino_local_weight=dino_local_weight,
        )
        # collapse diagnostic: per-image entropy (nats) of the teacher's DINO targets; log K = uniform collapse
        plogp = teacher_cls_probs * teacher_cls_probs.clamp_min(1e-12).log()
        logs["teacher_cls_entropy"] = float(-plogp.sum(-1).mean())
        (total * loss_scale).backward()
        return StepOutput(loss=total.detach(), logs=logs)

    def compute_losses(
        self,
        *,
        student_out: dict,
        teacher_cls_probs: Tensor,
        teacher_patch_probs: Tensor,
        masks_weight: Tensor,
        n_global: int,
        n_local: int,
        batch_size: int,
        gram_patches: Tensor | None,
        gram_weight: float | None,
        dino_local_weight: float | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted sum of the loss terms (eq. 1 / eq. 3) and their detached values. ``dino_local_weight`` is
        DINOv3's per-iteration factor on the local-crop DINO term (``schedules.dino_local_weight``; None = 1)."""
        L = self.losses
        B = batch_size
        student_temp = L.dino_student_temp
        ignore_diag = L.global_ignore_diagonal
        global_terms = n_global * (n_global - 1) if ignore_diag else n_global * n_global
        local_terms = n_global * n_local
        global_scale = global_terms / (global_terms + local_terms)
        local_scale = local_terms / (global_terms + local_terms)
        w_dino = L.dino_weight
        logs: dict[str, float] = {}

        student_global_logits = student_out["global_logits"].unflatten(0, (n_global, B))  # [n_g, B, K]
        dino_global = dino_loss(student_global_logits, teacher_cls_probs, student_temp, ignore_diagonal=ignore_diag)
        total = w_dino * global_scale * dino_global
        logs["dino_global_loss"] = float(dino_global.detach())
        if n_local > 0:
            student_local_logits = student_out["local_logits"].unflatten(0, (n_local, B))  # [n_l, B, K]
            dino_local = dino_loss(student_local_logits, teacher_cls_probs, student_temp)
            w_local = 1.0 if dino_local_weight is None else float(dino_local_weight)
            total = total + w_dino * local_scale * w_local * dino_local
            logs["dino_local_loss"] = float(dino_local.detach())
            logs["dino_local_weight"] = w_local

        w_koleo = L.koleo_weight
        if w_koleo > 0:
            cls = student_out["global_cls"].unflatten(0, (n_global, B))  # [n_g, B, D]
            koleo = sum(koleo_loss(cls[i]) for i in range(n_global))
            total = total + w_koleo * koleo
            logs["koleo_loss"] = float(koleo.detach())

        w_ibot = L.ibot_weight
        student_patch_logits = student_out["masked_patch_logits"]
        if student_patch_logits.shape[0] > 0:
            ibot = ibot_loss(
                student_patch_logits,
                teacher_patch_probs,
                masks_weight,
                n_images=n_global * B,
                student_temp=L.ibot_student_temp,
            )
        else:  # no masked patch in this batch: keep the head in the graph for DDP
            ibot = student_patch_logits.sum() * 0.0
        total = total + w_ibot * ibot
        logs["ibot_loss"] = float(ibot.detach())

        if gram_patches is not None:
            w_gram = L.gram_weight if gram_weight is None else float(gram_weight)
            gram = gram_loss(student_out["global_patches"], gram_patches, img_level=L.gram_img_level,
                             normalize=L.gram_normalized, remove_neg=L.gram_remove_neg)
            total = total + w_gram * gram
            logs["gram_loss"] = float(gram.detach())
            logs["gram_weight"] = w_gram
        logs["total_loss"] = float(total.detach())
        return total, logs

