"""nnU-Net-style CT preprocessing for 2-D training, cached on disk.

Per case (nnU-Net v2 order): read NIfTI -> axial-first array ``[Z, Y, X]`` -> crop to the bounding box of non-zero
voxels -> CT normalisation (clip to the 0.5/99.5 percentiles of the training foreground, z-score with the
foreground mean/std, from all training cases of the dataset as nnU-Net's fingerprint) -> in-plane resampling to the target spacing
(z untouched, as nnU-Net's 2-D configuration): images with cubic splines, labels per class with linear
interpolation thresholded at 0.5 (nnU-Net's ``order=1`` segmentation resampling).

Target spacing: median in-plane spacing of the training cases; with ``preprocess.target_slice_px`` (the paper's
896) the spacing is scaled so the median slice (its larger side, at the median spacing) becomes that many pixels.

Arrays: nibabel's ``[i, j, k]`` data is transposed to ``[k, j, i]`` = ``[Z, Y, X]``; spacing follows the same order.
Nothing is reoriented, so predictions are written back on exactly the original voxel grid with the original
affine and header.

Cache layout: ``<cache_dir>/<plans_hash>/plans.json`` and one folder per case with ``image.npy`` (float32
``[Z, Y', X']``), ``label.npy`` (uint8), ``locations.npz`` (foreground voxel coordinates per class) and
``props.json`` written last (its presence marks the case complete, so an interrupted run resumes).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from meddino_common.atomic import atomic_write, atomic_write_json, atomic_write_to_path
from meddino_common.seeding import seeded_rng
from meddino_datasets.case import Case
from meddino_datasets.readers.common import axial_first
from meddino_datasets.readers.nifti import is_nifti
from meddino_datasets.readers.sitk import read_sitk_volume

AFFINE_ATOL_MM = 1e-3


@dataclass
class Volume:
    """A NIfTI volume as an axial-first array with its geometry."""

    array: np.ndarray            # [Z, Y, X]
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray           # 4x4 voxel(i,j,k) -> world
    path: str
    header: Optional[nib.Nifti1Header] = None


@dataclass
class Plans:
    """Everything needed to preprocess any new CT the same way and to cut it into network inputs (saved next to the
    trained model as ``plans.json``). As in nnU-Net's plans, the patch size lives here, so training, validation and
    ``predict.py`` read one object; it comes from ``data.patch_size`` when the plans are made."""

    target_spacing_yx: list[float]
    clip_low: float
    clip_high: float
    mean: float
    std: float
    labels: list[str]                       # index = label value, 0 = background
    patch_size: list[int]                   # in-plane network input [Y, X] (slab heads add data.slab_depth slices)
    normalization: str = "ct"               # ct (nnU-Net CTNormalization) | zscore (ZScoreNormalization, per image)
    crop_to_nonzero: bool = True
    image_order: int = 3
    median_shape_yx: list[float] = field(default_factory=list)
    median_spacing_yx: list[float] = field(default_factory=list)
    n_training_cases: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plans":
        return cls(**data)

    def digest(self) -> str:
        """Names the preprocessed cache: the preprocessing fields only (the patch size does not change the arrays,
        so heads with different patches share one cache)."""
        fields = {k: v for k, v in self.to_dict().items() if k != "patch_size"}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------- reading
def read_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Read a 3-D NIfTI as ``[Z, Y, X]``; clear errors for unreadable or non-3-D files."""
    path = Path(path)
    if not is_nifti(path):  # .mha, .nrrd, ...: the file_ending of an nnU-Net dataset
        array, spacing_zyx, affine = axial_first(read_sitk_volume(path))
        return Volume(np.ascontiguousarray(array).astype(dtype, copy=False), spacing_zyx, affine, str(path))
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise ValueError(f"{path}: cannot read NIfTI ({err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise ValueError(f"{path}: invalid voxel spacing {zooms}")
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(dtype, copy=False),
                  (zooms[2], zooms[1], zooms[0]), img.affine.copy(), str(path), img.header.copy())


