"""Finetune pictures (PNG, matplotlib Agg): per-class DSC/NSD bars and image / ground-truth / prediction
overlays.

Callable from the finetune CLI (``plot_summary_bars``, ``plot_case_overlays``) and standalone::

    python -m finetune.plots bars --summary out/validation/summary.json --out out/plots/scores.png
    python -m finetune.plots overlays --image ct.nii.gz --gt gt.nii.gz --pred pred.nii.gz --out case.png

Volumes are reoriented to RAS (nibabel closest canonical); a label map whose grid differs from the image's
is resampled onto the image grid by its affine (nearest neighbour), never matched by raw array index.
Slices are shown in the radiological convention (patient's right on the image left, anterior at the top).
Defaults live in the ``finetune`` block of ``configs/visualize.yaml``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from meddino_common.config import load_config as load_strict, shipped_config
from meddino_common.figures import save_png  # selects the Agg backend
from meddino_common.volumes import open_canonical_nifti, ras_to_display, read_voxels

DEFAULT_CONFIG = shipped_config("visualize.yaml")
# metric -> accepted key names: ours (finetune.metrics: dice, nsd_boundary | nsd_surface, hd95), nnU-Net's "Dice"
METRIC_ALIASES = {"dice": ("dice",), "nsd": ("nsd", "nsd_boundary", "nsd_surface"), "hd95": ("hd95",)}
METRIC_LABELS = {"dice": "DSC", "nsd": "NSD", "hd95": "HD95 (mm)"}
NSD_METHODS = ("boundary", "surface")  # finetune.metrics: voxel-face boundary | area-weighted surfels


@dataclass(frozen=True)
class PlotSettings:
    """The ``finetune`` block of ``configs/visualize.yaml`` plus the file's shared figure settings."""

    metrics: tuple[str, ...]
    n_slices: int
    max_overlay_cases: int
    display_window_hu: tuple[float, float]
    label_alpha: float
    label_colormap: str
    dpi: int
    panel_size_in: float


def load_config(path: str | Path | None = None) -> PlotSettings:
    """Settings from ``configs/visualize.yaml``, with ``path`` (a ``--config`` file) merged over it strictly: a key
    the defaults do not declare is a one-line error naming it."""
    cfg = load_strict([DEFAULT_CONFIG], [path] if path is not None else [])
    block = cfg.finetune
    return PlotSettings(tuple(str(m) for m in block.metrics), int(block.n_slices), int(block.max_overlay_cases),
                        (float(block.display_window_hu[0]), float(block.display_window_hu[1])),
                        float(block.label_alpha), str(block.label_colormap), int(cfg.dpi), float(cfg.panel_size_in))


# --------------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------------
def _metric_value(scores: Mapping[str, Any], metric: str) -> float | None:
    for key, value in scores.items():
        if key.lower() in METRIC_ALIASES.get(metric, (metric,)) and isinstance(value, (int, float)):
            return float(value)
    return None


def nsd_definition(summary: Mapping[str, Any]) -> str:
    """How the summary's NSD was computed, for the label next to the number: ``"boundary, τ = 1 mm"``.

    Read from ``nsd_definition.method`` (nnU-Net layout), ``nsd_method``, or the NSD key's name (``nsd_boundary`` /
    ``nsd_surface``); the tolerance from ``nsd_tolerance_mm`` (a number or ``{"default": mm, class: mm}``). The
    two definitions differ by ~10 points on real masks, so a number without its definition is not comparable.
    """
    definition = summary.get("nsd_definition")
    method = definition.get("method") if isinstance(definition, Mapping) else summary.get("nsd_method")
    if method is None:
        blocks = [b for b in (summary.get("per_class"), summary.get("mean")) if isinstance(b, Mapping)]
        keys = {k for b in blocks for v in b.values() if isinstance(v, Mapping) for k in v} | {
            k for b in blocks for k in b}
        method = next((m for m in NSD_METHODS if f"nsd_{m}" in keys), None)
    tolerance = summary.get("nsd_tolerance_mm")
    if isinstance(tolerance, Mapping):
        others = {k: v for k, v in tolerance.items() if k != "default"}
        tolerance = f"{tolerance.get('default'):g} mm" + (" (per class: " + ", ".join(
            f"{k} {v:g}" for k, v in others.items()) + ")" if others else "")
    elif tolerance is not None:
        tolerance = f"{float(tolerance):g} mm"
    parts = [str(method) if method else "definition not recorded"] + ([f"τ = {tolerance}"] if tolerance else [])
    return ", ".join(parts)


