"""Measurements of what a pretrained backbone learned: feature health and a frozen-feature segmentation probe.

Shared by the evidence benchmark (``benchmarks/ssl_signal.py``) and its CI variant (``tests/benchmarks``), so
both measure exactly the same things:

- :func:`effective_rank` (RankMe) and :func:`mean_pairwise_cosine`: a collapsed backbone maps every input to
  (almost) the same vector, so its features have effective rank ~1 and pairwise cosine ~1;
- :func:`volume_slices` / :func:`slice_batch` / :func:`backbone_features`: the axial slices of a real CT volume
  through the training-time HU transform, resized to a square input, and the frozen backbone's normed patch and
  class tokens;
- :func:`split_slices`, :func:`fit_linear_probe`, :func:`predict_probe`: a per-patch linear (1x1-conv) classifier
  on frozen patch features, its logits upsampled bilinearly to the label grid, trained with cross-entropy on
  some slices and evaluated on the others (DSC is computed by the caller, e.g. with ``finetune.metrics.dice``);
- :func:`series_summary` and :func:`improved`: a loss / diagnostic trajectory from ``metrics.jsonl`` records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meddino_common.volumes import open_canonical_nifti, ras_to_display, read_voxels


# ---------------------------------------------------------------------------------------------- feature health
def effective_rank(features: Tensor | np.ndarray, eps: float = 1e-12) -> float:
    """RankMe effective rank (Garrido et al., ICML 2023) of ``features`` [N, D]: ``exp(H(p))`` with
    ``p_k = s_k / sum(s)`` over the singular values ``s`` of the (uncentred) feature matrix.

    Between 1 (every row parallel: full collapse) and ``min(N, D)`` (a flat spectrum).
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    if x.ndim != 2 or min(x.shape) < 1:
        raise ValueError(f"effective_rank needs a 2-D [N, D] matrix, got shape {tuple(x.shape)}")
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(features: Tensor | np.ndarray) -> float:
    """Mean cosine similarity over all ordered pairs ``i != j`` of the rows of ``features`` [N, D].

    ~1 when every feature points the same way (collapse). Computed from the sum of unit vectors,
    ``(|sum_i u_i|^2 - N) / (N (N - 1))``, so it costs O(N D) memory.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"mean_pairwise_cosine needs at least 2 rows of [N, D], got shape {tuple(x.shape)}")
    u = F.normalize(x, dim=1)
    n = x.shape[0]
    return float((u.sum(0).square().sum() - n) / (n * (n - 1)))


def sample_rows(features: Tensor, max_rows: int, seed: int) -> Tensor:
    """At most ``max_rows`` rows of ``features`` [N, D], drawn without replacement with a fixed seed."""
    if features.shape[0] <= max_rows:
        return features
    g = torch.Generator().manual_seed(int(seed))
    return features[torch.randperm(features.shape[0], generator=g)[:max_rows]]


# ---------------------------------------------------------------------------------------------- CT slices in
@dataclass
class LabelledVolume:
    """Axial slices of a CT volume in display orientation (row 0 anterior, column 0 patient's right; the CT-3M
    shard orientation): ``hu`` [Z, H, W] float32 and ``labels`` [Z, H, W] int64 (0 = background)."""

    hu: np.ndarray
    labels: np.ndarray | None
    source: str


def volume_slices(image_path: str, label_path: str | None = None) -> LabelledVolume:
    """Read a NIfTI CT (and optionally its label map on the same grid), reoriented to RAS, as axial slices."""
    img = open_canonical_nifti(image_path, "CT volume")
    hu = np.ascontiguousarray(ras_to_display(read_voxels(img, image_path)))  # [Z, Y (anterior first), X]
    labels = None
    if label_path is not None:
        lab = open_canonical_nifti(label_path, "label map")
        if lab.shape[:3] != img.shape[:3] or not np.allclose(lab.affine, img.affine, atol=1e-3):
            raise ValueError(
                f"{label_path}: label map grid {lab.shape} does not match the image {image_path} {img.shape}"
            )
        labels = np.ascontiguousarray(ras_to_display(read_voxels(lab, label_path, np.int64)))
    return LabelledVolume(hu=hu, labels=labels, source=str(image_path))


def slice_batch(hu: np.ndarray, transform: Callable[[Tensor], Tensor], size: int) -> Tensor:
    """HU slices [Z, H, W] -> model input [Z, C, size, size]: the training-time HU transform at native resolution
    (clamp before interpolation), then a bilinear resize of the whole field of view (antialiased when shrinking)."""
    x = torch.stack([transform(torch.from_numpy(np.ascontiguousarray(s))) for s in hu])  # [Z, C, H, W]
    shrinking = size < hu.shape[1] or size < hu.shape[2]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


@torch.inference_mode()
def backbone_features(model: nn.Module, x: Tensor, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """Final normed tokens of a frozen backbone: x [N, C, S, S] -> (patch [N, h, w, D], cls [N, D]) float32 on CPU.

    Runs on the model's device (a GPU when the caller moved it there), in bf16 autocast on GPUs that support it."""
    model.eval()
    device = next(model.parameters()).device
    p = int(model.patch_size)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    patches, classes = [], []
    for i in range(0, x.shape[0], batch_size):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.forward_features(x[i : i + batch_size].to(device))
        patches.append(out["x_norm_patchtokens"].float().cpu().reshape(-1, h, w, out["x_norm_patchtokens"].shape[-1]))
        classes.append(out["x_norm_clstoken"].float().cpu())
    return torch.cat(patches), torch.cat(classes)


