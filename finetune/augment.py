"""nnU-Net v2 default 2-D augmentations on tensors, one sample at a time.

Order and probabilities follow nnU-Net's ``get_training_transforms`` for 2-D: spatial (rotation p 0.2 within
+-180 deg, scaling p 0.2 in [0.7, 1.4], no elastic; image bilinear, labels one-hot bilinear + argmax, as
batchgeneratorsv2) -> Gaussian noise (p 0.1, std ~ U(0, 0.1): batchgenerators
calls it "variance" but draws the normal's scale from that range) -> Gaussian blur (p 0.2, sigma U(0.5, 1),
each channel with p 0.5) -> multiplicative brightness (p 0.15, U(0.75, 1.25)) -> contrast (p 0.15, range kept)
-> low-resolution simulation (nnU-Net p 0.25, zoom U(0.5, 1), nearest-exact down / bilinear up, each channel
p 0.5; off in the paper recipe, see base.yaml) -> inverted
gamma (p 0.1) -> gamma (p 0.3, gamma in [0.7, 1.5], statistics retained) -> mirroring (p 0.5 per in-plane axis).
All values come from ``cfg.augment``; the random draws come from a numpy Generator passed in, so a batch is a
pure function of its seed (resume reproduces the same data).

Shapes: image ``[C, Y, X]`` (C = context slices or slab depth: in-plane transforms are shared by all C),
label ``[L, Y, X]`` (L = 1 for slices, the slab depth for slabs).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _split_range(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    """batchgenerators' draw for contrast/gamma: half the time below 1, else above (when the range spans 1)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def crop_window(image: torch.Tensor, label: torch.Tensor, top_left: Sequence[int], patch: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer crop with zero padding outside the slice (image 0, label background)."""
    y0, x0 = int(top_left[0]), int(top_left[1])
    ph, pw = int(patch[0]), int(patch[1])
    _, ny, nx = image.shape
    out_img = image.new_zeros((image.shape[0], ph, pw))
    out_lab = label.new_zeros((label.shape[0], ph, pw))
    sy0, sy1 = max(y0, 0), min(y0 + ph, ny)
    sx0, sx1 = max(x0, 0), min(x0 + pw, nx)
    if sy1 > sy0 and sx1 > sx0:
        out_img[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
        out_lab[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = label[:, sy0:sy1, sx0:sx1]
    return out_img, out_lab


def window_grid(shape_yx: Sequence[int], top_left: Sequence[int], patch: Sequence[int], angle_rad: float,
                scale: float) -> torch.Tensor:
    """``grid_sample`` coordinates ``[ph, pw, 2]`` (x, y in [-1, 1], ``align_corners=False``) of the window
    ``top_left + patch`` rotated by ``angle_rad`` and with coordinates scaled by ``scale`` about its centre
    (scale > 1 shows more anatomy, as batchgenerators)."""
    ph, pw = int(patch[0]), int(patch[1])
    ny, nx = int(shape_yx[0]), int(shape_yx[1])
    cy, cx = top_left[0] + (ph - 1) / 2.0, top_left[1] + (pw - 1) / 2.0
    oy = torch.arange(ph, dtype=torch.float32) - (ph - 1) / 2.0
    ox = torch.arange(pw, dtype=torch.float32) - (pw - 1) / 2.0
    gy, gx = torch.meshgrid(oy, ox, indexing="ij")
    cos, sin = math.cos(angle_rad) * scale, math.sin(angle_rad) * scale
    sy = cy + cos * gy - sin * gx
    sx = cx + sin * gy + cos * gx
    return torch.stack([(2 * sx + 1) / nx - 1, (2 * sy + 1) / ny - 1], dim=-1)


def resample_labels(label: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Label maps ``[L, Y, X]`` sampled at ``grid [ph, pw, 2]`` as batchgeneratorsv2's ``SpatialTransform`` with
    nnU-Net's settings (``mode_seg="bilinear"``, ``bg_style_seg_sampling=False``, padding label -1): the one-hot map
    of every label value interpolated bilinearly, each pixel taking the argmax (lowest label on ties); outside the
    slice a "padding" class (one-hot 1 there) competes, then becomes background (nnU-Net's
    ``RemoveLabelTansform(-1, 0)``).

    Computed without the one-hot stack: a bilinear sample only mixes its 4 neighbouring pixels, so a label's
    interpolated one-hot value is the summed weight of the neighbours carrying it. Where the 4 neighbours disagree
    each of their labels is scored that way and the best wins: the same argmax for any number of labels."""
    n_slices, ny, nx = label.shape
    x = ((grid[..., 0] + 1) * nx - 1) / 2                                   # align_corners=False pixel coordinates
    y = ((grid[..., 1] + 1) * ny - 1) / 2
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    flat = label.reshape(n_slices, ny * nx)
    labels, weights = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            picked = flat[:, yy.clamp(0, ny - 1) * nx + xx.clamp(0, nx - 1)].to(torch.int32)
            labels.append(picked.masked_fill_(~inside, -1))                   # -1: the padding class
            weights.append(wy * wx)
    out = labels[0]
    mixed = ((labels[1] != out) | (labels[2] != out) | (labels[3] != out)).nonzero(as_tuple=True)
    if mixed[0].numel():                                                    # pixels whose neighbours disagree
        cand = torch.stack([lab[mixed] for lab in labels])                  # [4, n]
        w = torch.stack([wt[mixed[1:]] for wt in weights])                  # [4, n]
        score = (w[None] * (cand[:, None] == cand[None, :])).sum(1)         # candidate i: sum_j w_j [l_j == l_i]
        top = score == score.max(0, keepdim=True).values
        out[mixed] = torch.where(top, cand, torch.iinfo(torch.int32).max).min(0).values   # ties: lowest label
    return out.clamp_min_(0).to(label.dtype)


def rotate_scale_window(image: torch.Tensor, label: torch.Tensor, top_left: Sequence[int], patch: Sequence[int],
                        angle_rad: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The window after rotation/scaling (`window_grid`): image bilinear with zeros outside (batchgeneratorsv2's
    ``mode_image="bilinear"``), labels by one-hot interpolation + argmax (`resample_labels`)."""
    grid = window_grid(image.shape[1:], top_left, patch, angle_rad, scale)
    out_img = F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0]
    return out_img, resample_labels(label, grid)


def _gaussian_blur_channel(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[Y, X]`` (truncated at 4 sigma, edge-replicated borders); scipy's 1-D filters
    are several times faster than small-kernel convolutions on one CPU thread."""
    out = ndimage.gaussian_filter1d(x.numpy(), sigma, axis=0, mode="nearest", truncate=4.0)
    return torch.from_numpy(ndimage.gaussian_filter1d(out, sigma, axis=1, mode="nearest", truncate=4.0, output=out))


def simulate_lowres(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """``[Y, X]`` downsampled by ``zoom`` (nearest-exact) and back up bilinearly, as batchgeneratorsv2's
    ``SimulateLowResolutionTransform`` (one zoom for both axes: nnU-Net's ``synchronize_axes=True``)."""
    small = [max(int(round(s * zoom)), 1) for s in x.shape]
    down = F.interpolate(x[None, None], size=small, mode="nearest-exact")
    return F.interpolate(down, size=tuple(x.shape), mode="bilinear", align_corners=False)[0, 0]


def _gamma(x: torch.Tensor, gamma: float, invert: bool, eps: float = 1e-7) -> torch.Tensor:
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    rng_ = hi - lo
    x = ((x - lo) / (rng_ + eps)) ** gamma * (rng_ + eps) + lo
    x = (x - x.mean()) / (x.std() + 1e-8) * std + mean
    return -x if invert else x


def intensity_augment(image: torch.Tensor, rng: np.random.Generator, acfg, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur, brightness, contrast, low-res, gamma on ``image [C, Y, X]`` (a new tensor is returned)."""
    x = image.float().clone()
    if rng.random() < acfg.noise_p:
        std = _uniform(rng, acfg.noise_variance)
        x = x + torch.randn(x.shape, generator=generator) * std
    if rng.random() < acfg.blur_p:
        for c in range(x.shape[0]):
            if rng.random() < 0.5:
                x[c] = _gaussian_blur_channel(x[c], _uniform(rng, acfg.blur_sigma))
    if rng.random() < acfg.brightness_p:
        x = x * _uniform(rng, acfg.brightness_range)
    if rng.random() < acfg.contrast_p:
        factor = _split_range(rng, acfg.contrast_range)
        mean = x.mean(dim=(1, 2), keepdim=True)
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        x = torch.maximum(torch.minimum((x - mean) * factor + mean, hi), lo)
    if rng.random() < acfg.lowres_p:
        for c in range(x.shape[0]):
            if rng.random() < 0.5:
                x[c] = simulate_lowres(x[c], _uniform(rng, acfg.lowres_zoom))
    if rng.random() < acfg.gamma_invert_p:
        x = _gamma(x, _split_range(rng, acfg.gamma_range), invert=True)
    if rng.random() < acfg.gamma_p:
        x = _gamma(x, _split_range(rng, acfg.gamma_range), invert=False)
    return x


def spatial_augment(image: torch.Tensor, label: torch.Tensor, top_left: Sequence[int], patch: Sequence[int],
                    rng: np.random.Generator, acfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop the window, with nnU-Net's random rotation/scaling when drawn (exact integer crop otherwise)."""
    angle, scale = 0.0, 1.0
    do_rot = acfg.enabled and rng.random() < acfg.rotation_p
    do_scale = acfg.enabled and rng.random() < acfg.scale_p
    if do_rot:
        angle = math.radians(_uniform(rng, (-acfg.rotation_deg, acfg.rotation_deg)))
    if do_scale:
        scale = _uniform(rng, acfg.scale_range)
    if not (do_rot or do_scale):
        return crop_window(image, label, top_left, patch)
    return rotate_scale_window(image, label, top_left, patch, angle, scale)


def mirror(image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, acfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip along each configured in-plane axis (0 = rows, 1 = columns) with ``mirror_p``."""
    for axis in acfg.mirror_axes:
        if rng.random() < acfg.mirror_p:
            image = torch.flip(image, dims=(1 + int(axis),))
            label = torch.flip(label, dims=(1 + int(axis),))
    return image, label


def augment_sample(image: torch.Tensor, label: torch.Tensor, top_left: Sequence[int], patch: Sequence[int],
                   rng: np.random.Generator, acfg, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Full nnU-Net pipeline for one sample: full slices ``[C, Y, X]`` -> augmented patch ``[C, ph, pw]``."""
    if not augment or not acfg.enabled:
        return crop_window(image, label, top_left, patch)
    image, label = spatial_augment(image, label, top_left, patch, rng, acfg)
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    image = intensity_augment(image, rng, acfg, generator)
    return mirror(image, label, rng, acfg)
