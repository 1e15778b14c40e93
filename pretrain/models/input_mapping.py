"""Which HU -> input mapping a backbone was pretrained with: the ``data.transform`` block of its run's config.

A pretraining run writes its resolved ``config.yaml`` into the run folder and its checkpoints either next to it
(``teacher_backbone.pth``) or one folder down (``checkpoints/model_*.pth``), so the mapping of a checkpoint is
found there. The export's model card and the pictures of ``pretrain.visualize`` both follow this one rule.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from meddino_common.config import ConfigError, load_yaml
from pretrain.data.transforms import HUTransform


def _transform_block(cfg: DictConfig) -> DictConfig | None:
    return OmegaConf.select(cfg, "data.transform")


def run_config_of(checkpoint: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` (with a ``data.transform`` block) of the run that wrote ``checkpoint``: in the
    checkpoint's folder (or the folder itself when ``checkpoint`` is a directory), else one folder up; None when
    neither holds one."""
    here = Path(checkpoint)
    folder = here if here.is_dir() else here.parent
    for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
        if candidate.is_file() and _transform_block(load_yaml(candidate)) is not None:
            return candidate
    return None


def load_hu_transform(config_path: str | os.PathLike) -> HUTransform:
    """The ``data.transform`` block of a pretrain config (or a run's ``config.yaml``), parsed; a missing or
    unreadable file or a config without the block is a one-line :class:`ConfigError` naming the file."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"pretrain config not found: {path} (needed for the HU -> input mapping)")
    block = _transform_block(load_yaml(path))
    if block is None:
        raise ConfigError(f"{path}: no data.transform block (expected a pretrain config or a run's config.yaml)")
    return HUTransform.from_config(block)
