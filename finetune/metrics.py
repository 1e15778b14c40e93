"""Segmentation metrics on binary masks, and the per-case / per-class evaluation and report.

All functions take numpy bool arrays of equal shape (2-D or 3-D) and ``spacing`` in mm per axis, in the same axis
order as the arrays. Undefined values are NaN:

- ``dice``: 2|P∩G| / (|P| + |G|). Both empty -> NaN (nothing to segment, nothing predicted); only one empty -> 0.
- ``nsd``: normalised surface Dice at tolerance ``tolerance_mm`` (Nikolov et al. 2021). Both empty -> NaN; only one
  empty -> 0. Two named definitions:
    * ``method="boundary"`` (voxel boundary, as MONAI ``compute_surface_dice`` without sub-voxels and most
      challenge scripts): surface = mask voxels with a 6-connected (face) neighbour outside the mask (the array edge
      counts as outside); NSD = (#pred-boundary voxels within τ of the GT boundary + #GT-boundary voxels within τ
      of the pred boundary) / (#pred-boundary + #GT-boundary).
    * ``method="surface"`` (area-weighted surfels, DeepMind ``surface-distance``): the surface is made of
      marching-cubes-like surface elements on every 2x2x2 voxel neighbourhood (2x2 in 2-D: contour length), each
      weighted by its area (MONAI's neighbour-code tables); NSD = (area of pred surface within τ of the GT surface
      + area of GT surface within τ of the pred surface) / (total area of both).
- ``hd95``: 95th percentile Hausdorff distance on boundary voxels: max over both directions of the 95th percentile
  (numpy linear interpolation) of the distances from one boundary to the other. NaN if either mask is empty
  (the distance to an empty set is undefined).

Distances are Euclidean in mm (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``), computed on the
bounding box of both masks plus one voxel, which is exact because every boundary point lies inside it.

Reports (`build_summary`): ``summary.json`` holds nnU-Net v2's layout (``foreground_mean``, ``mean``,
``metric_per_case``; keys are label ids, means over all cases) and, beside it, the MedDINOv3 paper's convention
(``paper_mean``, ``per_class``: per label, cases whose reference lacks the class left out), plus the task's
evaluation regions (``regions``) scored both ways. Every NSD is named by its definition (``nsd_boundary``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from meddino_common.atomic import atomic_write_text
from meddino_common.config import shipped_config

NSD_METHODS = ("boundary", "surface")


def _check(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per axis of a {pred.ndim}-D mask")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient; NaN when both masks are empty."""
    pred, gt = _check(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return float("nan")
    return 2.0 * float(np.logical_and(pred, gt).sum()) / total


def _union_crop(pred: np.ndarray, gt: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union, padded by ``margin`` zero voxels on every side."""
    union = pred | gt
    slices = ndimage.find_objects(union.astype(np.uint8))[0]
    pad = [(margin, margin)] * pred.ndim
    return np.pad(pred[slices], pad), np.pad(gt[slices], pad)


def boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (array edge = outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _distance_to(target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from every voxel to the nearest ``True`` voxel of ``target`` (non-empty)."""
    return ndimage.distance_transform_edt(~target, sampling=spacing)


def _boundary_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) pred-boundary -> GT-boundary and GT-boundary -> pred-boundary; both masks non-empty."""
    pred, gt = _union_crop(pred, gt)
    bp, bg = boundary(pred), boundary(gt)
    return _distance_to(bg, spacing)[bp], _distance_to(bp, spacing)[bg]


def _surfels(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surfel positions and areas on the 2^n-neighbourhood grid: ``(edge_pred, edge_gt, area_pred, area_gt)``."""
    from monai.metrics.utils import get_code_to_measure_table

    table, kernel = get_code_to_measure_table(tuple(float(s) for s in spacing))
    conv = torch.nn.functional.conv3d if pred.ndim == 3 else torch.nn.functional.conv2d
    vol = torch.from_numpy(np.stack([pred, gt])[:, None].astype(np.float32))
    codes = conv(vol, kernel.to(vol)).long()[:, 0]
    full = len(table) - 1
    edges = (codes != 0) & (codes != full)
    areas = table.to(torch.float64)[codes]
    return edges[0].numpy(), edges[1].numpy(), areas[0].numpy(), areas[1].numpy()


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0,
        method: str = "boundary") -> float:
    """Normalised surface Dice at ``tolerance_mm`` (see module docstring for both definitions)."""
    pred, gt = _check(pred, gt, spacing)
    if method not in NSD_METHODS:
        raise ValueError(f"nsd method must be one of {NSD_METHODS}, got {method!r}")
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return float("nan")
    if not (has_p and has_g):
        return 0.0
    if method == "boundary":
        d_pg, d_gp = _boundary_distances(pred, gt, spacing)
        return float(((d_pg <= tolerance_mm).sum() + (d_gp <= tolerance_mm).sum()) / (d_pg.size + d_gp.size))
    p, g = _union_crop(pred, gt)
    edge_p, edge_g, area_p, area_g = _surfels(p, g, spacing)
    d_pg = _distance_to(edge_g, spacing)[edge_p]
    d_gp = _distance_to(edge_p, spacing)[edge_g]
    a_p, a_g = area_p[edge_p], area_g[edge_g]
    total = a_p.sum() + a_g.sum()
    if total <= 0:
        return float("nan")
    return float((a_p[d_pg <= tolerance_mm].sum() + a_g[d_gp <= tolerance_mm].sum()) / total)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm; NaN if either mask is empty."""
    pred, gt = _check(pred, gt, spacing)
    if not pred.any() or not gt.any():
        return float("nan")
    d_pg, d_gp = _boundary_distances(pred, gt, spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


# ------------------------------------------------------------------------------------------------ evaluation
NSD_DEFINITIONS = {
    "boundary": "voxel-face boundary (MONAI compute_surface_dice without sub-voxels, as the MedDINOv3 metric script)",
    "surface": "area-weighted surfels on 2x2x2 neighbourhoods (DeepMind surface-distance)",
}


def nsd_key(method: str) -> str:
    """Name of the NSD entry in reports: the definition is part of the name (``nsd_boundary`` / ``nsd_surface``)."""
    if method not in NSD_METHODS:
        raise ValueError(f"nsd method must be one of {NSD_METHODS}, got {method!r}")
    return f"nsd_{method}"


def evaluation_classes(labels: Sequence[str]) -> dict[str, list[int]]:
    """Per-label evaluation classes ``name -> [label id]`` (background dropped), as the MedDINOv3 metric script."""
    return {name: [i] for i, name in enumerate(labels) if i > 0}


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], classes: Mapping[str, Sequence[int]],
                  tolerance_mm: float | Mapping[str, float] = 1.0, nsd_method: str = "boundary",
                  compute_hd95: bool = True) -> dict[str, dict]:
    """Per-class metrics for one case. ``pred``/``gt`` are label maps; a class (a label id or a union of ids) absent
    from the GT gets ``gt_present=False`` (its Dice is 0 if something was predicted, NaN otherwise). The confusion
    counts ``tp/fp/fn/tn`` feed nnU-Net's summary layout; ``nsd_method`` travels with the NSD value."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    out = {}
    for name, ids in classes.items():
        p, g = np.isin(pred, ids), np.isin(gt, ids)
        # a mapping holds per-class overrides and the "default" (metrics.nsd_tolerance_mm): no hidden fallback here
        tol = float(tolerance_mm[name] if name in tolerance_mm else tolerance_mm["default"]) \
            if isinstance(tolerance_mm, Mapping) else float(tolerance_mm)
        tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
        out[name] = {"dice": dice(p, g), "nsd": nsd(p, g, spacing, tol, nsd_method), "nsd_method": nsd_method,
                     "hd95": hd95(p, g, spacing) if compute_hd95 else float("nan"),
                     "gt_present": bool(g.any()), "gt_voxels": tp + fn, "pred_voxels": tp + fp,
                     "nsd_tolerance_mm": tol, "tp": tp, "fp": fp, "fn": fn, "tn": int(p.size) - tp - fp - fn}
    return out


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _method_of(per_case: Mapping[str, Mapping[str, dict]]) -> str:
    methods = {row["nsd_method"] for classes in per_case.values() for row in classes.values()}
    if len(methods) > 1:
        raise ValueError(f"cases were scored with different NSD definitions {sorted(methods)}")
    return methods.pop() if methods else "boundary"


