"""Segment new CT scans with a trained finetune model.

    python finetune/predict.py --model RUN_DIR --input SCAN|FOLDER --output DIR [--force] [--overwrite]
        [--device cpu|cuda] [key=value ...]

``--input`` may be one NIfTI file, one DICOM series folder, or a folder of NIfTI files (nnU-Net ``*_0000.nii.gz``
names are accepted; the ``_0000`` is dropped) and/or DICOM series sub-folders. Each scan becomes
``out_dir/<name>.nii.gz``: a uint8 label map on the scan's own voxel grid with its affine (RAS affine derived from
the DICOM geometry for DICOM input). The model folder must hold ``config.yaml`` and ``plans.json`` (written by
`finetune/run.py`); no backbone weight file and no network access are needed. Already-written outputs are skipped
unless ``--overwrite``.

Before anything is predicted: ``--output`` must be a writable folder, two inputs may not map to one output name, and
the weights used are named (a warning when only the last training checkpoint exists). Each scan is then checked
(``configs/finetune/predict.yaml``): its modality must be the model's (DICOM Modality tag; NIfTI intensities by the
curation's CT rule) unless ``--force``; NaN/Inf voxels are filled with a warning giving their number (or refused);
voxel spacing must be plausible and the resampled volume must fit ``predict.max_memory_gib``. A refused scan is
named with its reason, the other scans are still predicted, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from meddino_common.config import load_config as load_strict
from meddino_datasets.ct_sanity import CtIntensityCheck, SpacingCheck
from finetune.config import DEFAULT_CONFIGS_DIR
from finetune.heads import get_recipe
from finetune.infer import predict_case
from finetune.preprocess import Plans, Volume, load_plans, read_volume, resampled_shape_yx, save_label_nifti
from meddino_datasets.readers.common import axial_first
from meddino_datasets.readers.dicom import read_dicom_folder
from meddino_datasets.readers.nifti import NIFTI_SUFFIXES, strip_nifti_suffix

PREDICT_CONFIG = DEFAULT_CONFIGS_DIR / "predict.yaml"


class ScanRefused(ValueError):
    """A scan this model must not segment as it is (wrong modality, broken geometry...); names scan and reason."""


@dataclass(frozen=True)
class ModelFiles:
    config: Path
    plans: Path
    weights: Path
    final: bool  # False: the last training checkpoint, not the finished model


def find_model_files(model: Path) -> ModelFiles:
    """The config, plans and weights of a run folder (or of a weights file inside one)."""
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
    return ModelFiles(config, plans, weights, weights.name != "latest.pt")


def describe_weights(files: ModelFiles, requested: Path) -> str:
    """One line naming the weights used; a warning when only the last training checkpoint exists."""
    if files.final:
        return f"weights: {files.weights}"
    if requested.is_dir():
        return (f"warning: {requested} has no model_final.pt (training did not finish?); using the last training "
                f"checkpoint {files.weights}")
    return f"weights: {files.weights} (a training checkpoint, not model_final.pt)"


def check_output_dir(output: Path) -> None:
    """``--output`` must be (or become) a writable folder -- checked before any model is loaded."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder for the predicted label maps")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output {output}: cannot create the folder ({err.strerror})") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output}: folder is not writable")


def list_inputs(path: Path) -> list[tuple[str, Path, str]]:
    """``(output name, path, kind)`` with kind ``nifti`` or ``dicom``; two inputs with one output name are refused."""
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
    else:
        subdirs = sorted(p for p in path.iterdir() if p.is_dir())
        if any(p.is_file() for p in path.iterdir()) or not subdirs:
            return [(path.name, path, "dicom")]
        items = [(d.name, d, "dicom") for d in subdirs]
    seen: dict[str, Path] = {}
    for name, p, _ in items:
        if name in seen:
            raise ValueError(f"--input {path}: {seen[name].name} and {p.name} would both be written as {name}.nii.gz; "
                             "rename one or predict them into different --output folders")
        seen[name] = p
    return items


def _name(path: Path) -> str:
    name = strip_nifti_suffix(path.name)
    return name[:-5] if name.endswith("_0000") else name


def load_predict_config(config_path: Path, overrides: Sequence[str]) -> DictConfig:
    """The model's config.yaml + ``configs/finetune/predict.yaml`` <- command-line overrides (strict: a typo is an
    error naming the nearest key)."""
    return load_strict([config_path, PREDICT_CONFIG], [], overrides, alternatives={"fold": ("all",)})


def training_modality(cfg: DictConfig) -> str:
    """The modality the model was trained on: MR for an AMOS-style ``task.modality_filter=mri`` run, else CT (the
    finetune plans normalise with nnU-Net's CT scheme)."""
    return "MR" if str(cfg.task.modality_filter or "").lower() == "mri" else "CT"


