"""Pictures of features: a greyscale CT panel next to PCA RGB maps or cosine-similarity maps.

``pca_figure`` and ``similarity_figure`` take arrays and return a matplotlib ``Figure``; ``write_pca_png`` and
``write_similarity_png`` compute the maps of a model in memory (``pretrain.visualize.features``) and save the PNG
(used by the CLI and by ``benchmarks/ssl_signal.py``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from meddino_common.figures import save_png  # noqa: E402
from pretrain.visualize.features import pca_maps, pixel_to_patch, similarity_map, upsample_nearest  # noqa: E402
from pretrain.visualize.inputs import AxialSlice, InputTransform  # noqa: E402


def window_for_display(hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """[H, W] HU -> [H, W] in [0, 1] for a greyscale panel (``window_hu`` = (low, high))."""
    low, high = float(window_hu[0]), float(window_hu[1])
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def _panel_grid(n_panels: int, panel_in: float, n_rows: int = 1) -> tuple[Figure, np.ndarray]:
    n_cols = math.ceil(n_panels / n_rows)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_in * n_cols, panel_in * n_rows + 0.4), squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _aspect(spacing_mm: Sequence[float], image_hw: Sequence[int], shown_hw: Sequence[int]) -> float:
    """imshow aspect so a panel of ``shown_hw`` pixels covering the slice keeps physical proportions."""
    return (spacing_mm[0] * image_hw[0] / shown_hw[0]) / (spacing_mm[1] * image_hw[1] / shown_hw[1])


def _ct_panel(ax: plt.Axes, display: np.ndarray, aspect: float, title: str) -> None:
    ax.imshow(display, cmap="gray", vmin=0, vmax=1, aspect=aspect)
    ax.set_title(title, fontsize=9)


def pca_figure(
    display: np.ndarray,
    spacing_mm: Sequence[float],
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    suptitle: str,
    panel_in: float,
) -> Figure:
    """CT panel ``display`` [H, W] in [0, 1] followed by PCA RGB maps [h_i, w_i, 3], one per resolution."""
    fig, axes = _panel_grid(1 + len(maps), panel_in)
    _ct_panel(axes[0, 0], display, _aspect(spacing_mm, display.shape, display.shape), "CT slice")
    for k, (rgb, title) in enumerate(zip(maps, titles)):
        ax = axes[0, k + 1]
        ax.imshow(rgb, interpolation="nearest", aspect=_aspect(spacing_mm, display.shape, rgb.shape[:2]))
        ax.set_title(title, fontsize=9)
    fig.suptitle(suptitle, fontsize=10)
    return fig


def similarity_figure(
    display: np.ndarray,
    spacing_mm: Sequence[float],
    point_yx: Sequence[float],
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    suptitle: str,
    panel_in: float,
    colormap: str,
    marker_color: str,
    overlay_alpha: float,
) -> Figure:
    """CT panel with the reference point, then one cosine-similarity map [h, w] (range [-1, 1]) per model.

    Maps are upsampled (nearest) to the slice so the reference point lands on the same pixel in every panel.
    """
    fig, axes = _panel_grid(1 + len(maps), panel_in)
    aspect = _aspect(spacing_mm, display.shape, display.shape)
    _ct_panel(axes[0, 0], display, aspect, f"CT slice, reference ({point_yx[0]:g}, {point_yx[1]:g})")
    image = None
    for k, (sim, title) in enumerate(zip(maps, titles)):
        ax = axes[0, k + 1]
        if overlay_alpha > 0:
            _ct_panel(ax, display, aspect, "")
        image = ax.imshow(
            upsample_nearest(sim, display.shape), cmap=colormap, vmin=-1.0, vmax=1.0, aspect=aspect,
            interpolation="nearest", alpha=overlay_alpha if overlay_alpha > 0 else None,
        )
        ax.set_title(title, fontsize=9)
    for ax in axes[0, : 1 + len(maps)]:
        ax.plot([point_yx[1]], [point_yx[0]], "o", color=marker_color, markersize=6, markeredgecolor="white")
    if image is not None:
        fig.colorbar(image, ax=axes[0, -1], shrink=0.8, label="cosine similarity")
    fig.suptitle(suptitle, fontsize=10)
    return fig


def write_pca_png(
    model: torch.nn.Module,
    ct: AxialSlice,
    out_path: str | Path,
    cfg: DictConfig,
    transform: InputTransform,
    label: str = "",
) -> Path:
    """PCA RGB maps of ``model`` on ``ct`` at ``cfg.pca.resolutions`` side by side -> PNG (for benchmarks
    and the demo that hold a model in memory; the ``pca`` subcommand is a thin wrapper)."""
    resolutions = [int(r) for r in cfg.pca.resolutions]
    rgbs, _ = pca_maps(model, ct, resolutions, cfg, transform)
    titles = [f"{r}px input, {m.shape[0]}x{m.shape[1]} patches" for r, m in zip(resolutions, rgbs)]
    fig = pca_figure(
        window_for_display(ct.hu, cfg.image.display_window_hu), ct.spacing_mm, rgbs, titles,
        f"PCA of patch features: {label or type(model).__name__} | {Path(ct.source).name} slice {ct.index} "
        f"| foreground: {cfg.foreground.method} | fit: {cfg.pca.fit}",
        float(cfg.panel_size_in),
    )
    return save_png(fig, out_path, int(cfg.dpi))


def write_similarity_png(
    models: Iterable[tuple[str, torch.nn.Module, InputTransform]],
    ct: AxialSlice,
    point_yx: Sequence[float],
    out_path: str | Path,
    cfg: DictConfig,
) -> Path:
    """Reference-patch cosine-similarity maps, one panel per ``(label, model, transform)`` -> PNG.

    ``models`` is consumed one item at a time, so a generator that loads each checkpoint on demand keeps
    only one backbone in memory.
    """
    pixel_to_patch(point_yx, ct.hu.shape, (1, 1))  # fail fast on a point outside the slice
    maps, titles = [], []
    for label, model, transform in models:
        sim, _ = similarity_map(model, ct, point_yx, int(cfg.similarity.resolution), cfg, transform)
        maps.append(sim)
        titles.append(label.replace("/", "/\n", 1) if len(label) > 30 else label)  # narrow panels
    fig = similarity_figure(
        window_for_display(ct.hu, cfg.image.display_window_hu), ct.spacing_mm, point_yx, maps, titles,
        f"Cosine similarity to the reference patch | {Path(ct.source).name} slice {ct.index} "
        f"| {cfg.similarity.resolution}px input",
        float(cfg.panel_size_in), str(cfg.similarity.colormap), str(cfg.similarity.marker_color),
        float(cfg.similarity.overlay_alpha),
    )
    return save_png(fig, out_path, int(cfg.dpi))