def read_case(case: Case, n_classes: int) -> tuple[Volume, Optional[np.ndarray]]:
    """Image and label of one case, checked to share shape and affine; label values checked against the task."""
    image = read_volume(case.image)
    if case.label is None:
        return image, None
    label = read_volume(case.label, dtype=np.float32)
    if label.array.shape != image.array.shape:
        raise ValueError(f"case {case.case_id}: image {case.image} has shape {image.array.shape[::-1]} but label "
                         f"{case.label} has {label.array.shape[::-1]} (x, y, z); they must share the voxel grid")
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL_MM, rtol=1e-5):
        raise ValueError(f"case {case.case_id}: image and label affines differ (image {case.image}, label "
                         f"{case.label}):\n{image.affine}\nvs\n{label.affine}\nresample the label onto the image grid")
    values = label.array
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"case {case.case_id}: label {case.label} has non-integer values")
    uniques = np.unique(values).astype(int)
    bad = [int(u) for u in uniques if u < 0 or u >= n_classes]
    if bad:
        raise ValueError(f"case {case.case_id}: label {case.label} has values {bad} outside 0..{n_classes - 1} "
                         "(check task.labels)")
    return image, values.astype(np.uint8)


# -------------------------------------------------------------------------------------------------- geometry
def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box ``[[z0, z1], [y0, y1], [x0, x1]]`` (half-open) of ``image != 0`` with holes filled (nnU-Net)."""
    mask = image != 0
    if not mask.any():
        return [[0, s] for s in image.shape]
    mask = ndimage.binary_fill_holes(mask)
    box = []
    for axis in range(image.ndim):
        other = tuple(a for a in range(image.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def crop(array: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    return array[tuple(slice(lo, hi) for lo, hi in bbox)]


def resampled_shape_yx(shape_yx: Sequence[int], spacing_yx: Sequence[float], target_yx: Sequence[float]) -> list[int]:
    return [max(int(round(s * sp / t)), 1) for s, sp, t in zip(shape_yx, spacing_yx, target_yx)]


def resample_image_inplane(image: np.ndarray, new_yx: Sequence[int], order: int = 3) -> np.ndarray:
    """``[Z, Y, X]`` -> ``[Z, Y', X']`` with a spline of ``order`` per slice, pixel-centre aligned, edge mode, then
    clipped to the input's value range: a cubic spline overshoots at sharp edges (air/bone, the 0-padding of the
    crop), which would create intensities the normalised image never had."""
    z, y, x = image.shape
    if (y, x) == tuple(new_yx):
        return image.astype(np.float32, copy=False)
    zoom = (new_yx[0] / y, new_yx[1] / x)
    out = np.empty((z, *new_yx), dtype=np.float32)
    for k in range(z):
        out[k] = ndimage.zoom(image[k].astype(np.float32, copy=False), zoom, order=order, mode="nearest", grid_mode=True)
    if image.size:
        np.clip(out, np.float32(image.min()), np.float32(image.max()), out=out)
    return out


def resample_labels_inplane(label: np.ndarray, new_yx: Sequence[int], n_classes: int, chunk: int = 8) -> np.ndarray:
    """Label map ``[Z, Y, X]`` -> ``[Z, Y', X']``: each class's mask linearly resampled, voxels >= 0.5 take the class
    (nnU-Net ``resample_data_or_seg(is_seg=True, order=1)``; later classes win ties)."""
    z, y, x = label.shape
    if (y, x) == tuple(new_yx):
        return label
    out = np.zeros((z, *new_yx), dtype=np.uint8)
    for k0 in range(0, z, chunk):
        block = torch.from_numpy(label[k0:k0 + chunk].astype(np.int64))
        for c in range(1, n_classes):
            mask = (block == c)
            if not mask.any():
                continue
            res = F.interpolate(mask[:, None].float(), size=tuple(new_yx), mode="bilinear", align_corners=False)[:, 0]
            out[k0:k0 + chunk][(res >= 0.5).numpy()] = c
    return out


def resample_logits_inplane(logits: torch.Tensor, new_yx: Sequence[int]) -> torch.Tensor:
    """Class logits ``[K, Z, Y', X']`` (any float dtype, any device) -> ``[K, Z, Y, X]`` float32, bilinearly: nnU-Net
    resamples its predicted logits (order 1 in-plane) before the softmax/argmax."""
    if tuple(logits.shape[-2:]) == tuple(new_yx):
        return logits.float()
    out = F.interpolate(logits.permute(1, 0, 2, 3).float(), size=tuple(new_yx), mode="bilinear", align_corners=False)
    return out.permute(1, 0, 2, 3)


# ------------------------------------------------------------------------------------------------ intensities
NORMALIZATIONS = ("ct", "zscore")


def normalize(image: np.ndarray, plans: Plans) -> np.ndarray:
    """nnU-Net's two schemes. ``ct`` (CTNormalization): clip to the training foreground percentiles, z-score with
    the training foreground mean/std. ``zscore`` (ZScoreNormalization, any channel not named CT, e.g. AMOS22's
    "either_CT_or_MR"): z-score with this image's own mean/std."""
    out = image.astype(np.float32, copy=False)
    if plans.normalization == "zscore":
        return (out - out.mean(dtype=np.float64)).astype(np.float32) / np.float32(max(float(out.std(dtype=np.float64)), 1e-8))
    if plans.normalization != "ct":
        raise ValueError(f"plans normalization must be one of {NORMALIZATIONS}, got {plans.normalization!r}")
    out = np.clip(out, plans.clip_low, plans.clip_high)
    return (out - np.float32(plans.mean)) / np.float32(max(plans.std, 1e-8))


