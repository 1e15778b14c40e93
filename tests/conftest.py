"""Shared test fixtures.

Real test data lives in ``../shared/data`` next to the repository (CI clones the repo with ``shared/``
beside it). ``MEDDINO_SHARED_DATA`` overrides the location. When the folder is missing, tests that need
it are skipped with a loud reason on a developer machine, and fail in CI (``CI=true``), so a missing
corpus can never turn into a silent pass.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDDINO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_CT = REPO_ROOT / "data_curation" / "sample_ct"


def _require(path: Path) -> Path:
    if not path.exists():
        msg = f"test data not found: {path} (set MEDDINO_SHARED_DATA to the shared/data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``shared/data`` (real CT/MRI in ``real/``, DINOv3 golden files in ``golden/``)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def real_data(shared_data: Path) -> Path:
    return _require(shared_data / "real")


@pytest.fixture(scope="session")
def golden_dir(shared_data: Path) -> Path:
    return _require(shared_data / "golden")


@pytest.fixture(scope="session")
def sample_ct() -> Path:
    """The small real CT sample embedded in the repository (used by the demo)."""
    return SAMPLE_CT


@pytest.fixture(scope="session")
def as_unprivileged() -> list[str]:
    """Command prefix under which file permissions apply: empty for a normal user; for root, util-linux ``setpriv``
    dropping the capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a chmod-000 file or a
    read-only folder behaves as it does for a user. Tests of unreadable inputs and unwritable outputs run through it."""
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running the tests as root needs util-linux setpriv (permission tests drop CAP_DAC_OVERRIDE)")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
