"""Pictures of what a backbone learned, written as PNG files (matplotlib Agg, no display).

Three subcommands, each a thin CLI over the package's array -> figure functions:

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
Every default is in ``configs/visualize.yaml``; ``--config FILE`` layers a partial copy on it and the flags
override single keys (both checked against the declared keys).

Reference points (``--point y,x``) are pixel (row, column) indices of the displayed axial slice (radiological
convention, see ``pretrain.visualize.inputs``) at its native resolution.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig

from pretrain.visualize.config import DEFAULT_CONFIG, load_config
from pretrain.visualize.curves import read_metrics, write_curves_png
from pretrain.visualize.features import pixel_to_patch
from pretrain.visualize.figures import write_pca_png, write_similarity_png
from pretrain.visualize.inputs import (InputTransform, load_axial_slice, load_input_transform, resolve_backbone,
                                       transform_config_for)


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
        p.add_argument("--config", default=None, help=f"a YAML file layered on {DEFAULT_CONFIG.name} (declared keys only; "
                            "flags win over it)")
    return parser


FLAG_KEYS = {  # flag (argparse dest) -> the config key it sets
    "transform_config": "transform_config",
    "slice": "image.slice",
    "foreground": "foreground.method",
    "layer": "features.layer",
    "resolutions": "pca.resolutions",
    "pca_fit": "pca.fit",
    "resolution": "similarity.resolution",
    "smoothing": "curves.smoothing_window",
}


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the given flags set (a flag left out leaves the config's value)."""
    given = vars(args)
    return {key: given[dest] for dest, key in FLAG_KEYS.items() if given.get(dest) is not None}


def _load_slice(image: str, cfg: DictConfig):
    return load_axial_slice(image, cfg.image.slice, cfg.foreground.body_threshold_hu,
                            cfg.image.default_slice_near_max)


def run_pca(args: argparse.Namespace, cfg: DictConfig) -> Path:
    ct = _load_slice(args.image, cfg)
    model, label = resolve_backbone(args.checkpoint, int(cfg.seed), args.arch)
    transform = load_input_transform(transform_config_for(args.checkpoint, cfg))
    return write_pca_png(model, ct, args.out, cfg, transform, label)


def run_similarity(args: argparse.Namespace, cfg: DictConfig) -> Path:
    ct = _load_slice(args.image, cfg)
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
    return write_curves_png(runs, args.out, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, flag_overrides(args))
        runner = {"pca": run_pca, "similarity": run_similarity, "curves": run_curves}[args.command]
        out = runner(args, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
