"""DINO-MVR (``dino-mvr.md``): multi-view readout of a frozen DINOv3 for annotation-efficient segmentation.

Training: the backbone is frozen; only light MLP probes on the patch features of the last three blocks learn
(:class:`MVRProbeModel`). Inference (:func:`predict_multiview`): every slice is read at several input
resolutions and test-time flips; the per-view probability maps are fused per pixel with entropy weights
(lower entropy -> higher weight), then regularised (:func:`spatial_regularize`: in-plane Gaussian smoothing,
small-component removal) and, for volumes, smoothed along z (:func:`smooth_along_z`). Ablation switches
(``head.single_view``, ``head.entropy_weighting``, ``head.z_smoothing``) turn each piece off.

Few-shot protocol: ``head.few_shot_k = k`` trains on k labelled cases of the fold's training split (a seeded
choice, see :func:`few_shot_subset`); :func:`few_shot_recovery` compares that run's ``summary.json`` with the
full-data run's and reports the fraction of the score recovered (``python -m finetune.heads.mvr``).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from finetune.heads.common import freeze
from meddino_common.seeding import seeded_rng
from finetune.heads.readout_utils import crop_to, pad_to_multiple, to_three_channels


@dataclass
class MVRConfig:
    """Head hyperparameters (``configs/finetune/heads/mvr.yaml``, block ``head``)."""

    n_last_blocks: int = 3
    hidden_dim: int = 256
    dropout: float = 0.1
    probe_mode: str = "per_block"  # "per_block": one MLP per block, logits averaged | "concat": one MLP on [f1;f2;f3]
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25])
    flips: list[list[int]] = field(default_factory=lambda: [[], [-1], [-2]])
    single_view: bool = False
    entropy_weighting: bool = True
    entropy_temperature: float = 0.25
    spatial_regularization: bool = True
    inplane_sigma_px: float = 1.0
    min_component_voxels: int = 0
    z_smoothing: bool = True
    z_sigma_slices: float = 1.0
    slice_batch_size: int = 4
    few_shot_k: int | None = None
    few_shot_seed: int = 0

    @classmethod
    def from_cfg(cls, head_cfg: dict) -> "MVRConfig":
        """From the (plain-dict) ``head`` block, strictly (`finetune.heads.common.head_settings`)."""
        from finetune.heads.common import head_settings

        return head_settings(cls, head_cfg)


class MVRProbeModel(nn.Module):
    """Frozen backbone + MLP probes (1x1 convs on the patch grid) on the last ``n_last_blocks`` blocks.

    ``forward(x [B, 1|3, H, W]) -> logits [B, C, H, W]``: features ``[B, E, H/p, W/p]`` per block (final norm,
    no autograd into the backbone), probe logits at patch resolution, bilinearly upsampled to the input size.
    Inputs that are not multiples of the patch size are padded and the logits cropped back.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: MVRConfig) -> None:
        super().__init__()
        if cfg.probe_mode not in ("per_block", "concat"):
            raise ValueError(f"head.probe_mode must be 'per_block' or 'concat', got {cfg.probe_mode!r}")
        self.cfg = cfg
        self.backbone = freeze(backbone)
        e = backbone.embed_dim
        n_probes = cfg.n_last_blocks if cfg.probe_mode == "per_block" else 1
        in_dim = e if cfg.probe_mode == "per_block" else e * cfg.n_last_blocks
        self.probes = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, cfg.hidden_dim, 1), nn.GELU(), nn.Dropout2d(cfg.dropout),
                          nn.Conv2d(cfg.hidden_dim, num_classes, 1))
            for _ in range(n_probes))

    def train(self, mode: bool = True) -> "MVRProbeModel":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch features of the last ``n_last_blocks`` blocks, each ``[B, E, H/p, W/p]`` (frozen)."""
        return list(self.backbone.get_intermediate_layers(
            to_three_channels(x), n=self.cfg.n_last_blocks, reshape=True, norm=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.backbone.patch_size
        x, sizes = pad_to_multiple(x, [p, p])
        feats = self.features(x)
        if self.cfg.probe_mode == "concat":
            logits = self.probes[0](torch.cat(feats, 1))
        else:
            logits = torch.stack([probe(f) for probe, f in zip(self.probes, feats)]).mean(0)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return crop_to(logits, sizes)


# ---------------------------------------------------------------- multi-view inference
def view_list(cfg: MVRConfig) -> list[tuple[float, tuple[int, ...]]]:
    """(scale, flip dims) pairs; ``single_view`` keeps only the native resolution without flips."""
    if cfg.single_view:
        return [(1.0, ())]
    return [(float(s), tuple(int(d) for d in f)) for s in cfg.scales for f in cfg.flips]


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-pixel Shannon entropy divided by ``log C``: ``[..., C, H, W] -> [..., H, W]`` in [0, 1]."""
    c = probs.shape[-3]
    return -(probs * probs.clamp_min(1e-12).log()).sum(-3) / math.log(max(c, 2))