def foreground_samples(image: np.ndarray, label: np.ndarray, n_samples: int, seed: int = 1234) -> np.ndarray:
    """``n_samples`` image values drawn WITH replacement where ``label > 0``, with a fresh ``RandomState(seed)`` per
    case: nnU-Net's ``DatasetFingerprintExtractor.collect_foreground_intensities`` (same draws for the same case).
    Empty when the case has no foreground."""
    values = image[label > 0].astype(np.float32, copy=False)
    if values.size == 0:
        return values
    return np.random.RandomState(seed).choice(values, int(n_samples), replace=True)


# --------------------------------------------------------------------------------------------------- planning
def plan_from_training_cases(cases: Sequence[Case], labels: list[str], cfg) -> Plans:
    """Fingerprint the dataset's labelled cases (spacing, cropped shape, foreground intensities) and derive the plans.

    As nnU-Net's fingerprint, ``cases`` are ALL training cases of the dataset (every fold), each contributing
    ``preprocess.foreground_samples_total // len(cases)`` foreground intensities (nnU-Net: 1e8 in total); the CT
    statistics are the 0.5/99.5 percentiles, mean and std of the pooled samples."""
    pcfg = cfg.preprocess
    per_case = int(float(pcfg.foreground_samples_total) // max(len(cases), 1))
    spacings, shapes, samples = [], [], []
    for case in cases:
        image, label = read_case(case, len(labels))
        bbox = nonzero_bbox(image.array) if pcfg.crop_to_nonzero else [[0, s] for s in image.array.shape]
        cropped, cropped_label = crop(image.array, bbox), crop(label, bbox)
        spacings.append(image.spacing_zyx[1:])
        shapes.append(cropped.shape[1:])
        samples.append(foreground_samples(cropped, cropped_label, per_case))
    pooled = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if pooled.size == 0:
        raise ValueError("no foreground voxels in any training case: cannot compute CT normalisation statistics")
    median_spacing = np.median(np.array(spacings, dtype=np.float64), axis=0)
    target = np.array(pcfg.target_spacing_mm if pcfg.target_spacing_mm else median_spacing, dtype=np.float64)
    shapes_at_target = np.array([resampled_shape_yx(s, sp, target) for s, sp in zip(shapes, spacings)], dtype=np.float64)
    median_shape = np.median(shapes_at_target, axis=0)
    if pcfg.target_slice_px:
        scale = float(median_shape.max()) / float(pcfg.target_slice_px)
        target = target * scale
        median_shape = median_shape / scale
    low, high = np.percentile(pooled, list(pcfg.clip_percentiles))
    return Plans(target_spacing_yx=[float(t) for t in target], clip_low=float(low), clip_high=float(high),
                 mean=float(pooled.mean()), std=float(pooled.std()), labels=list(labels),
                 patch_size=[int(p) for p in cfg.data.patch_size],
                 normalization=str(pcfg.normalization), crop_to_nonzero=bool(pcfg.crop_to_nonzero), image_order=int(pcfg.image_order),
                 median_shape_yx=[float(s) for s in median_shape],
                 median_spacing_yx=[float(s) for s in median_spacing], n_training_cases=len(cases))


# ------------------------------------------------------------------------------------------------ per volume
def preprocess_volume(image: Volume, plans: Plans, label: Optional[np.ndarray] = None
                      ) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """One volume through crop -> normalise -> resample. Returns ``(image [Z,Y',X'], label | None, props)``;
    ``props`` holds what `restore_geometry` needs to go back (original shape, bbox, shapes)."""
    arr = image.array
    bbox = nonzero_bbox(arr) if plans.crop_to_nonzero else [[0, s] for s in arr.shape]
    cropped = normalize(crop(arr, bbox), plans)
    new_yx = resampled_shape_yx(cropped.shape[1:], image.spacing_zyx[1:], plans.target_spacing_yx)
    out_image = resample_image_inplane(cropped, new_yx, plans.image_order)
    out_label = None
    if label is not None:
        out_label = resample_labels_inplane(crop(label, bbox), new_yx, len(plans.labels))
    props = {"shape_zyx": list(arr.shape), "bbox": bbox, "cropped_shape_zyx": list(cropped.shape),
             "preprocessed_shape_zyx": list(out_image.shape), "spacing_zyx": list(image.spacing_zyx),
             "affine": image.affine.tolist(), "source": image.path}
    return out_image, out_label, props


def restore_geometry_chunks(chunks: Iterable[tuple[int, torch.Tensor]], props: dict, n_classes: int) -> np.ndarray:
    """Logit chunks ``(z0, [K, n, Y', X'])`` on the preprocessed grid -> label map on the ORIGINAL grid ``[Z, Y, X]``
    (uint8): each chunk is resampled in-plane back to the cropped shape (as logits), reduced to the argmax class
    (= the argmax of the softmax) and pasted into the uncropped volume, so only one chunk's scores live at a time."""
    cropped = props["cropped_shape_zyx"]
    full = np.zeros(props["shape_zyx"], dtype=np.uint8)
    (z0, z1), (y0, y1), (x0, x1) = props["bbox"]
    done = 0
    for k0, block in chunks:
        if block.shape[0] != n_classes:
            raise ValueError(f"prediction has {block.shape[0]} classes, expected {n_classes}")
        labels = resample_logits_inplane(block, cropped[1:]).argmax(0).to(torch.uint8).cpu().numpy()
        full[z0 + k0:z0 + k0 + labels.shape[0], y0:y1, x0:x1] = labels
        done += labels.shape[0]
    if done != cropped[0]:
        raise ValueError(f"prediction has {done} slices, expected {cropped[0]}")
    return full


def restore_geometry(logits: torch.Tensor, props: dict, chunk: int = 16) -> np.ndarray:
    """Logits of the whole volume ``[K, Z, Y', X']`` -> label map on the original grid (see `restore_geometry_chunks`).
    Probabilities work too (resampled the same way); logits are what nnU-Net resamples."""
    if logits.shape[1] != props["cropped_shape_zyx"][0]:
        raise ValueError(f"prediction has {logits.shape[1]} slices, expected {props['cropped_shape_zyx'][0]}")
    chunks = ((k0, logits[:, k0:k0 + chunk]) for k0 in range(0, logits.shape[1], chunk))
    return restore_geometry_chunks(chunks, props, logits.shape[0])


def save_label_nifti(label_zyx: np.ndarray, reference: Volume | str | Path, path: str | Path) -> None:
    """Write a ``[Z, Y, X]`` label map on the reference image's grid with its affine (atomic)."""
    ref = reference if isinstance(reference, Volume) else read_volume(reference)
    if tuple(label_zyx.shape) != tuple(ref.array.shape):
        raise ValueError(f"label shape {label_zyx.shape} does not match the reference {ref.path} {ref.array.shape}")
    header = ref.header.copy() if ref.header is not None else nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.ascontiguousarray(label_zyx.transpose(2, 1, 0)).astype(np.uint8), ref.affine, header)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
    atomic_write_to_path(path, lambda tmp: nib.save(img, tmp))