def summarize(per_case: Mapping[str, Mapping[str, dict]]) -> dict:
    """The paper's convention (MedDINOv3 ``compute_metrics.py``): per class the mean over the cases whose reference
    contains it (absent -> left out), then the mean over classes. NSD is named by its definition."""
    key = nsd_key(_method_of(per_case))
    classes = list(next(iter(per_case.values())).keys()) if per_case else []
    per_class = {}
    for name in classes:
        rows = [per_case[c][name] for c in per_case]
        present = [r for r in rows if r["gt_present"]]
        absent = [r for r in rows if not r["gt_present"]]
        per_class[name] = {
            "dice": _nanmean(r["dice"] for r in present), key: _nanmean(r["nsd"] for r in present),
            "hd95": _nanmean(r["hd95"] for r in present), "n_cases": len(present),
            "n_absent_in_gt": len(absent), "n_false_positive_when_absent": sum(r["pred_voxels"] > 0 for r in absent),
        }
    mean = {k: _nanmean(per_class[c][k] for c in per_class) for k in ("dice", key, "hd95")}
    return {"mean": mean, "per_class": per_class, "n_cases": len(per_case)}


def nnunet_key(ids: Sequence[int]) -> str:
    """nnU-Net's ``label_or_region_to_key``: ``"2"`` for a label, ``"(1, 2, 3)"`` for a region."""
    ids = [int(i) for i in ids]
    return str(ids[0]) if len(ids) == 1 else str(tuple(ids))