def per_class_scores(summary: Mapping[str, Any], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{metric: {class_name: value}}`` from a finetune ``summary.json``.

    The per-class block is ``per_class`` (ours, the paper's convention) or ``mean`` (nnU-Net's ``summary.json``),
    each mapping a class name (or label id) to ``{metric: value}``; metric names match case-insensitively (``Dice``).
    """
    block = None
    for key in ("per_class", "mean"):
        candidate = summary.get(key)
        if isinstance(candidate, Mapping) and candidate and all(isinstance(v, Mapping) for v in candidate.values()):
            block = candidate
            break
    if block is None:
        raise ValueError("summary has no per-class block (expected 'per_class': {class: {dice, nsd}})")
    out: dict[str, dict[str, float]] = {m: {} for m in metrics}
    for name, scores in block.items():
        for metric in metrics:
            value = _metric_value(scores, metric)
            if value is not None:
                out[metric][str(name)] = value
    if not any(out.values()):
        raise ValueError(f"summary per-class block has none of the metrics {list(metrics)}")
    return out


def per_case_spread(csv_path: str | Path, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Standard deviation over cases ``{metric: {class_name: std}}`` from ``per_case.csv``
    (`finetune.metrics.write_per_case_csv`: one row per case and class, columns ``case_id, class, dice,
    nsd_<method>, hd95, gt_present, ...``). Rows with empty/NaN values, or with ``gt_present`` 0, are ignored (as in
    the summary means)."""
    path = Path(csv_path)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path}: no rows")
    columns = rows[0].keys()
    if "class" not in columns:
        raise ValueError(f"{path}: no 'class' column (expected finetune's per_case.csv)")
    values: dict[str, dict[str, list[float]]] = {m: {} for m in metrics}
    for row in rows:
        if str(row.get("gt_present", "1")).strip().lower() in ("0", "false"):
            continue  # a class absent from this case's ground truth is not in the means (finetune.metrics)
        for metric in metrics:
            column = next((c for c in columns if c.lower() in METRIC_ALIASES.get(metric, (metric,))), None)
            if column is None:
                continue
            try:
                value = float(row[column]) if row[column] not in (None, "") else math.nan
            except ValueError:
                continue
            if math.isfinite(value):
                values[metric].setdefault(str(row["class"]), []).append(value)
    return {m: {c: float(np.std(v)) for c, v in per.items() if len(v) > 1} for m, per in values.items()}


