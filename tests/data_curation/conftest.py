"""Fixtures for the curation tests: the curation config as a plain dict, and helpers to lay out fixture trees."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf


@pytest.fixture(scope="session")
def ct3m_cfg(repo_root: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(repo_root / "configs" / "data" / "ct3m.yaml"), resolve=True)


def link(src: Path, dst: Path) -> Path:
    """Symlink ``src`` at ``dst`` (parents created): fixture trees named as the dataset owners name their files."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst
