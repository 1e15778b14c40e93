"""Stage 1, discover: which sources run, their cases (found by the source adapters in the owners' layouts), and
the cases kept out of the build (``--exclude`` lists and the finetune validation cases of ``--holdout-finetune``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from data_curation.settings import CurationSettings
from data_curation.sources import REGISTRY
from meddino_datasets.case import Case
from data_curation.sources.base import collect_problems, with_source_path


def discover(settings: CurationSettings, names: list[str], problems: list[dict] | None = None) -> dict[str, list[Case]]:
    """Cases of each source in ``names`` (sources without a root are skipped); folders and files that were seen but
    could not be read are appended to ``problems`` (failure records with ``source`` set)."""
    found = {}
    for name in names:
        root = settings.source_root(name)
        if root is None or not root.exists():
            continue
        with collect_problems() as seen:
            found[name] = [with_source_path(c, root) for c in REGISTRY[name].find(root, settings.sources[name])]
        if problems is not None:
            problems.extend(dict(p, source=name, case="") for p in seen)
    return found


def empty_sources(settings: CurationSettings, found: dict[str, list[Case]]) -> list[dict]:
    """A ``no_case_found`` record per source whose root yielded no case (wrong folder, or not the owners' layout)."""
    return [{"source": name, "case": "", "file": str(settings.source_root(name)), "reason": "no_case_found", "filtered": True,
             "detail": f"no case found (expected layout: {REGISTRY[name].layout})"} for name, cases in found.items() if not cases]


def selected_sources(settings: CurationSettings, arg: str | None) -> list[str]:
    """Sources to build: ``--sources`` or every source with a root. A root that is set but does not exist is an
    error (a mistyped path must not quietly build without that dataset)."""
    missing = [f"{n}={settings.source_root(n)}" for n in REGISTRY if settings.source_root(n) and not settings.source_root(n).is_dir()]
    if missing:
        raise SystemExit(f"source root(s) not found or not a folder: {', '.join(missing)}; fix --root NAME=PATH or the config")
    if arg:
        names = [s.strip() for s in arg.split(",") if s.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise SystemExit(f"--sources: unknown source(s) {unknown}; known: {', '.join(REGISTRY)}")
        unset = [n for n in names if not settings.source_root(n)]
        if unset:
            raise SystemExit(f"--sources: no root for {unset}; set it with --root NAME=PATH or in the config")
        return names
    return [n for n in REGISTRY if settings.source_root(n)]


def read_exclusions(items: list[str]) -> set[str]:
    """``--exclude`` values: files with one case per line, or comma lists; entries ``source/case`` or ``case``."""
    out: set[str] = set()
    for item in items or []:
        entries = Path(item).read_text().split() if Path(item).is_file() else item.split(",")
        out.update(e.strip() for e in entries if e.strip() and not e.strip().startswith("#"))
    return out


def holdout_cases(settings: CurationSettings, found: dict[str, list[Case]]) -> dict[str, list[str]]:
    """Fold-``holdout.fold`` validation cases of each finetune task -> their uids here.

    The split is the one finetune uses: ``meddino_datasets.splits.fold_split`` over the ids the finetune task gives the
    cases it trains and validates on (each adapter's ``finetune_case_id``: e.g. LiTS ``volume-7`` is ``train_7``
    there). The naming matters -- the nnU-Net split sorts the ids -- so the split is computed on the finetune ids and
    mapped back, never on this package's case names."""
    from meddino_datasets.splits import fold_split

    held: dict[str, list[str]] = {}
    for task, source in settings.holdout.tasks.items():
        to_finetune = REGISTRY[source].finetune_case_id
        if to_finetune is None:
            raise SystemExit(f"holdout.tasks.{task}: source {source} has no finetune case-id rule (finetune_case_id)")
        by_id: dict[str, Case] = {}
        for case in found.get(source, []):
            fid = to_finetune(case)
            if fid is not None:
                by_id[fid] = case
        if len(by_id) < 5:
            continue
        _, val = fold_split(sorted(by_id), fold=settings.holdout.fold)
        held[task] = [by_id[f].uid for f in val]
    return held


def is_excluded(case: Case, excluded: set[str]) -> bool:
    return case.uid in excluded or case.case_id in excluded


def apply_exclusions(settings: CurationSettings, found: dict[str, list[Case]], names: list[str], exclude: list[str], holdout: bool) -> tuple[list[Case], list[str]]:
    """-> (cases to build, uids excluded by ``--exclude`` lists and the ``--holdout-finetune`` split)."""
    excluded_ids = read_exclusions(exclude)
    if holdout:
        held = holdout_cases(settings, found)
        for task, source in settings.holdout.tasks.items():
            if task in held:
                excluded_ids.update(held[task])
                print(f"holdout: {task}: {len(held[task])} fold-{settings.holdout.fold} validation cases excluded", file=sys.stderr)
            else:
                print(f"holdout: {task}: source {source} not in this run (or < 5 labelled cases), nothing to exclude", file=sys.stderr)
    all_cases = [c for name in names for c in found.get(name, [])]
    cases = [c for c in all_cases if not is_excluded(c, excluded_ids)]
    return cases, sorted(c.uid for c in all_cases if is_excluded(c, excluded_ids))
