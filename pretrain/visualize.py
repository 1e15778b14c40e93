"""Pictures of what a backbone learned, written as PNG files (matplotlib Agg, no display).

Three subcommands, each a thin CLI over pure array -> figure functions:

- ``pca``: PCA of dense patch features, first three components mapped to RGB, masked to the CT
  foreground, at several input resolutions side by side (MedDINOv3 Fig. 1).
- ``similarity``: cosine similarity between the patch under a reference pixel and every other patch,
  for one or several checkpoints side by side (MedDINOv3 Fig. 3/4: patch-feature degradation).
- ``curves``: every loss term, lr, weight decay, momentum and teacher temperature of one or several
  ``metrics.jsonl`` files against the iteration.

Examples::

    python -m pretrain.visualize pca --checkpoint run/teacher_backbone.pth --image ct.nii.gz --out pca.png
    python -m pretrain.visualize similarity --checkpoint random:vitb16 run/teacher_backbone.pth \\
        --image ct.nii.gz --point 60,40 --out sim.png
    python -m pretrain.visualize curves --metrics run/metrics.jsonl --out curves.png

``--checkpoint`` takes anything ``pretrain.models.load_backbone`` reads, or ``random:<arch>`` for a
randomly initialised backbone of that preset (seeded by ``seed`` in ``configs/visualize.yaml``).

Geometry: NIfTI volumes are reoriented to RAS (nibabel's closest canonical) and axial slices are shown in
the radiological convention (patient's right on the image left, anterior at the top). Reference points
(``--point y,x``) are pixel (row, column) indices of that displayed slice at its native resolution.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from scipy import ndimage  # noqa: E402

from pretrain.data.transforms import HUTransform  # noqa: E402
from pretrain.models import build_backbone, load_backbone  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "visualize.yaml"
RANDOM_PREFIX = "random:"
InputTransform = Callable[[torch.Tensor], torch.Tensor]  # [H, W] HU -> [C, H, W] model input


# --------------------------------------------------------------------------------------------------
# configuration and I/O edges
# --------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None) -> DictConfig:
    """The visualisation config (``configs/visualize.yaml`` unless ``path`` is given)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"visualisation config not found: {path} (pass --config path/to/visualize.yaml)"
        )
    return OmegaConf.load(path)


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as PNG atomically (temporary file + rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a picture gets the usual permissions
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class AxialSlice:
    """One axial CT slice in display orientation.

    ``hu`` [H, W] float32 Hounsfield units (rows anterior -> posterior, columns patient right -> left),
    ``spacing_mm`` (row, column) pixel size, ``index`` the slice index along the RAS superior axis.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float]
    index: int
    source: str


def ras_to_display(plane: np.ndarray) -> np.ndarray:
    """RAS in-plane array [X, Y] (+x towards the patient's right, +y anterior) -> display [Y, X].

    Radiological convention: row 0 is the most anterior row, column 0 the patient's right side; the same
    in-plane orientation as the CT-3M shards (data_curation's canonical LPS [row=P, col=L]).
    """
    return plane[::-1, ::-1].T


def body_voxel_counts(volume_hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Per-axial-slice count of voxels above ``threshold_hu`` for a RAS volume [X, Y, Z] -> [Z]."""
    return (volume_hu > threshold_hu).sum(axis=(0, 1))


def default_slice(body_counts: np.ndarray, near_max: float) -> int:
    """Middle index among the slices whose body-voxel count is within ``near_max`` of the largest.

    Plain argmax would pick the first slice of a volume cropped to the body, where every slice ties.
    """
    candidates = np.nonzero(body_counts >= near_max * body_counts.max())[0]
    return int(candidates[len(candidates) // 2])


def load_axial_slice(
    path: str | Path, slice_index: int | None, body_threshold_hu: float, near_max: float = 0.9
) -> AxialSlice:
    """Read a NIfTI CT volume, reorient to RAS and return one axial slice in display orientation.

    ``slice_index=None`` picks ``default_slice`` (through the trunk rather than an edge slice); ``near_max``
    is ``image.default_slice_near_max`` of the config.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: not a readable NIfTI image ({exc})") from exc
    if len(image.shape) < 3 or any(s == 0 for s in image.shape[:3]):
        raise ValueError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    if len(image.shape) > 3 and any(s != 1 for s in image.shape[3:]):
        raise ValueError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    volume = image.get_fdata(dtype=np.float32).reshape(image.shape[:3])  # scl_slope applied, never float64
    depth = volume.shape[2]
    if slice_index is None:
        slice_index = default_slice(body_voxel_counts(volume, body_threshold_hu), near_max)
    if not -depth <= slice_index < depth:
        raise ValueError(f"{path}: --slice {slice_index} outside the {depth} axial slices (0..{depth - 1})")
    slice_index %= depth
    zooms = image.header.get_zooms()
    spacing_x, spacing_y = float(zooms[0]), float(zooms[1])
    hu = np.ascontiguousarray(ras_to_display(volume[:, :, slice_index]))
    return AxialSlice(hu=hu, spacing_mm=(spacing_y, spacing_x), index=slice_index, source=str(path))


def resolve_backbone(spec: str, seed: int, arch: str | None = None) -> tuple[torch.nn.Module, str]:
    """``random:<arch>`` -> a freshly initialised ``build_backbone(arch)``; anything else -> ``load_backbone``
    (``arch`` is passed through, e.g. ``meddinov3_vitb16`` for the MedDINOv3 release; None infers it).

    Returns the model in eval mode and a short label for figure titles.
    """
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX):]
        if not arch:
            raise ValueError(f"--checkpoint {spec!r}: give an architecture, e.g. random:vitb16")
        torch.manual_seed(seed)
        model = build_backbone(arch)
        label = f"random init ({arch})"
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint not found: {path} (or use random:<arch> for a randomly initialised backbone)"
            )
        model = load_backbone(str(path), arch=arch)
        label = f"{path.parent.name}/{path.name}" if path.is_file() else path.name
    return model.eval(), label


def load_input_transform(pretrain_config: str | Path) -> InputTransform:
    """The training-time HU -> input mapping of a pretrain config: [H, W] HU -> [C, H, W] float32.

    Built by ``pretrain.data.transforms.HUTransform`` from the config's ``data.transform`` block (MedDINOv3
    default: clamp [-1000, 1000] HU, (x - 65.1084) / 178.0166, 3 channels), deterministic (no window jitter).
    """
    path = Path(pretrain_config)
    if not path.is_file():
        raise FileNotFoundError(f"pretrain config not found: {path} (needed for the HU -> input transform)")
    cfg = OmegaConf.load(path)
    block = OmegaConf.select(cfg, "data.transform")
    if block is None:
        raise ValueError(f"{path}: no data.transform block (expected a pretrain config or a run's config.yaml)")
    transform = HUTransform.from_config(block)

    def apply(hu: torch.Tensor) -> torch.Tensor:
        x = transform(hu.float())  # [1 or C, H, W]: one grey channel is repeated to out_channels below
        return x.expand(transform.out_channels, -1, -1).contiguous() if x.shape[0] == 1 else x

    return apply


def transform_config_for(checkpoint: str, cfg: DictConfig) -> Path:
    """Which pretrain config defines the input transform of ``checkpoint``.

    ``transform_config`` in the visualisation config wins when set; otherwise the run's resolved
    ``config.yaml`` next to the checkpoint (or one folder up, for ``checkpoints/``); otherwise the
    default pretrain config (``configs/pretrain/base.yaml``).
    """
    if cfg.get("transform_config"):
        return _repo_path(cfg.transform_config)
    if not checkpoint.startswith(RANDOM_PREFIX):
        here = Path(checkpoint)
        folder = here if here.is_dir() else here.parent
        for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
            if candidate.is_file() and OmegaConf.select(OmegaConf.load(candidate), "data.transform") is not None:
                return candidate
    return _repo_path(cfg.default_pretrain_config)


def _repo_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory when it exists there, else from the repository root."""
    path = Path(path)
    if path.is_absolute():
        return path
    return path.resolve() if path.exists() else DEFAULT_CONFIG.parents[1] / path


# --------------------------------------------------------------------------------------------------
# pure array helpers
# --------------------------------------------------------------------------------------------------
def window_for_display(hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """[H, W] HU -> [H, W] in [0, 1] for a greyscale panel (``window_hu`` = (low, high))."""
    low, high = float(window_hu[0]), float(window_hu[1])
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


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


# --------------------------------------------------------------------------------------------------
# figures (arrays in, Figure out)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a trainer ``metrics.jsonl`` (one JSON object per logged iteration).

    Blank lines are skipped; a truncated LAST line (a run still writing) is dropped with a warning; any
    other malformed line is an error naming the file and line. Records without ``iteration`` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number}: ignoring incomplete last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if "iteration" in record:
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records with an 'iteration' field")
    return records


def _numeric(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations [N], values [N, K]) for ``key`` over the records that carry a numeric value for it.

    A scalar gives K = 1; a list of numbers (the finetune log's per-group ``lr`` or per-class
    ``pseudo_dice``) gives one column per element, NaN-padded to the longest list. Non-finite values
    (NaN, inf, JSON null) become NaN so a diverged run shows as a marked gap.
    """
    iters, rows = [], []
    for record in records:
        value = record.get(key, "absent")
        if _numeric(value):
            row = [value]
        elif isinstance(value, list) and value and all(_numeric(v) for v in value):
            row = list(value)
        else:
            continue
        iters.append(float(record["iteration"]))
        rows.append([math.nan if v is None or not math.isfinite(v) else float(v) for v in row])
    width = max((len(r) for r in rows), default=1)
    values = np.full((len(rows), width), math.nan)
    for n, row in enumerate(rows):
        values[n, : len(row)] = row
    return np.asarray(iters), values


def curve_keys(runs: Sequence[Sequence[dict[str, Any]]], loss_keys: Sequence[str], other_keys: Sequence[str]) -> list[str]:
    """Panels to draw: known loss keys present, then other ``*_loss`` keys (sorted), then ``other_keys``
    (schedules, diagnostics) present."""
    present: set[str] = set()
    for records in runs:
        for record in records:
            present.update(k for k, v in record.items() if _numeric(v) or (isinstance(v, list) and v))
    keys = [k for k in loss_keys if k in present]
    keys += sorted(k for k in present if k.endswith("_loss") and k not in keys)
    keys += [k for k in other_keys if k in present]
    return keys


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (NaN-aware; window 1 returns the input)."""
    if window <= 1 or values.size == 0:
        return values
    out = np.empty_like(values)
    for k in range(values.size):
        chunk = values[max(0, k - window + 1): k + 1]
        finite = chunk[np.isfinite(chunk)]
        out[k] = finite.mean() if finite.size else math.nan
    return out


def curves_figure(
    runs: dict[str, Sequence[dict[str, Any]]],
    loss_keys: Sequence[str],
    other_keys: Sequence[str],
    columns: int,
    smoothing_window: int,
    panel_in: float,
) -> Figure:
    """One panel per metric key, one line per run (label -> records) and per list element."""
    keys = curve_keys(list(runs.values()), loss_keys, other_keys)
    if not keys:
        raise ValueError("no loss or schedule values found in the metrics records")
    n_cols = min(columns, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_in * 1.3 * n_cols, panel_in * n_rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(keys):]:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys):
        n_lines = 0
        for label, records in runs.items():
            iters, table = metric_series(records, key)
            if iters.size == 0:
                continue
            order = np.argsort(iters, kind="stable")
            iters, table = iters[order], table[order]
            for column in range(table.shape[1]):
                values = table[:, column]
                name = label if table.shape[1] == 1 else f"{label} [{column}]" if len(runs) > 1 else f"[{column}]"
                n_lines += 1
                if smoothing_window > 1:
                    (raw,) = ax.plot(iters, values, alpha=0.25, linewidth=0.8)
                    ax.plot(iters, moving_average(values, smoothing_window), color=raw.get_color(), label=name)
                else:
                    ax.plot(iters, values, label=name, marker="." if iters.size < 30 else None)
                bad = ~np.isfinite(values)
                if bad.any():
                    # on the bottom edge of the panel (x in data, y in axes units): the scale stays intact
                    ax.plot(iters[bad], np.full(bad.sum(), 0.02), "x", color="red", clip_on=False,
                            transform=ax.get_xaxis_transform(), label=f"{name}: non-finite")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key in ("lr", "wd"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if n_lines > 1:
            ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------
# end-to-end helpers (model + slice -> arrays), used by the CLI and by benchmarks
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _point(text: str) -> tuple[float, float]:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--point expects y,x (row,column), got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--point expects numbers y,x, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.visualize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common_image(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image", required=True, help="CT volume (NIfTI)")
        p.add_argument("--slice", type=int, default=None, help="axial slice index (RAS); default from config")
        p.add_argument("--foreground", choices=["body", "pca1", "none"], default=None,
                       help="foreground masking method (default from config)")
        p.add_argument("--layer", type=int, default=None, help="0-based block (default: final normed tokens)")

    pca = sub.add_parser("pca", help="PCA of dense features -> RGB at several resolutions")
    pca.add_argument("--checkpoint", required=True, help="backbone checkpoint or random:<arch>")
    common_image(pca)
    pca.add_argument("--resolutions", type=_int_list, default=None, help="e.g. 224,448,896")
    pca.add_argument("--pca-fit", choices=["joint", "separate"], default=None,
                     help="one PCA fitted on all checkpoints/resolutions together (joint: comparable colours) or one "
                          "per panel (separate); default from the config")
    pca.add_argument("--out", required=True, help="output PNG")

    sim = sub.add_parser("similarity", help="cosine similarity to a reference patch, per checkpoint")
    sim.add_argument("--checkpoint", required=True, nargs="+", help="one or more checkpoints or random:<arch>")
    common_image(sim)
    sim.add_argument("--point", type=_point, required=True, help="reference pixel y,x (row,column) of the slice")
    sim.add_argument("--resolution", type=int, default=None, help="input size, longer side (px)")
    sim.add_argument("--out", required=True, help="output PNG")

    cur = sub.add_parser("curves", help="loss terms and schedules vs iteration from metrics.jsonl")
    cur.add_argument("--metrics", required=True, nargs="+", help="one or more metrics.jsonl files")
    cur.add_argument("--labels", nargs="+", default=None, help="legend label per metrics file")
    cur.add_argument("--smoothing", type=int, default=None, help="moving-average window (points)")
    cur.add_argument("--out", required=True, help="output PNG")

    for p in (pca, sim):
        p.add_argument("--arch", default=None,
                       help="architecture for checkpoint files (default: inferred from the weights; "
                            "meddinov3_vitb16 for the MedDINOv3 release)")
        p.add_argument("--transform-config", default=None,
                       help="pretrain config whose data.transform maps HU to the input (default: the run's "
                            "config.yaml next to the checkpoint, else configs/pretrain/base.yaml)")
    for p in (pca, sim, cur):
        p.add_argument("--config", default=None, help=f"visualisation config (default {DEFAULT_CONFIG})")
    return parser


def _apply_image_overrides(cfg: DictConfig, args: argparse.Namespace) -> None:
    if args.transform_config is not None:
        cfg.transform_config = args.transform_config
    if args.slice is not None:
        cfg.image.slice = args.slice
    if args.foreground is not None:
        cfg.foreground.method = args.foreground
    if args.layer is not None:
        cfg.features.layer = args.layer


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
    return save_figure(fig, out_path, int(cfg.dpi))


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
    return save_figure(fig, out_path, int(cfg.dpi))


def run_pca(args: argparse.Namespace, cfg: DictConfig) -> Path:
    _apply_image_overrides(cfg, args)
    if args.resolutions is not None:
        cfg.pca.resolutions = args.resolutions
    if args.pca_fit is not None:
        cfg.pca.fit = args.pca_fit
    ct = load_axial_slice(
        args.image, cfg.image.slice, cfg.foreground.body_threshold_hu, cfg.image.default_slice_near_max
    )
    model, label = resolve_backbone(args.checkpoint, int(cfg.seed), args.arch)
    transform = load_input_transform(transform_config_for(args.checkpoint, cfg))
    return write_pca_png(model, ct, args.out, cfg, transform, label)


def run_similarity(args: argparse.Namespace, cfg: DictConfig) -> Path:
    _apply_image_overrides(cfg, args)
    if args.resolution is not None:
        cfg.similarity.resolution = args.resolution
    ct = load_axial_slice(
        args.image, cfg.image.slice, cfg.foreground.body_threshold_hu, cfg.image.default_slice_near_max
    )
    pixel_to_patch(args.point, ct.hu.shape, (1, 1))  # before loading any model

    def load_one_at_a_time() -> Iterator[tuple[str, torch.nn.Module, InputTransform]]:
        for spec in args.checkpoint:
            model, label = resolve_backbone(spec, int(cfg.seed), args.arch)
            yield label, model, load_input_transform(transform_config_for(spec, cfg))

    return write_similarity_png(load_one_at_a_time(), ct, args.point, args.out, cfg)


def run_curves(args: argparse.Namespace, cfg: DictConfig) -> Path:
    if args.labels is not None and len(args.labels) != len(args.metrics):
        raise ValueError(f"--labels has {len(args.labels)} entries for {len(args.metrics)} metrics files")
    labels = args.labels or [Path(m).parent.name or Path(m).stem for m in args.metrics]
    if len(set(labels)) != len(labels):
        labels = [str(m) for m in args.metrics]
    runs = {label: read_metrics(m) for label, m in zip(labels, args.metrics)}
    window = args.smoothing if args.smoothing is not None else int(cfg.curves.smoothing_window)
    fig = curves_figure(
        runs, list(cfg.curves.loss_keys), [*cfg.curves.schedule_keys, *cfg.curves.diagnostic_keys],
        int(cfg.curves.columns),
        window, float(cfg.panel_size_in),
    )
    return save_figure(fig, args.out, int(cfg.dpi))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        runner = {"pca": run_pca, "similarity": run_similarity, "curves": run_curves}[args.command]
        out = runner(args, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