# ---------------------------------------------------------------------------------------------- linear probe
def split_slices(n_slices: int, block: int) -> tuple[list[int], list[int]]:
    """Slice indices in alternating z-blocks of ``block`` slices: (train = blocks 0, 2, ..., test = 1, 3, ...).

    Contiguous blocks keep neighbouring (near-duplicate) slices on one side; alternating spreads both sets over
    the whole cranio-caudal extent of the organs.
    """
    if block < 1 or n_slices < 2 * block:
        raise ValueError(f"cannot split {n_slices} slices into alternating blocks of {block}")
    train = [z for z in range(n_slices) if (z // block) % 2 == 0]
    test = [z for z in range(n_slices) if (z // block) % 2 == 1]
    return train, test


@dataclass
class LinearProbe:
    """A 1x1-conv classifier on standardised patch features: logits = ((f - mean) / std) @ weight.T + bias."""

    mean: Tensor    # [D]
    std: Tensor     # [D]
    weight: Tensor  # [C, D]
    bias: Tensor    # [C]
    final_loss: float

    def patch_logits(self, features: Tensor) -> Tensor:
        """[N, h, w, D] -> [N, C, h, w]."""
        z = (features - self.mean) / self.std
        return (z @ self.weight.T + self.bias).permute(0, 3, 1, 2)


def probe_logits(probe: LinearProbe, features: Tensor, out_hw: Sequence[int]) -> Tensor:
    """Patch logits upsampled bilinearly to the label grid: [N, h, w, D] -> [N, C, H, W]."""
    return F.interpolate(probe.patch_logits(features), size=tuple(out_hw), mode="bilinear", align_corners=False)


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    n_classes: int,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    standardize: bool = True,
    seed: int = 0,
) -> LinearProbe:
    """Fit a linear per-patch classifier on frozen ``features`` [N, h, w, D] to ``labels`` [N, H, W] (int64 in
    [0, n_classes)), full batch, AdamW for ``steps`` steps; the loss is pixel-wise cross-entropy of the bilinearly
    upsampled logits (the DINOv2 linear-segmentation protocol on one scale). Deterministic given ``seed``."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps for {labels.shape[0]} label maps")
    d = features.shape[-1]
    flat = features.reshape(-1, d).double()
    if standardize:
        mean, std = flat.mean(0).float(), flat.std(0).clamp_min(1e-6).float()
    else:
        mean, std = torch.zeros(d), torch.ones(d)
    g = torch.Generator().manual_seed(int(seed))
    weight = nn.Parameter(torch.randn(n_classes, d, generator=g) * 0.01)
    bias = nn.Parameter(torch.zeros(n_classes))
    probe = LinearProbe(mean, std, weight, bias, float("nan"))
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    target = labels.long()
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(probe_logits(probe, features, target.shape[-2:]), target)
            loss.backward()
            opt.step()
    return LinearProbe(mean, std, weight.detach().clone(), bias.detach().clone(), float(loss.detach()))


@torch.no_grad()
def predict_probe(probe: LinearProbe, features: Tensor, out_hw: Sequence[int]) -> Tensor:
    """Class map [N, H, W] int64 from frozen features [N, h, w, D]."""
    return probe_logits(probe, features, out_hw).argmax(1)


# ---------------------------------------------------------------------------------------------- trajectories
def metric_values(records: Sequence[dict], key: str) -> np.ndarray:
    """The values of ``key`` over the records that have it (``metrics.jsonl`` order)."""
    return np.array([float(r[key]) for r in records if key in r], dtype=np.float64)


def series_summary(values: np.ndarray, n_points: int = 5) -> list[float]:
    """``n_points`` values evenly spaced over the series (first and last included), for a compact trajectory."""
    if len(values) == 0:
        return []
    idx = np.unique(np.linspace(0, len(values) - 1, n_points).round().astype(int))
    return [float(values[i]) for i in idx]


def improved(values: np.ndarray, window: int) -> tuple[float, float]:
    """(mean of the first ``window`` values, mean of the last ``window``): a noise-tolerant before/after."""
    if len(values) < 2 * window:
        raise ValueError(f"need at least {2 * window} values to compare two windows of {window}, got {len(values)}")
    return float(values[:window].mean()), float(values[-window:].mean())
