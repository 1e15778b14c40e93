"""Pretraining configuration: ``configs/pretrain/base.yaml`` + stage/experiment file(s) + command-line dot-list.

Every hyperparameter lives in the YAML files; this module only merges them (OmegaConf) and checks the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

BASE_NAME = "base.yaml"


def default_config_dir() -> Path:
    """``configs/pretrain`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def load_config(
    config_files: str | Path | Sequence[str | Path],
    overrides: Sequence[str] = (),
    base: str | Path | None = None,
) -> DictConfig:
    """Merge ``base.yaml`` (next to the first file unless ``base`` is given), then each file in order, then the
    ``key=value`` overrides. A file that is the base itself is not merged twice."""
    files = [Path(config_files)] if isinstance(config_files, (str, Path)) else [Path(f) for f in config_files]
    if not files:
        raise ValueError("at least one config file is needed (e.g. configs/pretrain/stage1.yaml)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"config file not found: {f}")
    base_path = Path(base) if base is not None else files[0].parent / BASE_NAME
    if not base_path.is_file():
        raise FileNotFoundError(f"base config not found: {base_path} (expected next to {files[0]})")
    merged = OmegaConf.load(base_path)
    for f in files:
        if f.resolve() == base_path.resolve():
            continue
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(f))
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{f}: cannot merge into {base_path}: {err}") from err
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return merged
