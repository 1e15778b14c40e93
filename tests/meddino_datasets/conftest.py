"""The curation DICOM policy as the shipped ``configs/data/ct3m.yaml`` defines it (the other policy, PREDICTION,
lives in code)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from meddino_datasets.readers.dicom import DicomPolicy


@pytest.fixture(scope="session")
def curation_policy(repo_root: Path) -> DicomPolicy:
    cfg = OmegaConf.to_container(OmegaConf.load(repo_root / "configs" / "data" / "ct3m.yaml"), resolve=True)
    return DicomPolicy.from_config(cfg["dicom"], cfg["reading"])
