"""Segment new CT scans with a trained finetune model.

    python finetune/predict.py --model <run output dir | model_final.pt | checkpoints/latest.pt>
        --input scan.nii.gz | dicom_dir | folder --output out_dir [--device cpu|cuda] [key=value ...]

``--input`` may be one NIfTI file, one DICOM series folder, or a folder of NIfTI files (nnU-Net ``*_0000.nii.gz``
names are accepted; the ``_0000`` is dropped) and/or DICOM series sub-folders. Each scan becomes
``out_dir/<name>.nii.gz``: a uint8 label map on the scan's own voxel grid with its affine (RAS affine derived from
the DICOM geometry for DICOM input). The model folder must hold ``config.yaml`` and ``plans.json`` (written by
`finetune/run.py`); no backbone weight file and no network access are needed. Already-written outputs are skipped
unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch
from omegaconf import OmegaConf

from finetune.heads import get_recipe
from finetune.infer import predict_case
from finetune.preprocess import load_plans, read_volume, save_label_nifti
from finetune.tasks.layouts import NIFTI_SUFFIXES, strip_nifti


def find_model_files(model: Path) -> tuple[Path, Path, Path]:
    """(config.yaml, plans.json, weights) from a run folder or a weights file inside one."""
    if model.is_dir():
        run_dir, weights = model, model / "model_final.pt"
        if not weights.exists():
            weights = model / "checkpoints" / "latest.pt"
    else:
        weights = model
        run_dir = model.parent.parent if model.parent.name == "checkpoints" else model.parent
    config, plans = run_dir / "config.yaml", run_dir / "plans.json"
    for path, what in ((weights, "model weights (model_final.pt)"), (config, "config.yaml"), (plans, "plans.json")):
        if not path.exists():
            raise FileNotFoundError(f"--model {model}: {what} not found at {path}")
    return config, plans, weights


def list_inputs(path: Path) -> list[tuple[str, Path, str]]:
    """``(output name, path, kind)`` with kind ``nifti`` or ``dicom``."""
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"--input {path}: a single file must be NIfTI (.nii/.nii.gz); pass DICOM as a folder")
        return [(_name(path), path, "nifti")]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path} not found")
    niftis = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if niftis:
        items = [(_name(p), p, "nifti") for p in niftis]
        items += [(d.name, d, "dicom") for d in sorted(p for p in path.iterdir() if p.is_dir())]
        return items
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    if any(p.is_file() for p in path.iterdir()) or not subdirs:
        return [(path.name, path, "dicom")]
    return [(d.name, d, "dicom") for d in subdirs]


def _name(path: Path) -> str:
    name = strip_nifti(path.name)
    return name[:-5] if name.endswith("_0000") else name


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. infer.mirror=false")
    args = parser.parse_args(argv)

    from finetune.run import load_trained_model

    config_path, plans_path, weights = find_model_files(args.model)
    cfg = OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(list(args.overrides)))
    plans = load_plans(plans_path)
    recipe = get_recipe(str(cfg.head.name))
    device = torch.device(args.device)
    model = load_trained_model(cfg, recipe, weights, device)
    written = []
    for name, path, kind in list_inputs(args.input):
        out = args.output / f"{name}.nii.gz"
        if out.exists() and not args.overwrite:
            print(f"{out} exists, skipped", flush=True)
            written.append(out)
            continue
        t0 = time.time()
        if kind == "nifti":
            image = read_volume(path)
        else:
            from finetune.dicom import read_dicom_series

            image = read_dicom_series(path)
        label = predict_case(model, recipe, image, plans, cfg, device)
        save_label_nifti(label, image, out)
        present = {plans.labels[i]: int((label == i).sum()) for i in range(1, len(plans.labels)) if (label == i).any()}
        print(f"{path} -> {out} ({time.time() - t0:.1f}s; voxels per class {present})", flush=True)
        written.append(out)
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError) as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
