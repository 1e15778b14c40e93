"""``python data_curation/build_ct3m.py`` without a ``sys.path`` edit: run as a file, Python puts ``data_curation/``
first on ``sys.path``, so no module of that folder may be named like a standard-library or installed top-level
module (it would be imported in its place). Both command forms run, from the repository and from elsewhere."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[2] / "data_curation"


def _installed_top_level_names() -> set[str]:
    names = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        names |= set(top.split()) if top else set()
        names |= {Path(f).parts[0].split(".")[0] for f in dist.files or () if not str(f).startswith("..")}
    return names


def test_no_module_of_the_folder_shadows_an_importable_name():
    ours = {p.stem for p in FOLDER.glob("*.py")} | {p.name for p in FOLDER.iterdir() if (p / "__init__.py").exists()}
    assert {"build_ct3m", "journal", "pool", "pack", "reports", "settings", "discovery"} <= ours
    clash = ours & _installed_top_level_names() - {"data_curation"}
    assert not clash, f"data_curation/{sorted(clash)} would shadow the module(s) of that name in a file-path run"


@pytest.mark.parametrize("form", ["file", "module"])
def test_both_command_forms_run_from_any_folder(form, tmp_path, repo_root):
    head = [sys.executable, str(repo_root / "data_curation" / "build_ct3m.py")] if form == "file" else \
        [sys.executable, "-m", "data_curation.build_ct3m"]
    for cwd in (repo_root, tmp_path):
        proc = subprocess.run([*head, "--list-sources", "--root", f"folder={repo_root / 'data_curation' / 'sample_ct'}"],
                              cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("folder")] == [["folder", "3"]]