def dicom_modalities(folder: Path) -> dict[str, int]:
    """Modality tag -> number of image files under ``folder`` (headers only, no pixel data)."""
    import pydicom

    counts: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # not DICOM: the series reader decides what to make of it
            continue
        if "ImagePositionPatient" in ds or "PerFrameFunctionalGroupsSequence" in ds:
            modality = str(ds.get("Modality", "") or "missing").upper()
            counts[modality] = counts.get(modality, 0) + 1
    return counts


def check_modality(path: Path, kind: str, image: Optional[Volume], modality: str, pcfg: DictConfig) -> None:
    """Refuse a scan whose modality is not the model's: the DICOM tag, or for NIfTI (no tag) a CT model's intensity
    rule -- the same :class:`meddino_datasets.ct_sanity.CtIntensityCheck` the curation applies."""
    if kind == "dicom":
        found = dicom_modalities(path)
        other = {m: n for m, n in found.items() if m != modality}
        if other:
            raise ScanRefused(f"{path}: DICOM Modality {', '.join(f'{m} ({n} files)' for m, n in sorted(other.items()))}, "
                              f"but the model was trained on {modality}; --force to predict anyway")
        return
    if modality != "CT" or image is None:
        return
    check = CtIntensityCheck(float(pcfg.air_threshold_hu), float(pcfg.min_air_fraction))
    problem = check.problem(check.count_air(image.array), image.array.size)
    if problem:
        raise ScanRefused(f"{path}: {problem}; the model was trained on CT. --force to predict anyway "
                          "(or predict.min_air_fraction=0)")


def fill_nonfinite(image: Volume, pcfg: DictConfig) -> tuple[Volume, int]:
    """NaN/Inf voxels -> ``predict.nonfinite_fill_hu`` (policy ``fill``) or a refusal (``refuse``, or when no voxel is
    finite). Returns the volume and the number of voxels filled."""
    bad = ~np.isfinite(image.array)
    n_bad = int(bad.sum())
    if not n_bad:
        return image, 0
    if str(pcfg.nonfinite) == "refuse" or n_bad == image.array.size:
        why = "every voxel is" if n_bad == image.array.size else f"{n_bad} voxels are"
        raise ScanRefused(f"{image.path}: {why} NaN or Inf"
                          + ("" if n_bad == image.array.size else " (predict.nonfinite=fill fills them with air)"))
    if str(pcfg.nonfinite) != "fill":
        raise ValueError(f"predict.nonfinite must be fill or refuse, got {pcfg.nonfinite!r}")
    array = np.where(bad, np.float32(pcfg.nonfinite_fill_hu), image.array)
    return Volume(array, image.spacing_zyx, image.affine, image.path, image.header), n_bad


def nifti_header_spacing(path: Path) -> tuple[float, float, float]:
    """``pixdim[1:4]`` (x, y, z) as stored in the file: nibabel turns a 0 into 1 mm when it loads a header, which
    would predict a 0 mm scan at an invented spacing."""
    import nibabel as nib

    with nib.openers.ImageOpener(str(path)) as fobj:
        head = fobj.read(4)
        fobj.seek(0)
        sizes = {348: nib.Nifti1Header, 540: nib.Nifti2Header}
        klass = sizes.get(int.from_bytes(head, "little")) or sizes.get(int.from_bytes(head, "big"))
        if klass is None:
            raise ScanRefused(f"{path}: not a NIfTI-1/2 header")
        header = klass.from_fileobj(fobj, check=False)
    return tuple(float(v) for v in header["pixdim"][1:4])


def check_geometry(path: Path, kind: str, image: Volume, plans: Plans, n_classes: int, pcfg: DictConfig) -> None:
    """Plausible spacing (header, DICOM geometry and affine agree on a CT-like voxel) and bounded memory, before any
    array is resampled."""
    low, high = (float(v) for v in pcfg.spacing_range_mm)
    spacing = SpacingCheck(low, high)
    columns = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)  # x, y, z
    candidates = [tuple(image.spacing_zyx[::-1]), tuple(columns)]
    if kind == "nifti":
        candidates.append(nifti_header_spacing(path))
    for values in candidates:
        problem = spacing.problem(values)
        if problem:
            raise ScanRefused(f"{path}: {problem}; fix the header (or widen predict.spacing_range_mm)")
    z, y, x = image.array.shape
    new_y, new_x = resampled_shape_yx((y, x), image.spacing_zyx[1:], plans.target_spacing_yx)
    gib = z * new_y * new_x * 4 * (n_classes + 1) / 2**30
    if gib > float(pcfg.max_memory_gib):
        raise ScanRefused(f"{path}: {z} slices of {y}x{x} at {image.spacing_zyx[1]:g}x{image.spacing_zyx[2]:g} mm resample "
                          f"to {new_y}x{new_x} (target {plans.target_spacing_yx} mm): ~{gib:.1f} GiB for image and "
                          f"probabilities, more than predict.max_memory_gib={float(pcfg.max_memory_gib):g}")


