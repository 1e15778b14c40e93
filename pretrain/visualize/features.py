"""Feature maths on one CT slice: dense patch features of a backbone, the CT foreground on the patch grid, PCA to
RGB, and the cosine similarity to a reference patch (arrays in, arrays out; no figures, no files).

Shapes: a slice is [H, W] HU; features are [h, w, D] on the patch grid (h = H'/p for the resized input H').
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from scipy import ndimage

from pretrain.visualize.inputs import AxialSlice, InputTransform


def body_mask(hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Body foreground of a CT slice: [H, W] HU -> [H, W] bool.

    Threshold, keep the largest connected component (drops the table and air pockets outside the body),
    fill holes (lungs and bowel gas are inside the body).
    """
    candidate = hu > threshold_hu
    labels, n = ndimage.label(candidate)
    if n == 0:
        return candidate
    sizes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest)


def input_size(
    shape_hw: Sequence[int],
    spacing_mm: Sequence[float],
    resolution: int,
    patch_size: int,
    keep_aspect: bool = True,
) -> tuple[int, int]:
    """Network input size (H', W') for a slice: longer physical side -> ``resolution`` px.

    Both sides are rounded to a multiple of ``patch_size`` (at least one patch). With ``keep_aspect=False``
    the input is ``resolution`` x ``resolution``.
    """
    if not keep_aspect:
        side = max(patch_size, round(resolution / patch_size) * patch_size)
        return side, side
    extent_h = shape_hw[0] * float(spacing_mm[0])
    extent_w = shape_hw[1] * float(spacing_mm[1])
    scale = resolution / max(extent_h, extent_w)
    h = max(1, round(extent_h * scale / patch_size)) * patch_size
    w = max(1, round(extent_w * scale / patch_size)) * patch_size
    return int(h), int(w)


