"""``folder2d`` task type: a folder of 2-D PNG/JPEG images with masks -> an nnU-Net raw dataset.

Endoscopy, dermoscopy and microscopy sets ship as ``images/<stem>.<png|jpg>`` plus one mask file per class
(``masks/<stem><suffix>.<png|jpg>``; Kvasir-SEG/ISIC use an empty or ``_segmentation`` suffix, the ivadomed SEM
set ``_seg-axon-manual`` / ``_seg-myelin-manual``). nnU-Net's own answer to 2-D data is to store every image as
a one-slice volume; we do the same, so every head, split, preprocessing step, prediction and metric of the
common pipeline works unchanged on ``--task <converted dir>``:

    python -m finetune.tasks.folder2d SRC DST --class axon=_seg-axon-manual --class myelin=_seg-myelin-manual

writes ``DST/imagesTr/<case>_0000.nii.gz`` (``[X, Y, 1]``, spacing ``--pixel-spacing-mm`` x 1 mm),
``DST/labelsTr/<case>.nii.gz`` and ``dataset.json``. Masks are thresholded at ``> threshold`` (resampled masks
are not strictly binary); where class masks overlap the later ``--class`` wins. Colour images become
luminance (ITU-R 601), because the common pipeline is single-channel; say so when that loses information.
Files are written atomically, so an interrupted conversion never leaves a half-written case.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from meddino_common.atomic import atomic_write_json, atomic_write_to_path
from meddino_datasets.case import require_unique_ids

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Folder2DCase:
    case_id: str
    image: Path
    masks: dict[str, Path]  # class name -> mask file


def sanitize_case_id(stem: str) -> str:
    """Case ids usable in nnU-Net file names (letters, digits, ``-`` and ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)


def find_cases(src: Path, classes: dict[str, str], image_dir: str = "images", mask_dir: str = "masks") -> list[Folder2DCase]:
    """Pair every image with one mask per class; errors name the image and the missing mask."""
    images_root, masks_root = Path(src) / image_dir, Path(src) / mask_dir
    for folder in (images_root, masks_root):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: a folder2d dataset has {image_dir}/ and {mask_dir}/")
    masks_by_stem = {p.stem: p for p in masks_root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    cases: list[Folder2DCase] = []
    for image in sorted(p for p in images_root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        masks = {}
        for name, suffix in classes.items():
            mask = masks_by_stem.get(image.stem + suffix)
            if mask is None:
                raise FileNotFoundError(f"{image}: no mask {image.stem}{suffix}.* for class {name!r} in {masks_root}")
            masks[name] = mask
        cases.append(Folder2DCase(sanitize_case_id(image.stem), image, masks))
    if not cases:
        raise FileNotFoundError(f"{images_root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    require_unique_ids([c.case_id for c in cases], str(images_root))
    return cases


def read_gray(path: Path) -> np.ndarray:
    """Image as float32 ``[H, W]``; RGB(A) becomes luminance, 16-bit stays 16-bit."""
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:  # PIL raises several types for broken files
        raise ValueError(f"{path}: cannot read image ({err})") from err
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32)


def read_label(case: Folder2DCase, class_names: Sequence[str], shape: tuple[int, int], threshold: float) -> np.ndarray:
    """Integer label map ``[H, W]`` (uint8): class i+1 where its mask exceeds ``threshold``."""
    label = np.zeros(shape, dtype=np.uint8)
    for index, name in enumerate(class_names, start=1):
        mask = read_gray(case.masks[name])
        if mask.shape != shape:
            raise ValueError(f"{case.masks[name]}: mask shape {mask.shape} does not match image {case.image} {shape}")
        label[mask > threshold] = index
    return label


def _save_nifti_atomic(array_yx: np.ndarray, spacing_mm: tuple[float, float], path: Path) -> None:
    """Write ``[Y, X]`` as a one-slice NIfTI ``[X, Y, 1]`` (nibabel index order) with a diagonal affine."""
    data = np.ascontiguousarray(array_yx.T[:, :, None])
    affine = np.diag([float(spacing_mm[1]), float(spacing_mm[0]), 1.0, 1.0])
    atomic_write_to_path(path, lambda tmp: nib.save(nib.Nifti1Image(data, affine), tmp))


def convert_folder2d(
    src: Path, dst: Path, classes: dict[str, str], pixel_spacing_mm: tuple[float, float] = (1.0, 1.0),
    threshold: float = 127.0, channel_name: str = "image", image_dir: str = "images", mask_dir: str = "masks",
) -> Path:
    """Convert a folder2d dataset into an nnU-Net raw dataset at ``dst`` (existing cases are rewritten)."""
    if not classes:
        raise ValueError("folder2d needs at least one class (name=mask_suffix)")
    cases = find_cases(Path(src), classes, image_dir, mask_dir)
    dst = Path(dst)
    names = list(classes)
    for case in cases:
        image = read_gray(case.image)
        label = read_label(case, names, image.shape, threshold)
        _save_nifti_atomic(image, pixel_spacing_mm, dst / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        _save_nifti_atomic(label, pixel_spacing_mm, dst / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {
        "channel_names": {"0": channel_name},
        "labels": {"background": 0, **{name: i for i, name in enumerate(names, start=1)}},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "source": str(Path(src).resolve()),
        "converted_by": "finetune.tasks.folder2d",
    }
    atomic_write_json(dst / "dataset.json", meta)
    return dst


def _parse_class(text: str) -> tuple[str, str]:
    name, sep, suffix = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--class expects NAME=MASK_SUFFIX (suffix may be empty), got {text!r}")
    return name, suffix


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a 2-D image+mask folder into an nnU-Net raw dataset")
    parser.add_argument("src", type=Path, help="folder with images/ and masks/")
    parser.add_argument("dst", type=Path, help="output DatasetXXX_Name folder")
    parser.add_argument("--class", dest="classes", type=_parse_class, action="append", required=True,
                        help="NAME=MASK_SUFFIX, in label order (e.g. polyp= or axon=_seg-axon-manual)")
    parser.add_argument("--pixel-spacing-mm", type=float, nargs=2, default=(1.0, 1.0), metavar=("ROW", "COL"))
    parser.add_argument("--threshold", type=float, default=127.0, help="mask values above this are foreground")
    parser.add_argument("--channel-name", default="image")
    args = parser.parse_args(argv)
    out = convert_folder2d(args.src, args.dst, dict(args.classes), tuple(args.pixel_spacing_mm), args.threshold,
                           args.channel_name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