def nnunet_summary(per_case: Mapping[str, Mapping[str, dict]], classes: Mapping[str, Sequence[int]],
                   files: Mapping[str, tuple[str, str]]) -> dict:
    """nnU-Net v2's ``summary.json`` layout (``evaluation/evaluate_predictions.compute_metrics_on_folder``).

    ``metric_per_case``: one entry per case with ``reference_file``, ``prediction_file`` and ``metrics`` keyed by
    label id / region tuple string; ``mean``: per key the nanmean over ALL cases (a false positive on a case without
    the class counts Dice 0; nnU-Net's convention, not the paper's); ``foreground_mean``: plain mean over the keys.
    Besides nnU-Net's Dice/IoU/counts each entry carries ``NSD_<definition>`` and ``HD95`` (mm).
    """
    nsd_name = f"NSD_{_method_of(per_case)}"
    per_case_out = []
    for case_id, rows in per_case.items():
        metrics = {}
        for name, ids in classes.items():
            r = rows[name]
            union = r["tp"] + r["fp"] + r["fn"]
            metrics[nnunet_key(ids)] = {
                "Dice": r["dice"],                                   # NaN iff tp + fp + fn == 0, as nnU-Net
                "IoU": r["tp"] / union if union else float("nan"),
                "FP": r["fp"], "TP": r["tp"], "FN": r["fn"], "TN": r["tn"],
                "n_pred": r["tp"] + r["fp"], "n_ref": r["tp"] + r["fn"], nsd_name: r["nsd"], "HD95": r["hd95"]}
        reference, prediction = files[case_id]
        per_case_out.append({"reference_file": reference, "prediction_file": prediction, "metrics": metrics})
    keys = [nnunet_key(ids) for ids in classes.values()]
    metric_names = list(per_case_out[0]["metrics"][keys[0]]) if per_case_out and keys else []
    mean = {k: {m: _nanmean(c["metrics"][k][m] for c in per_case_out) for m in metric_names} for k in keys}
    foreground = {m: float(np.mean([mean[k][m] for k in keys])) if keys else float("nan") for m in metric_names}
    return {"foreground_mean": foreground, "mean": mean, "metric_per_case": per_case_out}


SUMMARY_CONVENTIONS = {
    "foreground_mean/mean/metric_per_case": "nnU-Net v2 layout (readable by nnunetv2 load_summary_json): keys are label "
        "ids, per-key means over all cases; a prediction on a case whose reference lacks the class counts Dice 0",
    "paper_mean/per_class": "MedDINOv3 paper convention (its compute_metrics.py, Table 2): per label, cases whose "
        "reference lacks the class are left out of that class's mean; paper_mean is the mean over classes",
    "regions": "the task's evaluation regions (unions of label ids, e.g. KiTS23's hierarchical classes), scored "
        "both ways: regions.paper_mean/per_class and regions.mean/foreground_mean (nnU-Net, region tuple keys)",
}


def build_summary(per_case: Mapping[str, Mapping[str, dict]], classes: Mapping[str, Sequence[int]],
                  files: Mapping[str, tuple[str, str]],
                  region_cases: Optional[Mapping[str, Mapping[str, dict]]] = None,
                  regions: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
    """The full ``summary.json`` content: nnU-Net's layout at the top level, the paper's convention beside it
    (``paper_mean``, ``per_class``), and the optional regions scored both ways under ``regions``."""
    paper = summarize(per_case)
    method = _method_of(per_case)
    out = {**nnunet_summary(per_case, classes, files), "paper_mean": paper["mean"], "per_class": paper["per_class"],
           "n_cases": paper["n_cases"], "classes": {k: list(v) for k, v in classes.items()},
           "nsd_definition": {"method": method, "key": nsd_key(method), "text": NSD_DEFINITIONS[method]},
           "conventions": SUMMARY_CONVENTIONS}
    if regions:
        region_paper = summarize(region_cases)
        region_nnunet = nnunet_summary(region_cases, regions, files)
        out["regions"] = {"classes": {k: list(v) for k, v in regions.items()}, "paper_mean": region_paper["mean"],
                          "per_class": region_paper["per_class"], "mean": region_nnunet["mean"],
                          "foreground_mean": region_nnunet["foreground_mean"]}
    return out


def write_per_case_csv(per_case: Mapping[str, Mapping[str, dict]], path: str | Path) -> None:
    """One row per (case, class); the NSD column is named by its definition (``nsd_boundary`` / ``nsd_surface``)."""
    key = nsd_key(_method_of(per_case))
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["case_id", "class", "dice", key, "hd95", "gt_present", "gt_voxels", "pred_voxels",
                     "nsd_tolerance_mm"])
    for case_id, classes in per_case.items():
        for name, m in classes.items():
            writer.writerow([case_id, name, m["dice"], m["nsd"], m["hd95"], int(m["gt_present"]), m["gt_voxels"],
                             m["pred_voxels"], m["nsd_tolerance_mm"]])
    atomic_write_text(path, rows.getvalue())