def patch_fraction(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by ``mask``: [H, W] bool -> [h, w] float in [0, 1]."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=grid_hw, mode="area")[0, 0].numpy()


@torch.inference_mode()
def dense_features(model: torch.nn.Module, x: torch.Tensor, layer: int | None = None) -> np.ndarray:
    """Patch features of one image: x [1, 3, H, W] -> [H/p, W/p, D] float32 (normed tokens).

    ``layer=None`` uses ``forward_features`` (final norm); an int uses ``get_intermediate_layers`` for that
    0-based block, also normed.
    """
    p = int(model.patch_size)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if layer is None:
        tokens = model.forward_features(x)["x_norm_patchtokens"]  # [1, h*w, D]
        feats = tokens[0].reshape(h, w, -1)
    else:
        (patch,) = model.get_intermediate_layers(x, n=[int(layer)], reshape=True, norm=True)  # [1, D, h, w]
        feats = patch[0].permute(1, 2, 0)
    return feats.float().cpu().numpy()


@dataclass
class PCABasis:
    """Principal axes of a feature cloud: ``mean`` [D], ``components`` [k, D] (rows orthonormal)."""

    mean: np.ndarray
    components: np.ndarray

    def project(self, features: np.ndarray) -> np.ndarray:
        """[..., D] -> [..., k]."""
        return (features - self.mean) @ self.components.T


def fit_pca(features: np.ndarray, n_components: int = 3) -> PCABasis:
    """PCA of [N, D] features by SVD (float64). Signs are fixed so that each axis's largest-magnitude
    loading is positive, which makes colours reproducible across runs."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 feature vectors, got shape {features.shape}")
    x = features.astype(np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:n_components]
    if comps.shape[0] < n_components:  # fewer samples/dims than components: pad with zero axes
        comps = np.concatenate([comps, np.zeros((n_components - comps.shape[0], x.shape[1]))], axis=0)
    signs = np.sign(comps[np.arange(n_components), np.argmax(np.abs(comps), axis=1)])
    signs[signs == 0] = 1.0
    return PCABasis(mean=mean, components=comps * signs[:, None])


def first_component_foreground(features: np.ndarray, threshold: float) -> np.ndarray:
    """DINOv2/v3-style foreground: [h, w, D] -> [h, w] bool from the first PCA component of all patches.

    The component's sign is oriented so that the image border (air around the body in CT) scores low,
    then patches above ``threshold`` (in units of the component's standard deviation) are foreground.
    """
    h, w, d = features.shape
    basis = fit_pca(features.reshape(-1, d), n_components=1)
    pc1 = basis.project(features.reshape(-1, d))[:, 0].reshape(h, w)
    border = np.concatenate([pc1[0], pc1[-1], pc1[:, 0], pc1[:, -1]])
    if border.mean() > pc1.mean():
        pc1 = -pc1
    scale = pc1.std() or 1.0
    return pc1 / scale > threshold


def pca_rgb(
    features: np.ndarray,
    foreground: np.ndarray,
    basis: PCABasis,
    low: np.ndarray,
    high: np.ndarray,
) -> np.ndarray:
    """[h, w, D] features -> [h, w, 3] RGB in [0, 1]; exactly 0 outside ``foreground`` [h, w].

    Component c is mapped linearly from [low[c], high[c]] to [0, 1] and clipped.
    """
    proj = basis.project(features)[..., :3]
    rgb = np.clip((proj - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)
    rgb[~foreground] = 0.0
    return rgb.astype(np.float32)


def rgb_range(projections: np.ndarray, percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-component (low, high) percentiles of [N, 3] projected foreground features."""
    low = np.percentile(projections, float(percentiles[0]), axis=0)
    high = np.percentile(projections, float(percentiles[1]), axis=0)
    return low, high


def _cell_of(pixel: np.ndarray | float, n_pixels: int, n_cells: int) -> np.ndarray:
    """Grid cell containing each pixel centre when ``n_pixels`` are split into ``n_cells`` equal cells."""
    return np.minimum(np.floor((np.asarray(pixel, dtype=np.float64) + 0.5) * n_cells / n_pixels), n_cells - 1).astype(int)


def pixel_to_patch(point_yx: Sequence[float], image_hw: Sequence[int], grid_hw: Sequence[int]) -> tuple[int, int]:
    """Pixel (row, col) of the native slice -> (i, j) of the patch grid covering the resized image."""
    y, x = float(point_yx[0]), float(point_yx[1])
    if not (0 <= y < image_hw[0] and 0 <= x < image_hw[1]):
        raise ValueError(f"reference point {tuple(point_yx)} is outside the {image_hw[0]}x{image_hw[1]} slice")
    return int(_cell_of(y, image_hw[0], grid_hw[0])), int(_cell_of(x, image_hw[1], grid_hw[1]))


def cosine_similarity_map(features: np.ndarray, ref_ij: tuple[int, int]) -> np.ndarray:
    """[h, w, D] features -> [h, w] cosine similarity of every patch with patch ``ref_ij`` (1.0 there)."""
    f = features.astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return (f @ f[ref_ij]).astype(np.float32)


def upsample_nearest(grid: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """[h, w(, C)] -> [H, W(, C)] nearest-neighbour (patch boundaries stay visible); pixel (r, c) shows the
    cell ``pixel_to_patch`` assigns to it, so a marked reference pixel sits on its own patch."""
    rows = _cell_of(np.arange(size_hw[0]), size_hw[0], grid.shape[0])
    cols = _cell_of(np.arange(size_hw[1]), size_hw[1], grid.shape[1])
    return grid[rows][:, cols]


def patch_foreground_mask(
    hu_slice: np.ndarray, features: np.ndarray, foreground_cfg: DictConfig | dict
) -> np.ndarray:
    """[h, w] bool foreground of a feature map according to ``foreground.method`` (body | pca1 | none)."""
    method = str(foreground_cfg["method"])
    h, w = features.shape[:2]
    if method == "body":
        body = body_mask(hu_slice, float(foreground_cfg["body_threshold_hu"]))
        return patch_fraction(body, (h, w)) >= float(foreground_cfg["min_patch_fraction"])
    if method == "pca1":
        return first_component_foreground(features, float(foreground_cfg["pca1_threshold"]))
    if method == "none":
        return np.ones((h, w), dtype=bool)
    raise ValueError(f"foreground.method must be body, pca1 or none, got {method!r}")


def slice_features(
    model: torch.nn.Module,
    ct: AxialSlice,
    resolution: int,
    transform: InputTransform,
    keep_aspect: bool = True,
    layer: int | None = None,
) -> np.ndarray:
    """Dense features of a CT slice at one input resolution: -> [h, w, D]."""
    p = int(model.patch_size)
    size = input_size(ct.hu.shape, ct.spacing_mm, resolution, p, keep_aspect)
    # Transform at native resolution (clamp before interpolation), then resize the normalised channels.
    x = transform(torch.from_numpy(ct.hu))[None]
    shrinking = size[0] < ct.hu.shape[0] or size[1] < ct.hu.shape[1]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return dense_features(model, x, layer)


def pca_maps(
    model: torch.nn.Module,
    ct: AxialSlice,
    resolutions: Sequence[int],
    cfg: DictConfig,
    transform: InputTransform,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB PCA maps [h_r, w_r, 3] and foreground masks [h_r, w_r] for each input resolution."""
    feats = [slice_features(model, ct, r, transform, cfg.image.keep_aspect, cfg.features.layer) for r in resolutions]
    masks = [patch_foreground_mask(ct.hu, f, cfg.foreground) for f in feats]
    for r, m in zip(resolutions, masks):
        if m.sum() < 3:
            raise ValueError(
                f"{ct.source} slice {ct.index}: fewer than 3 foreground patches at {r}px "
                f"(foreground.method={cfg.foreground.method}); try --foreground none or another --slice"
            )
    fit_mode = str(cfg.pca.fit)
    if fit_mode not in ("joint", "separate"):
        raise ValueError(f"pca.fit must be joint or separate, got {fit_mode!r}")
    rgbs = []
    if fit_mode == "joint":
        pooled = np.concatenate([f[m] for f, m in zip(feats, masks)], axis=0)
        basis = fit_pca(pooled)
        low, high = rgb_range(basis.project(pooled), cfg.pca.rgb_percentiles)
        rgbs = [pca_rgb(f, m, basis, low, high) for f, m in zip(feats, masks)]
    else:
        for f, m in zip(feats, masks):
            basis = fit_pca(f[m])
            low, high = rgb_range(basis.project(f[m]), cfg.pca.rgb_percentiles)
            rgbs.append(pca_rgb(f, m, basis, low, high))
    return rgbs, masks


def similarity_map(
    model: torch.nn.Module,
    ct: AxialSlice,
    point_yx: Sequence[float],
    resolution: int,
    cfg: DictConfig,
    transform: InputTransform,
) -> tuple[np.ndarray, tuple[int, int]]:
    """[h, w] cosine similarity with the patch under ``point_yx`` and that patch's (i, j)."""
    feats = slice_features(model, ct, resolution, transform, cfg.image.keep_aspect, cfg.features.layer)
    ref = pixel_to_patch(point_yx, ct.hu.shape, feats.shape[:2])
    return cosine_similarity_map(feats, ref), ref