def entropy_fusion(view_probs: torch.Tensor, temperature: float, weighted: bool = True) -> torch.Tensor:
    """Fuse ``[V, N, C, H, W]`` view probabilities into ``[N, C, H, W]``.

    Weights per pixel: ``w_v = softmax_v(-H_v / temperature)`` with ``H_v`` the normalised entropy of view v,
    so confident views dominate where they are confident. ``weighted=False`` is the plain mean (ablation).
    """
    if not weighted:
        return view_probs.mean(0)
    weights = torch.softmax(-normalized_entropy(view_probs) / temperature, dim=0)  # [V, N, H, W]
    return (weights.unsqueeze(2) * view_probs).sum(0)


@torch.no_grad()
def predict_multiview(model: MVRProbeModel, slices: torch.Tensor, cfg: MVRConfig) -> torch.Tensor:
    """Fused class probabilities ``[N, C, H, W]`` for slices ``[N, 1|3, H, W]`` (no regularisation yet).

    Each view resizes the slices by its scale (rounded to whole patches), flips, predicts, undoes the flip and
    resizes the probabilities back to ``H x W``.
    """
    model.eval()
    h, w = slices.shape[-2:]
    p = model.backbone.patch_size
    views = []
    for scale, flip in view_list(cfg):
        size = (max(p, round(h * scale / p) * p), max(p, round(w * scale / p) * p)) if scale != 1.0 else (h, w)
        x = slices if size == (h, w) else F.interpolate(slices, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = x.flip(flip)
        probs = model(x).float().softmax(1)
        if flip:
            probs = probs.flip(flip)
        if size != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        views.append(probs)
    return entropy_fusion(torch.stack(views), cfg.entropy_temperature, cfg.entropy_weighting)


def smooth_along_z(probs: np.ndarray, sigma_slices: float) -> np.ndarray:
    """Gaussian smoothing of ``[C, Z, Y, X]`` probabilities along Z (renormalised; volumes of 1 slice pass)."""
    if probs.shape[1] < 2 or sigma_slices <= 0:
        return probs
    out = ndimage.gaussian_filter1d(probs, sigma=sigma_slices, axis=1, mode="nearest")
    return out / np.clip(out.sum(0, keepdims=True), 1e-12, None)


def spatial_regularize(probs: np.ndarray, sigma_px: float, min_component_voxels: int) -> np.ndarray:
    """Simple spatial regularisation of ``[C, Z, Y, X]`` probabilities.

    1. In-plane Gaussian smoothing (``sigma_px``) of every class map.
    2. Connected components (3-D, face connectivity) of each foreground class in the argmax smaller than
       ``min_component_voxels`` lose that class (its probability there is set to 0 and the rest renormalised),
       removing speckle. 0 disables step 2.
    """
    if sigma_px > 0:
        probs = ndimage.gaussian_filter(probs, sigma=(0, 0, sigma_px, sigma_px), mode="nearest")
        probs = probs / np.clip(probs.sum(0, keepdims=True), 1e-12, None)
    if min_component_voxels > 0:
        labels = probs.argmax(0)
        for c in range(1, probs.shape[0]):
            comp, n = ndimage.label(labels == c)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())
            small = (sizes < min_component_voxels)
            small[0] = False
            drop = small[comp]
            probs[c][drop] = 0.0
        probs = probs / np.clip(probs.sum(0, keepdims=True), 1e-12, None)
    return probs