def write_summary_json(summary: dict, path: str | Path, extra: Optional[dict] = None) -> None:
    data = dict(summary, **(extra or {}))
    atomic_write_text(path, json.dumps(data, indent=2,
                                       default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))


def _nsd_value(scores: Mapping[str, float]) -> float:
    """The NSD entry of a paper-convention block, whichever definition it was scored with."""
    return next((float(v) for k, v in scores.items() if k in {nsd_key(m) for m in NSD_METHODS}), float("nan"))


def format_table(summaries: Mapping[str, dict], method_name: str = "MedDINOv3 (ours)") -> str:
    """A Table-2-style block in the paper's convention (``paper_mean``/``per_class`` of `build_summary` or
    `summarize`): DSC (%) and NSD (%) per dataset, then the per-class breakdown of each dataset."""
    names = list(summaries)
    means = {n: summaries[n].get("paper_mean", summaries[n].get("mean")) for n in names}
    def pct(v: float) -> str:
        return "  n/a " if math.isnan(v) else f"{100 * v:6.2f}"
    head = f"{'Method':<20}| " + " ".join(f"{n[:8]:>8}" for n in names) + " | " + " ".join(f"{n[:8]:>8}" for n in names)
    lines = [f"{'':<20}| {'DSC (%)':^{9 * len(names)}}| {'NSD (%)':^{9 * len(names)}}", head, "-" * len(head),
             f"{method_name:<20}| " + " ".join(f"{pct(means[n]['dice']):>8}" for n in names) + " | "
             + " ".join(f"{pct(_nsd_value(means[n])):>8}" for n in names)]
    for n in names:
        lines += ["", f"{n}: per class (DSC %, NSD %, HD95 mm, cases with the class in GT / absent)"]
        for cls, m in summaries[n]["per_class"].items():
            hd = "   n/a" if math.isnan(m["hd95"]) else f"{m['hd95']:6.2f}"
            lines.append(f"  {cls:<28} {pct(m['dice'])} {pct(_nsd_value(m))} {hd}   {m['n_cases']:>3} / {m['n_absent_in_gt']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ vs the paper
PAPER_TABLE = shipped_config("finetune", "paper_table2.yaml")


def read_summary(path: str | Path) -> dict:
    """A run's ``summary.json`` (the file, or its fold folder: ``validation/summary.json`` there, as nnU-Net keeps
    it), with a one-line error for a missing or broken file."""
    path = Path(path)
    if path.is_dir():
        nested = path / "validation" / "summary.json"
        path = nested if nested.is_file() or not (path / "summary.json").is_file() else path / "summary.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no summary.json (did the finetune run finish its evaluation?)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def compare_with_paper(summaries: Sequence[dict], paper: Mapping[str, Mapping]) -> str:
    """A Markdown table: our DSC/NSD (paper convention) next to Table 2's, plus nnU-Net's foreground-mean Dice."""
    rows = ["| dataset (task) | fold | DSC % ours | DSC % paper | NSD % ours | NSD % paper | nnU-Net-style Dice % |",
            "|---|---|---|---|---|---|---|"]
    def pct(v) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"
    for summary in summaries:
        task = str(summary.get("task"))
        ref = paper.get(task, {})
        mean = summary.get("paper_mean", {})
        rows.append(f"| {ref.get('column', '-')} ({task}) | {summary.get('fold', '?')} | {pct(mean.get('dice'))} | "
                    f"{ref.get('dsc', '-')} | {pct(_nsd_value(mean))} | {ref.get('nsd', '-')} | "
                    f"{pct(summary.get('foreground_mean', {}).get('Dice'))} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """``python -m finetune.metrics compare RUN_DIR ... [--out table.md]``: our numbers next to the paper's."""
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(prog="python -m finetune.metrics", description="finetune scores vs the paper")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="Table 2: our summary.json files next to the paper's numbers")
    compare.add_argument("runs", nargs="+", help="finetune run folders (or their summary.json)")
    compare.add_argument("--paper", default=str(PAPER_TABLE), help="the paper's numbers (YAML)")
    compare.add_argument("--out", default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    paper = OmegaConf.to_container(OmegaConf.load(args.paper), resolve=True)
    table = compare_with_paper([read_summary(r) for r in args.runs], paper)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    return table


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
