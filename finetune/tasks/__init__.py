"""Task registry: a task = a dataset folder + label names (+ evaluation regions), from `configs/finetune/<task>.yaml`.

``resolve_task(task_arg, configs_dir)`` turns ``--task`` (a registered name such as ``amos22``, a path to any
nnU-Net raw ``DatasetXXX_Name`` folder, or, as nnU-Net's CLIs take it, ``DatasetXXX_Name`` / ``XXX`` looked up in
``$nnUNet_raw``) into a config fragment; ``task_cases(cfg)`` lists the labelled cases; ``task_labels(cfg)`` gives
the ordered class names (background first) the model predicts; ``task_splits_file(cfg)`` finds the
``splits_final.json`` to use where nnU-Net keeps it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.tasks.layouts import discover_cases, filter_modality
from meddino_common.config import load_yaml
from meddino_datasets.case import Case
from meddino_datasets.layouts.nnunet import read_dataset_json

REGISTERED_TASKS = ("amos22", "amos22_ct_mri", "btcv", "kits23", "lits")


def _load_task_yaml(configs_dir: Path, name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A task YAML; ``extends: <task>`` merges it over another task's YAML (one home for shared label maps)."""
    path = configs_dir / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such task config" + (f" (extended by {seen[-1]})" if seen else ""))
    fragment = load_yaml(path)  # one line naming the file when it is not a readable YAML mapping
    parent = fragment.pop("extends", None)
    if parent is None:
        return fragment
    if parent in seen + (name,):
        raise ValueError(f"{path}: 'extends: {parent}' makes a cycle ({' -> '.join(seen + (name, parent))})")
    return OmegaConf.merge(_load_task_yaml(configs_dir, str(parent), seen + (name,)), fragment)


NNUNET_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


def nnunet_raw_dataset(task_arg: str) -> Path | None:
    """``DatasetXXX_Name`` or ``XXX`` -> ``$nnUNet_raw/DatasetXXX_Name`` (None when ``task_arg`` is neither form).

    As nnU-Net's ``maybe_convert_to_dataset_name``: a dataset id is zero-padded to three digits and must match
    exactly one ``DatasetXXX_*`` folder. Errors say what was searched and how to fix it.
    """
    if task_arg.isdigit():
        prefix = f"Dataset{int(task_arg):03d}_"
    elif NNUNET_DATASET_NAME.match(task_arg):
        prefix = None
    else:
        return None
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError(f"--task {task_arg}: an nnU-Net dataset name/id is looked up in $nnUNet_raw, which is not set; "
                         "set it or pass the dataset folder's path")
    root = Path(raw)
    if prefix is None:
        folder = root / task_arg
        if not folder.is_dir():
            raise ValueError(f"--task {task_arg}: no folder {folder} ($nnUNet_raw={raw})")
        return folder
    found = sorted(p for p in root.glob(f"{prefix}*") if p.is_dir()) if root.is_dir() else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise ValueError(f"--task {task_arg}: {what} folder named {prefix}* in $nnUNet_raw={raw}; need exactly one")
    return found[0]


def resolve_task(task_arg: str, configs_dir: Path) -> DictConfig:
    """Config fragment for ``--task``: the registered YAML, or a generic task for an nnU-Net raw folder."""
    if task_arg in REGISTERED_TASKS or (configs_dir / f"{task_arg}.yaml").exists():
        return _load_task_yaml(configs_dir, task_arg)
    path = Path(task_arg)
    if not path.is_dir():
        path = nnunet_raw_dataset(task_arg) or path
    if path.is_dir():
        name = path.resolve().name
        return OmegaConf.create({"task": {"name": name, "dataset_dir": str(path.resolve()), "layout": "nnunet"}})
    raise ValueError(f"--task {task_arg!r} is neither a registered task ({', '.join(REGISTERED_TASKS)}), "
                     "an existing nnU-Net raw dataset folder (DatasetXXX_Name with imagesTr/labelsTr/dataset.json), "
                     "nor a DatasetXXX_Name / dataset id in $nnUNet_raw")