# ---------------------------------------------------------------------------------------------------- caching
def class_locations(label: np.ndarray, n_classes: int, per_class: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Up to ``per_class`` voxel coordinates ``[n, 3]`` (z, y, x) per foreground class, for oversampling."""
    out = {}
    for c in range(1, n_classes):
        coords = np.argwhere(label == c)
        if len(coords) > per_class:
            coords = coords[rng.choice(len(coords), per_class, replace=False)]
        if len(coords):
            out[str(c)] = coords.astype(np.int32)
    return out


def _source_signature(case: Case) -> list:
    return [[str(p), os.stat(p).st_size, int(os.stat(p).st_mtime)] for p in (case.image, case.label) if p is not None]


def preprocess_case(case: Case, plans: Plans, case_dir: Path, locations_per_class: int = 10000) -> Path:
    """Preprocess one labelled case into ``case_dir`` unless an up-to-date copy exists; returns ``case_dir``."""
    props_path = case_dir / "props.json"
    signature = _source_signature(case)
    if props_path.exists():
        try:
            if json.loads(props_path.read_text()).get("source_signature") == signature:
                return case_dir
        except json.JSONDecodeError:
            pass
    case_dir.mkdir(parents=True, exist_ok=True)
    image, label = read_case(case, len(plans.labels))
    if label is None:
        raise ValueError(f"case {case.case_id}: no label file, cannot be used for training")
    arr, lab, props = preprocess_volume(image, plans, label)
    rng = seeded_rng(int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16))
    locs = class_locations(lab, len(plans.labels), locations_per_class, rng)
    atomic_write(case_dir / "image.npy", lambda f: np.save(f, arr))
    atomic_write(case_dir / "label.npy", lambda f: np.save(f, lab))
    atomic_write(case_dir / "locations.npz", lambda f: np.savez(f, **locs))
    props.update(case_id=case.case_id, source_signature=signature, classes_present=sorted(int(k) for k in locs))
    atomic_write_json(props_path, props, indent=1)
    return case_dir


def preprocess_dataset(cases: Sequence[Case], plans: Plans, cache_root: Path, locations_per_class: int = 10000,
                       progress: bool = False) -> dict[str, Path]:
    """Preprocess (or reuse) every case under ``cache_root/<plans digest>/``; returns ``case_id -> case_dir``."""
    root = Path(cache_root) / plans.digest()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "plans.json", plans.to_dict(), indent=1)
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="preprocess", unit="case")
    return {case.case_id: preprocess_case(case, plans, root / case.case_id, locations_per_class) for case in iterator}


def save_plans(plans: Plans, path: str | Path) -> None:
    atomic_write_json(path, plans.to_dict(), indent=1)


def load_plans(path: str | Path) -> Plans:
    """``plans.json`` as :class:`Plans`. A file written before the plans carried the patch size takes it from the
    ``config.yaml`` next to it (``data.patch_size``, what that model was trained with), so older runs still predict."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "patch_size" not in data and (path.parent / "config.yaml").is_file():
            from omegaconf import OmegaConf

            data["patch_size"] = [int(p) for p in OmegaConf.load(path.parent / "config.yaml").data.patch_size]
        return Plans.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not a valid plans.json ({err})") from err
