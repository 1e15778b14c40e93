"""Finetune configuration: ``base.yaml`` <- ``<task>.yaml`` <- ``heads/<head>.yaml`` <- extra files <- dot-list.

The shipped files (base, task, head) declare the keys; extra ``--config`` files and ``key=value`` overrides may only
change them (:func:`meddino_common.config.load_config`, the project's one strict loader): a typo such as
``optim.lrr=1`` is an error naming the nearest valid key, never a silent run with the default. The result is in
struct mode; what is derived from the data (class names, the patch size the plans carry) lives outside the config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from finetune.tasks import resolve_task
from meddino_common.config import ConfigError, load_config as load_strict, shipped_config

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS_DIR = shipped_config("finetune")
# fold is 0..4 or "all" (train and validate on every case, as nnU-Net's fold "all")
ALTERNATIVES = {"fold": ("all",)}


def _config_file(name: str | Path, configs_dir: Path) -> Path:
    """``--config`` as given, else relative to ``configs/finetune/`` (``tiny.yaml``), else to the repository root."""
    path = Path(name)
    for candidate in (path, configs_dir / path, PACKAGE_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config {name}: file not found")


def load_config(task: str, head: str = "primus", extra_files: Sequence[str | Path] = (),
                overrides: Sequence[str] = (), configs_dir: Optional[Path] = None) -> DictConfig:
    """The merged, unresolved finetune config (interpolations resolve when values are read)."""
    configs_dir = Path(configs_dir or DEFAULT_CONFIGS_DIR)
    base = configs_dir / "base.yaml"
    if not base.is_file():
        raise ConfigError(f"{base} not found (configs/finetune/ must sit next to the finetune package)")
    head_file = configs_dir / "heads" / f"{head}.yaml"
    if not head_file.is_file():
        raise ConfigError(f"no config for head {head!r}: {head_file}")
    layers = [_config_file(extra, configs_dir) for extra in extra_files]
    cfg = load_strict([base, resolve_task(task, configs_dir), head_file], layers, overrides,
                      alternatives=ALTERNATIVES)
    if cfg.head.name != head:
        raise ConfigError(f"{head_file} sets head.name={cfg.head.name!r}, expected {head!r}")
    return cfg
