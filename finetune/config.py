"""Finetune configuration: ``base.yaml`` <- ``<task>.yaml`` <- ``heads/<head>.yaml`` <- extra files <- dot-list."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from finetune.tasks import resolve_task

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS_DIR = PACKAGE_ROOT / "configs" / "finetune"


def load_config(task: str, head: str = "primus", extra_files: Sequence[str | Path] = (),
                overrides: Sequence[str] = (), configs_dir: Optional[Path] = None) -> DictConfig:
    """The merged, unresolved finetune config (resolution happens when values are read)."""
    configs_dir = Path(configs_dir or DEFAULT_CONFIGS_DIR)
    base = configs_dir / "base.yaml"
    if not base.exists():
        raise FileNotFoundError(f"{base} not found (configs/finetune/ must sit next to the finetune package)")
    head_file = configs_dir / "heads" / f"{head}.yaml"
    if not head_file.exists():
        raise FileNotFoundError(f"no config for head {head!r}: {head_file}")
    parts = [OmegaConf.load(base), resolve_task(task, configs_dir), OmegaConf.load(head_file)]
    for extra in extra_files:
        path = Path(extra)
        if not path.exists() and (configs_dir / path).exists():
            path = configs_dir / path
        elif not path.exists() and (PACKAGE_ROOT / path).exists():  # configs/finetune/x.yaml outside a checkout
            path = PACKAGE_ROOT / path
        if not path.exists():
            raise FileNotFoundError(f"--config {extra}: file not found")
        parts.append(OmegaConf.load(path))
    parts.append(OmegaConf.from_dotlist(list(overrides)))
    cfg = OmegaConf.merge(*parts)
    if cfg.head.get("name") not in (None, head):
        raise ValueError(f"{head_file} sets head.name={cfg.head.name!r}, expected {head!r}")
    cfg.head.name = head
    return cfg