def task_splits_file(cfg: DictConfig) -> tuple[Path | None, str]:
    """The ``splits_final.json`` to use and where it was found (for the log), or ``(None, reason)``.

    In nnU-Net's order: ``splits_file=`` when given; else ``$nnUNet_preprocessed/<DatasetXXX_Name>/`` (where
    nnU-Net's trainer reads it); else the raw dataset folder (where nnU-Net's planner copies it from).
    None means nnU-Net's default 5-fold split of the sorted case ids.
    """
    if cfg.splits_file:
        return Path(str(cfg.splits_file)), "splits_file="
    dataset_dir = Path(str(cfg.task.dataset_dir))
    preprocessed = os.environ.get("nnUNet_preprocessed")
    candidates = [(dataset_dir / "splits_final.json", "the raw dataset folder")]
    if preprocessed:
        candidates.insert(0, (Path(preprocessed) / dataset_dir.name / "splits_final.json", "$nnUNet_preprocessed"))
    for path, origin in candidates:
        if path.is_file():
            return path, origin
    searched = ", ".join(str(p) for p, _ in candidates)
    return None, f"none found (looked for {searched})"


def task_labels(cfg: DictConfig) -> list[str]:
    """Class names indexed by label value: ``["background", name_1, ..., name_K]`` (contiguous ids required).

    From ``task.labels`` if given, else from ``dataset.json`` (nnU-Net v2 ``{"name": id}`` or v1 ``{"id": "name"}``).
    Region-valued v2 labels (lists) become ``task.eval_regions`` via ``task_eval_regions``.
    """
    labels = dict(OmegaConf.to_container(cfg.task.labels, resolve=True)) if cfg.task.labels else {}
    if not labels:
        meta = read_dataset_json(Path(cfg.task.dataset_dir))
        raw = meta.get("labels")
        if not raw:
            raise ValueError(f"{cfg.task.dataset_dir}: no task.labels in the config and no 'labels' in dataset.json")
        if all(str(k).isdigit() for k in raw):  # v1: {"0": "background", "1": "liver"}
            labels = {str(v): int(k) for k, v in raw.items()}
        else:
            labels = {}
            for name, value in raw.items():
                if isinstance(value, list):
                    continue  # a region; training labels come from the integer entries / regions_class_order
                labels[str(name)] = int(value)
            if any(isinstance(v, list) for v in raw.values()):
                order = meta.get("regions_class_order") or []
                for value in order:
                    if int(value) not in labels.values():
                        labels[f"label_{int(value)}"] = int(value)
    labels = {k: v for k, v in labels.items() if int(v) != 0}
    ids = sorted(int(v) for v in labels.values())
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"task {cfg.task.name}: label ids must be 1..K without gaps, got {ids}")
    names = ["background"] + [None] * len(ids)
    for name, value in labels.items():
        names[int(value)] = name
    return names


def task_eval_regions(cfg: DictConfig) -> dict[str, list[int]] | None:
    """Evaluation classes as unions of label ids, or None for per-label evaluation."""
    if cfg.task.eval_regions:
        return {str(k): [int(i) for i in v] for k, v in OmegaConf.to_container(cfg.task.eval_regions, resolve=True).items()}
    meta = read_dataset_json(Path(cfg.task.dataset_dir)) if Path(str(cfg.task.dataset_dir)).is_dir() else {}
    raw = meta.get("labels") or {}
    regions = {str(k): (v if isinstance(v, list) else [v]) for k, v in raw.items()
               if str(k) != "background" and not str(k).isdigit()}
    if any(isinstance(v, list) for v in raw.values()):
        return {k: [int(i) for i in v] for k, v in regions.items()}
    return None


def task_cases(cfg: DictConfig, require_labels: bool = True) -> list[Case]:
    """The task's cases (modality-filtered), each with a label file unless ``require_labels=False``."""
    cases = discover_cases(cfg.task.dataset_dir, str(cfg.task.layout), str(cfg.task.owners_layout or cfg.task.name))
    cases = filter_modality(cases, cfg.task.modality_filter, str(cfg.task.name))
    if require_labels:
        unlabelled = [c.case_id for c in cases if c.label is None]
        if unlabelled:
            raise FileNotFoundError(f"{cfg.task.dataset_dir}: no label file for cases {unlabelled[:10]}")
    if not cases:
        raise FileNotFoundError(f"{cfg.task.dataset_dir}: no cases left after filtering")
    return cases


__all__ = ["REGISTERED_TASKS", "nnunet_raw_dataset", "resolve_task", "task_cases", "task_eval_regions",
           "task_labels", "task_splits_file"]
