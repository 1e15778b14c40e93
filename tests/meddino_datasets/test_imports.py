"""The package edges of the design, read from the source (a lazy import inside a function counts too):
``meddino_common`` imports nothing of ours; ``meddino_datasets`` imports neither side; curation and finetuning are
peers (neither imports the other); ``finetune`` reaches into ``pretrain`` only through ``pretrain.models``;
``pretrain`` imports only ``meddino_common``; nothing imports ``tests`` or ``benchmarks``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest


def _imported_modules(package_dir: Path) -> dict[str, set[str]]:
    """Dotted module name -> the files of ``package_dir`` that import it (absolute imports)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(package_dir.parent)))
    return found


def _imported_packages(package_dir: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, files in _imported_modules(package_dir).items():
        found.setdefault(name.split(".")[0], set()).update(files)
    return found


OURS = {"meddino_common", "meddino_datasets", "data_curation", "pretrain", "finetune", "slurm", "tests", "benchmarks"}


@pytest.mark.parametrize("package,forbidden", [
    ("meddino_common", OURS - {"meddino_common"}),
    ("meddino_datasets", OURS - {"meddino_common", "meddino_datasets"}),
    ("data_curation", OURS - {"meddino_common", "meddino_datasets", "data_curation"}),
    ("pretrain", OURS - {"meddino_common", "pretrain"}),
    ("finetune", OURS - {"meddino_common", "meddino_datasets", "pretrain", "finetune"}),
])
def test_no_forbidden_cross_package_import(repo_root, package, forbidden):
    imported = _imported_packages(repo_root / package)
    offenders = {name: sorted(imported[name]) for name in forbidden & set(imported)}
    assert offenders == {}



def test_finetune_uses_only_the_models_of_pretrain(repo_root):
    imported = _imported_modules(repo_root / "finetune")
    offenders = {name: sorted(files) for name, files in imported.items()
                 if name.split(".")[0] == "pretrain" and not name.startswith("pretrain.models")}
    assert offenders == {}