@torch.no_grad()
def predict_volume(model: MVRProbeModel, volume: torch.Tensor, cfg: MVRConfig) -> torch.Tensor:
    """Probabilities ``[C, Z, Y, X]`` (CPU float32) for a preprocessed volume ``[Z, Y, X]`` (2-D images: Z = 1).

    Slice-wise multi-view fusion, then z-smoothing (``z_smoothing``) and spatial regularisation
    (``spatial_regularization``).
    """
    slices = volume.float()[:, None]
    chunks = [predict_multiview(model, s, cfg).cpu() for s in torch.split(slices, max(1, cfg.slice_batch_size))]
    probs = torch.cat(chunks).permute(1, 0, 2, 3).numpy()  # [C, Z, Y, X]
    if cfg.z_smoothing:
        probs = smooth_along_z(probs, cfg.z_sigma_slices)
    if cfg.spatial_regularization:
        probs = spatial_regularize(probs, cfg.inplane_sigma_px, cfg.min_component_voxels)
    return torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))


# ---------------------------------------------------------------- few-shot protocol
def few_shot_subset(case_ids: Sequence[str], k: int, seed: int) -> list[str]:
    """k training cases chosen reproducibly: a seeded permutation of the sorted ids, first k (sorted back)."""
    ids = sorted(case_ids)
    if not 1 <= k <= len(ids):
        raise ValueError(f"few_shot_k={k} but the training split has {len(ids)} cases")
    order = seeded_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def _mean_dice(summary: dict) -> float:
    for key in ("mean_dice", "dice"):
        if key in summary:
            return float(summary[key])
    mean = summary.get("paper_mean", summary.get("mean"))
    if isinstance(mean, dict):
        for key in ("dice", "DSC", "dsc"):
            if key in mean:
                return float(mean[key])
    raise KeyError("summary.json has no mean Dice (looked for 'mean_dice', 'dice', 'paper_mean.dice', 'mean.dice')")


def few_shot_recovery(summary_k: Path, summary_full: Path) -> dict:
    """Fraction of the full-data mean Dice recovered by the k-shot run (both ``summary.json`` of run.py)."""
    k_run, full_run = json.loads(Path(summary_k).read_text()), json.loads(Path(summary_full).read_text())
    dice_k, dice_full = _mean_dice(k_run), _mean_dice(full_run)
    return {"dice_k": dice_k, "dice_full": dice_full,
            "recovery": dice_k / dice_full if dice_full > 0 else float("nan"),
            "summary_k": str(summary_k), "summary_full": str(summary_full)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DINO-MVR few-shot report: k-shot vs full-data mean Dice")
    parser.add_argument("summary_k", type=Path, help="summary.json of the run with head.few_shot_k=k")
    parser.add_argument("summary_full", type=Path, help="summary.json of the full-data run")
    args = parser.parse_args(argv)
    report = few_shot_recovery(args.summary_k, args.summary_full)
    print(f"k-shot Dice {report['dice_k']:.4f} / full-data Dice {report['dice_full']:.4f} "
          f"= {100 * report['recovery']:.1f}% recovered")


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------- recipe for the common finetune pipeline
def _head_cfg(cfg) -> MVRConfig:
    from omegaconf import OmegaConf

    return MVRConfig.from_cfg(OmegaConf.to_container(cfg.head, resolve=True))


def build_model(cfg, n_classes: int) -> MVRProbeModel:
    """Frozen backbone from ``cfg.model`` (``--checkpoint``) + MLP probes."""
    from finetune.heads.common import build_backbone_from_cfg

    return MVRProbeModel(build_backbone_from_cfg(cfg), n_classes, _head_cfg(cfg))


def recipe_predict_volume(model: nn.Module, volume: torch.Tensor, cfg, plans) -> torch.Tensor:
    """The fused probabilities' log: the common pipeline resamples logits, and log-probabilities are the logits of
    the fused distribution."""
    return predict_volume(getattr(model, "module", model), volume, _head_cfg(cfg)).clamp_min(1e-8).log()


def fit(cfg, recipe, train_cases, val_cases, output_dir, plans):
    """Common training loop; with ``head.few_shot_k`` only k seeded training cases are used."""
    from finetune.train import fit as common_fit

    k = cfg.head.few_shot_k
    if k is not None:
        keep = set(few_shot_subset([c.case_id for c in train_cases], int(k), int(cfg.head.few_shot_seed)))
        train_cases = [c for c in train_cases if c.case_id in keep]
    return common_fit(cfg, recipe, train_cases, val_cases, output_dir, plans)


def _recipe():
    from finetune.heads import HeadRecipe

    return HeadRecipe(name="mvr", build_model=build_model, sampling="slice2d", predict_volume=recipe_predict_volume,
                      fit=fit, description="DINO-MVR: frozen DINOv3, MLP probes on the last 3 blocks, "
                                           "entropy-weighted multi-view inference")


RECIPE = _recipe()
