"""The visualisation config: ``configs/visualize.yaml`` declares every key; a ``--config`` file and the
command-line flags may only change declared keys (``meddino_common.config``, strict)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from meddino_common.config import load_config as load_strict_config, shipped_config
from meddino_common.config import strict_merge

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = shipped_config("visualize.yaml")


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """``configs/visualize.yaml``, then the file ``path`` on top (a user's partial copy), then ``overrides``
    (dotted key -> value, e.g. ``{"pca.fit": "separate"}``: what the CLI flags set). An unknown key or a value
    of the wrong type is a ``ConfigError`` naming the key and where it came from; the result is in struct mode.
    """
    cfg = load_strict_config([DEFAULT_CONFIG], [path] if path is not None else [])
    if not overrides:
        return cfg
    layer = OmegaConf.create()
    for key, value in overrides.items():
        OmegaConf.update(layer, key, value)
    return strict_merge(cfg, ("command line", layer))


def repo_path(path: str | Path) -> Path:
    """A relative path is taken from the working directory when it exists there, else from the repository root
    (so the config's ``configs/pretrain/base.yaml`` works from any folder)."""
    path = Path(path)
    if path.is_absolute():
        return path
    return path.resolve() if path.exists() else REPO_ROOT / path
