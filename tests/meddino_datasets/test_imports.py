"""The package edges of the design: ``meddino_datasets`` imports neither side, and curation and finetuning are
peers (neither imports the other); read from the source, so a lazy import inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest


def _imported_packages(package_dir: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(package_dir.parent)))
    return found


@pytest.mark.parametrize("package,forbidden", [
    ("meddino_datasets", {"data_curation", "finetune", "pretrain", "tests", "benchmarks"}),
    ("data_curation", {"finetune", "pretrain", "tests", "benchmarks"}),
    ("finetune", {"data_curation", "tests", "benchmarks"}),
])
def test_no_forbidden_cross_package_import(repo_root, package, forbidden):
    imported = _imported_packages(repo_root / package)
    offenders = {name: sorted(imported[name]) for name in forbidden & set(imported)}
    assert offenders == {}
