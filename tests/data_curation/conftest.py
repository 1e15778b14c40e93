"""Fixtures for the curation tests: the curation config as a plain dict, and helpers to lay out fixture trees."""
from __future__ import annotations

import errno
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


@pytest.fixture(scope="session")
def curated_sample(tmp_path_factory, sample_ct):
    """A build folder after stage 2 (curate) on the embedded real CT -- the MSD spleen and the TotalSegmentator
    example under one ``folder`` root, shipped settings, curated in this process -> (settings, cases, out). Tests of
    the later stages copy ``out`` before changing it."""
    from data_curation.discovery import discover
    from data_curation.journal import Journal
    from data_curation.pool import curate
    from data_curation.settings import load_settings

    root = tmp_path_factory.mktemp("sample_root")
    for name in ("totalsegmentator", "msd_spleen"):
        os.symlink(sample_ct / name, root / name)
    settings = load_settings(roots=[f"folder={root}"], workers=0)
    cases = discover(settings, ["folder"])["folder"]
    out = tmp_path_factory.mktemp("curated")
    curate(cases, settings, Journal(out), progress=False)
    return settings, cases, out


@pytest.fixture
def disk_full_after(monkeypatch):
    """``disk_full_after(n)``: from the (n+1)-th sample on, the workers' staging writes (``process.write_sample``, run
    in this process with ``--workers 0``) fail with ENOSPC, as on a full disk. ``monkeypatch.undo()`` frees the space."""
    import data_curation.process as process

    def arm(n: int) -> None:
        real_write, calls = process.write_sample, []

        def write_until_full(fd, key, fields):
            calls.append(key)
            if len(calls) > n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, key, fields)

        monkeypatch.setattr(process, "write_sample", write_until_full)

    return arm