def scores_figure(
    scores: Mapping[str, Mapping[str, float]],
    spread: Mapping[str, Mapping[str, float]] | None,
    title: str,
    panel_in: float,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Grouped bars: one group per class, one bar per metric (value written at its base); error bars = std
    over cases when ``spread`` is given. ``labels`` name the metrics in the legend (default ``METRIC_LABELS``)."""
    labels = {**METRIC_LABELS, **(labels or {})}
    metrics = [m for m in scores if scores[m]]
    classes: list[str] = []
    for m in metrics:
        classes += [c for c in scores[m] if c not in classes]
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(panel_in * 1.5, 0.9 * len(classes) + 2.0), panel_in * 1.2),
                           layout="constrained")
    for k, metric in enumerate(metrics):
        heights = np.array([scores[metric].get(c, np.nan) for c in classes])
        errors = None
        if spread and spread.get(metric):
            errors = np.array([spread[metric].get(c, np.nan) for c in classes])
        bars = ax.bar(x + (k - (len(metrics) - 1) / 2) * width, np.nan_to_num(heights), width,
                      yerr=errors, capsize=2, label=f"{labels.get(metric, metric)} "
                      f"(mean {np.nanmean(heights):.3f})")
        for bar, h in zip(bars, heights):
            # value printed inside the bar's base so it never collides with the error bar
            text = "n/a" if not np.isfinite(h) else f"{h:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, 0.0), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points", rotation=90,
                        color="white" if np.isfinite(h) and h > 0.15 else "black")
    ax.set_xticks(x, classes, rotation=30 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center")
    bounded = all(0.0 <= v <= 1.0 for m in metrics if m != "hd95" for v in scores[m].values())
    if bounded:
        ax.set_ylim(0, 1.08)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncol=max(1, len(metrics)))
    ax.set_title(title, fontsize=10)
    return fig


def plot_summary_bars(
    summary_path: str | Path,
    out_path: str | Path,
    per_case_csv: str | Path | None = None,
    cfg: PlotSettings | None = None,
) -> Path:
    """Bar chart of per-class DSC/NSD from ``summary.json`` (+ std over cases from the per-case CSV)."""
    cfg = cfg if cfg is not None else load_config()
    summary_path = Path(summary_path)
    if not summary_path.is_file():
        raise FileNotFoundError(f"summary not found: {summary_path}")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{summary_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    metrics = list(cfg.metrics)
    try:
        scores = per_class_scores(summary, metrics)
    except ValueError as exc:
        raise ValueError(f"{summary_path}: {exc}") from exc
    spread = per_case_spread(per_case_csv, metrics) if per_case_csv is not None else None
    title = " | ".join(f"{k} {summary[k]}" if k == "fold" else str(summary[k])
                       for k in ("task", "head", "fold", "checkpoint") if k in summary)
    fig = scores_figure(scores, spread, title or summary_path.parent.name, float(cfg.panel_size_in),
                        {"nsd": f"NSD ({nsd_definition(summary)})"})
    return save_png(fig, out_path, int(cfg.dpi))


# --------------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------------
def _labels_on_grid(labels: nib.Nifti1Image, reference: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """Integer label array on ``reference``'s voxel grid [X, Y, Z] (identity when the grids agree).

    Otherwise nearest-neighbour by affine: each reference voxel centre is mapped into the label volume's
    voxel coordinates and rounded (tolerant to float error at crop edges); outside -> 0. One axial slice
    at a time keeps memory at O(X*Y).
    """
    shape = reference.shape[:3]
    data = np.rint(np.asanyarray(labels.dataobj)).astype(np.int32).reshape(labels.shape[:3])
    if labels.shape[:3] == shape and np.allclose(labels.affine, reference.affine, atol=1e-3):
        return data
    ref_to_label = np.linalg.inv(labels.affine) @ reference.affine
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    out = np.zeros(shape, dtype=np.int32)
    for k in range(shape[2]):
        ijk = np.stack([ii, jj, np.full_like(ii, k), np.ones_like(ii)], axis=0).reshape(4, -1)
        src = np.rint(ref_to_label[:3] @ ijk).astype(np.int64)
        inside = np.all((src >= 0) & (src < np.array(data.shape)[:, None]), axis=0)
        plane = np.zeros(ii.size, dtype=np.int32)
        plane[inside] = data[src[0, inside], src[1, inside], src[2, inside]]
        out[:, :, k] = plane.reshape(ii.shape)
    if data.any() and not out.any():
        raise ValueError(f"{path}: labels do not overlap the image after alignment by affine")
    return out


def load_case(image_path: str | Path, gt_path: str | Path | None, pred_path: str | Path | None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, tuple[float, float]]:
    """(hu [X,Y,Z], gt [X,Y,Z] | None, pred [X,Y,Z] | None, in-plane (row, col) spacing of displayed slices)."""
    image = open_canonical_nifti(image_path, "image")
    hu = read_voxels(image, image_path)
    gt = _labels_on_grid(open_canonical_nifti(gt_path, "ground truth"), image, gt_path) if gt_path else None
    pred = _labels_on_grid(open_canonical_nifti(pred_path, "prediction"), image, pred_path) if pred_path else None
    zooms = image.header.get_zooms()
    return hu, gt, pred, (float(zooms[1]), float(zooms[0]))


def choose_slices(gt: np.ndarray | None, pred: np.ndarray | None, n_slices: int, depth: int) -> list[int]:
    """Up to ``n_slices`` axial indices: the foreground z-range (ground truth, else prediction, else the
    whole volume) split into equal bins, in each the slice with the largest labelled area."""
    source = gt if gt is not None and gt.any() else pred if pred is not None and pred.any() else None
    if source is None:
        return sorted({int(round(v)) for v in np.linspace(0, depth - 1, n_slices + 2)[1:-1]})
    area = (source > 0).sum(axis=(0, 1))
    present = np.nonzero(area)[0]
    bins = np.array_split(present, min(n_slices, present.size))
    return sorted(int(b[np.argmax(area[b])]) for b in bins if b.size)


def slice_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean Dice over the classes present in either 2-D label map (NaN when both are empty)."""
    classes = np.union1d(np.unique(gt), np.unique(pred))
    classes = classes[classes > 0]
    if classes.size == 0:
        return math.nan
    scores = [2.0 * np.sum((gt == c) & (pred == c)) / (np.sum(gt == c) + np.sum(pred == c)) for c in classes]
    return float(np.mean(scores))


def label_colours(n_classes: int, colormap: str) -> np.ndarray:
    """[n_classes + 1, 4] RGBA; row 0 (background) transparent, class c -> colour c-1 of ``colormap``."""
    cmap = plt.get_cmap(colormap)
    colours = np.zeros((n_classes + 1, 4))
    for c in range(1, n_classes + 1):
        if isinstance(cmap, ListedColormap):  # qualitative maps (tab10/tab20): colour by index, cycling
            colours[c] = cmap((c - 1) % cmap.N)
        else:  # continuous maps: spread the classes over the range
            colours[c] = cmap((c - 1) / max(1, n_classes - 1))
    return colours


def overlay_rgba(labels: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """[H, W] int labels -> [H, W, 4] RGBA (transparent background)."""
    rgba = colours[np.clip(labels, 0, colours.shape[0] - 1)].copy()
    rgba[..., 3] = np.where(labels > 0, alpha, 0.0)
    return rgba


def overlays_figure(
    display_slices: Sequence[np.ndarray],
    gt_slices: Sequence[np.ndarray | None],
    pred_slices: Sequence[np.ndarray | None],
    slice_titles: Sequence[str],
    spacing_mm: Sequence[float],
    class_names: Mapping[int, str],
    colormap: str,
    alpha: float,
    panel_in: float,
    title: str = "",
) -> Figure:
    """One row per slice: CT | CT + ground truth | CT + prediction (with per-slice mean Dice).

    ``display_slices`` [H, W] in [0, 1]; label slices [H, W] int, already in display orientation.
    """
    n_rows = len(display_slices)
    n_cols = 1 + any(g is not None for g in gt_slices) + any(p is not None for p in pred_slices)
    n_classes = max([1, *class_names.keys()] + [int(a.max()) for a in (*gt_slices, *pred_slices) if a is not None])
    colours = label_colours(n_classes, colormap)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(panel_in * n_cols, panel_in * n_rows + 0.6),
                             squeeze=False, layout="constrained")
    aspect = float(spacing_mm[0]) / float(spacing_mm[1])
    seen: set[int] = set()
    for row, (img, gt, pred, name) in enumerate(zip(display_slices, gt_slices, pred_slices, slice_titles)):
        panels: list[tuple[str, np.ndarray | None]] = [(name, None)]
        if gt is not None:
            panels.append(("ground truth", gt))
        if pred is not None:
            label = "prediction"
            if gt is not None:
                d = slice_dice(gt, pred)
                label += f" (slice DSC {d:.2f})" if math.isfinite(d) else " (both empty)"
            panels.append((label, pred))
        for col, (panel_title, labels) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect=aspect)
            if labels is not None:
                ax.imshow(overlay_rgba(labels, colours, alpha), aspect=aspect, interpolation="nearest")
                seen.update(int(c) for c in np.unique(labels) if c > 0)
            ax.set_title(panel_title, fontsize=9)
            ax.set_axis_off()
    if seen:
        handles = [Patch(color=colours[c][:3], label=class_names.get(c, f"label {c}")) for c in sorted(seen)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_case_overlays(
    image_path: str | Path,
    gt_path: str | Path | None,
    pred_path: str | Path | None,
    out_path: str | Path,
    class_names: Mapping[Any, Any] | None = None,
    n_slices: int | None = None,
    cfg: PlotSettings | None = None,
) -> Path:
    """Overlay PNG of one case: ``n_slices`` axial slices, CT | ground truth | prediction.

    At least one of ``gt_path``/``pred_path`` is required; labels are aligned to the image by affine.
    ``class_names``: ``{label_id: name}`` or nnU-Net style ``{name: label_id}``.
    """
    if gt_path is None and pred_path is None:
        raise ValueError("give a ground truth and/or a prediction to overlay")
    cfg = cfg if cfg is not None else load_config()
    hu, gt, pred, spacing = load_case(image_path, gt_path, pred_path)
    n = int(n_slices if n_slices is not None else cfg.n_slices)
    if n < 1:
        raise ValueError(f"n_slices must be >= 1, got {n}")
    indices = choose_slices(gt, pred, n, hu.shape[2])
    low, high = (float(v) for v in cfg.display_window_hu)
    displays = [np.clip((ras_to_display(hu[:, :, z]) - low) / (high - low), 0, 1) for z in indices]
    gts = [ras_to_display(gt[:, :, z]) if gt is not None else None for z in indices]
    preds = [ras_to_display(pred[:, :, z]) if pred is not None else None for z in indices]
    names = normalise_class_names(class_names)
    fig = overlays_figure(displays, gts, preds, [f"axial slice {z}" for z in indices], spacing, names,
                          str(cfg.label_colormap), float(cfg.label_alpha), float(cfg.panel_size_in),
                          Path(image_path).name)
    return save_png(fig, out_path, int(cfg.dpi))


def normalise_class_names(names: Mapping[Any, Any] | None) -> dict[int, str]:
    """``{label_id: name}`` from either ``{id: name}`` or nnU-Net's ``{name: id}`` (or ``{name: [id]}``
    as in ``summary.json``'s ``classes``; multi-label regions are skipped). Background (0) is dropped."""
    out: dict[int, str] = {}
    for key, value in (names or {}).items():
        if isinstance(key, int) or str(key).isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            out[int(value)] = str(key)
        elif isinstance(value, (list, tuple)) and len(value) == 1:
            out[int(value[0])] = str(key)
    return {k: v for k, v in out.items() if k > 0}


def plot_finetune_outputs(
    output_dir: str | Path,
    cases: Sequence[Any],
    class_names: Mapping[Any, Any] | None = None,
    cfg: PlotSettings | None = None,
) -> list[Path]:
    """All pictures of a finetune run, written under ``output_dir/plots``.

    ``output_dir`` holds ``per_case.csv``, ``validation/summary.json`` and ``validation/<case_id>.nii.gz`` (as written by
    ``finetune.run``); ``cases`` are the validation cases, as ``finetune.tasks`` ``Case`` objects (``case_id``,
    ``image``, ``label``) or ``(case_id, image_path, label_path)`` tuples. Writes ``plots/scores.png`` and
    ``plots/overlays/<case_id>.png`` for the first ``max_overlay_cases`` cases that have a prediction and a
    NIfTI image (a DICOM-series case is reported and skipped). Returns the written paths.
    """
    cfg = cfg if cfg is not None else load_config()
    output_dir = Path(output_dir)
    written = []
    summary = output_dir / "validation" / "summary.json"
    per_case = output_dir / "per_case.csv"
    if summary.is_file():
        if class_names is None:
            class_names = json.loads(summary.read_text()).get("classes")
        written.append(plot_summary_bars(summary, output_dir / "plots" / "scores.png",
                                         per_case if per_case.is_file() else None, cfg))
    n_done = 0
    for case in cases:
        case_id, image, label = (case.case_id, case.image, case.label) if hasattr(case, "case_id") else case
        if n_done >= int(cfg.max_overlay_cases):
            break
        pred = output_dir / "validation" / f"{case_id}.nii.gz"
        if not pred.is_file():
            continue
        if not str(image).endswith((".nii", ".nii.gz")):
            print(f"plots: no overlay for case {case_id}: image {image} is not a NIfTI file", file=sys.stderr)
            continue
        written.append(plot_case_overlays(image, label, pred, output_dir / "plots" / "overlays" / f"{case_id}.png",
                                          class_names, None, cfg))
        n_done += 1
    return written


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _class_names(text: str | None) -> dict[int, str]:
    """``--labels``: a JSON file (``{"1": "spleen"}``, or an nnU-Net ``dataset.json`` with ``"labels":
    {"spleen": 1}``) or inline ``1=spleen,2=liver``."""
    if not text:
        return {}
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
        return normalise_class_names(data.get("labels", data))
    out = {}
    for item in text.split(","):
        key, _, name = item.partition("=")
        if not key.strip().isdigit() or not name:
            raise ValueError(f"--labels expects a JSON file or 1=name,2=name, got {text!r}")
        out[int(key)] = name.strip()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bars = sub.add_parser("bars", help="per-class DSC/NSD bar chart from summary.json")
    bars.add_argument("--summary", required=True, help="a run's validation/summary.json")
    bars.add_argument("--per-case", default=None, help="per-case CSV (adds std error bars)")
    bars.add_argument("--out", required=True, help="output PNG")
    over = sub.add_parser("overlays", help="CT / ground truth / prediction overlays for a few slices")
    over.add_argument("--image", required=True, help="CT volume (NIfTI)")
    over.add_argument("--gt", default=None, help="ground-truth label map on the image grid (NIfTI)")
    over.add_argument("--pred", default=None, help="predicted label map, e.g. a run's validation/<case>.nii.gz")
    over.add_argument("--labels", default=None, help="class names: JSON file or 1=spleen,2=liver")
    over.add_argument("--slices", type=int, default=None, help="number of slices (default from config)")
    over.add_argument("--out", required=True, help="output PNG")
    for p in (bars, over):
        p.add_argument("--config", default=None, help=f"visualisation config (default {DEFAULT_CONFIG})")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.command == "bars":
            out = plot_summary_bars(args.summary, args.out, args.per_case, cfg)
        else:
            out = plot_case_overlays(args.image, args.gt, args.pred, args.out, _class_names(args.labels),
                                     args.slices, cfg)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
