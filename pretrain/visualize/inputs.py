"""The edges of a picture: one CT slice from a NIfTI file, a backbone from a checkpoint (or random init), and the
HU -> model input mapping the backbone was pretrained with.

Geometry: NIfTI volumes are reoriented to RAS (nibabel's closest canonical) and axial slices are shown in the
radiological convention (patient's right on the image left, anterior at the top).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from meddino_common.volumes import open_canonical_nifti, ras_to_display, read_voxels

from pretrain.models import build_backbone, load_backbone
from pretrain.models.input_mapping import load_hu_transform, run_config_of
from pretrain.visualize.config import repo_path

RANDOM_PREFIX = "random:"
InputTransform = Callable[[torch.Tensor], torch.Tensor]  # [H, W] HU -> [C, H, W] model input


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
    image = open_canonical_nifti(path, "image")
    volume = read_voxels(image, path)  # scl_slope applied, float32 (never float64)
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
    transform = load_hu_transform(pretrain_config)

    def apply(hu: torch.Tensor) -> torch.Tensor:
        x = transform(hu.float())  # [1 or C, H, W]: one grey channel is repeated to out_channels below
        return x.expand(transform.out_channels, -1, -1).contiguous() if x.shape[0] == 1 else x

    return apply


def transform_config_for(checkpoint: str, cfg: DictConfig) -> Path:
    """Which pretrain config defines the input transform of ``checkpoint``.

    ``transform_config`` in the visualisation config wins when set; otherwise the run's resolved
    ``config.yaml`` next to the checkpoint (or one folder up, for ``checkpoints/``); otherwise the
    default pretrain config (``default_pretrain_config``: ``configs/pretrain/base.yaml``).
    """
    if cfg.transform_config:
        return repo_path(cfg.transform_config)
    run_config = None if checkpoint.startswith(RANDOM_PREFIX) else run_config_of(checkpoint)
    return run_config if run_config is not None else repo_path(cfg.default_pretrain_config)