def read_scan(path: Path, kind: str) -> Volume:
    """The scan as a :class:`Volume`; an unreadable one is refused (named), not the end of the run."""
    try:
        return read_volume(path) if kind == "nifti" else Volume(*axial_first(read_dicom_folder(path)), str(path))
    except ValueError as err:
        raise ScanRefused(str(err)) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        # named as it was called: the console script or the file path the README shows
        prog=Path(sys.argv[0]).name if Path(sys.argv[0]).name.startswith("meddino-") else "python finetune/predict.py",
        usage="%(prog)s --model RUN_DIR --input SCAN|FOLDER --output DIR [--force] [--overwrite] [--device DEVICE] [key=value ...]",
        description=__doc__.split("\n\n")[0], epilog="Checks and their settings: configs/finetune/predict.yaml.")
    parser.add_argument("--model", required=True, type=Path, metavar="RUN_DIR",
                        help="finetune output folder (config.yaml, plans.json, model_final.pt), or a weights file in one")
    parser.add_argument("--input", required=True, type=Path, metavar="SCAN|FOLDER",
                        help="a NIfTI file, a DICOM series folder, or a folder of NIfTI files / DICOM sub-folders")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="folder for the label maps (<name>.nii.gz per scan); created if missing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace label maps already in --output (default: skip them)")
    parser.add_argument("--force", action="store_true",
                        help="predict even when a scan's modality does not match the model's (DICOM tag or CT intensities)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. infer.mirror=false or predict.max_memory_gib=32")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """Predict every scan of ``--input``; returns the label maps written (or already there). Raises
    :class:`ScanRefused` after the other scans are done when any scan was refused."""
    from tqdm import tqdm

    args = parse_args(argv)
    files = find_model_files(args.model)
    items = list_inputs(args.input)
    cfg = load_predict_config(files.config, args.overrides)
    check_output_dir(args.output)  # the first side effect, after every check that needs none
    pcfg = cfg.predict
    plans = load_plans(files.plans)
    recipe = get_recipe(str(cfg.head.name))
    device = torch.device(args.device)
    note = describe_weights(files, args.model)
    print(note, file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)
    from finetune.run import load_trained_model

    model = load_trained_model(cfg, recipe, files.weights, device, len(plans.labels))
    modality = training_modality(cfg)
    written, refused = [], []
    bar = tqdm(items, desc="predict", unit="scan", dynamic_ncols=True, file=sys.stderr)
    for name, path, kind in bar:
        out = args.output / f"{name}.nii.gz"
        if out.exists() and not args.overwrite:
            tqdm.write(f"{out} exists, skipped")
            written.append(out)
            continue
        t0 = time.time()
        try:
            if kind == "dicom" and not args.force:
                check_modality(path, kind, None, modality, pcfg)  # header tags only: before any pixel is decoded
            image, n_filled = fill_nonfinite(read_scan(path, kind), pcfg)
            if n_filled:
                tqdm.write(f"warning: {path}: {n_filled} NaN/Inf voxels filled with {float(pcfg.nonfinite_fill_hu):g} HU",
                           file=sys.stderr)
            if kind == "nifti" and not args.force:
                check_modality(path, kind, image, modality, pcfg)
            check_geometry(path, kind, image, plans, len(plans.labels), pcfg)
        except ScanRefused as err:
            tqdm.write(f"refused: {err}", file=sys.stderr)
            refused.append(str(err))
            continue
        label = predict_case(model, recipe, image, plans, cfg, device)
        save_label_nifti(label, image, out)
        present = {plans.labels[i]: int((label == i).sum()) for i in range(1, len(plans.labels)) if (label == i).any()}
        tqdm.write(f"{path} -> {out} ({time.time() - t0:.1f}s; voxels per class {present or 'none'})")
        if not present:  # said out loud: an empty mask is an answer the user should look at
            tqdm.write(f"warning: {path}: no structure found, the label map is empty", file=sys.stderr)
        written.append(out)
    bar.close()
    if refused:
        raise ScanRefused(f"{len(refused)} of {len(items)} scan(s) refused (the others were predicted): " + " | ".join(refused))
    return written


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, KeyError) as err:  # bad input, a full or read-only disk: one clear line, no traceback
        sys.exit(f"error: {err}")
