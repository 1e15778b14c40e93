"""THE case split: nnU-Net's default 5-fold cross-validation, reimplemented without scikit-learn.

nnU-Net (v1 and v2) sorts the case ids, then uses ``sklearn.model_selection.KFold(n_splits=5, shuffle=True,
random_state=12345)``. KFold's semantics, reproduced here exactly: ``idx = arange(n)``;
``numpy.random.RandomState(seed).shuffle(idx)``; the shuffled order is cut into ``n_folds`` contiguous folds,
the first ``n % n_folds`` folds one element larger; fold k validates on its chunk and trains on the rest, both
lists in sorted-id order (KFold returns index masks). The result is what nnU-Net writes to
``splits_final.json``: a list of ``{"train": [...], "val": [...]}``.

Both `finetune` (fold 0 by default) and `data_curation --holdout-finetune` (keep finetune validation cases out
of pretraining) import this module, so there is one definition of "the split" and the holdout cannot drift from the
folds finetune trains on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from meddino_common.atomic import atomic_write_json

DEFAULT_N_FOLDS = 5
DEFAULT_SEED = 12345


def kfold_indices(n_samples: int, n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_idx, val_idx)] * n_folds`` exactly as ``KFold(n_folds, shuffle=True, random_state=seed).split``."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_samples < n_folds:
        raise ValueError(f"cannot split {n_samples} cases into {n_folds} folds (nnU-Net needs at least one case per fold)")
    order = np.arange(n_samples)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n_samples // n_folds, dtype=int)
    sizes[: n_samples % n_folds] += 1
    folds = []
    start = 0
    for size in sizes:
        val_mask = np.zeros(n_samples, dtype=bool)
        val_mask[order[start:start + size]] = True
        folds.append((np.flatnonzero(~val_mask), np.flatnonzero(val_mask)))
        start += size
    return folds


def nnunet_kfold_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content for these case ids (sorted first, duplicates rejected)."""
    keys = sorted(str(c) for c in case_ids)
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate case ids: {dup[:10]}")
    return [{"train": [keys[i] for i in tr], "val": [keys[i] for i in va]} for tr, va in kfold_indices(len(keys), n_folds, seed)]


def load_splits_file(path: str | Path) -> list[dict[str, list[str]]]:
    """Read an nnU-Net ``splits_final.json`` (list of {"train", "val"}) with a clear error on a bad file."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read splits file ({err})") from err
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise ValueError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} as nnU-Net writes it")
    return splits


def save_splits_file(splits: list[dict[str, list[str]]], path: str | Path) -> None:
    """Atomically write ``splits_final.json`` (a reader never sees half a split)."""
    atomic_write_json(path, splits, indent=2)


def fold_split(case_ids: Sequence[str], fold: int = 0, splits_file: str | Path | None = None,
               n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)`` of one fold: from ``splits_file`` if given, else the nnU-Net default split.

    ``fold="all"`` (nnU-Net's convention) trains and validates on every case. With a splits file, ids listed
    there but missing from ``case_ids`` are an error (a split for another dataset version).
    """
    if str(fold) == "all":
        keys = sorted(str(c) for c in case_ids)
        return keys, keys
    fold = int(fold)
    if splits_file is not None:
        splits = load_splits_file(splits_file)
        if not 0 <= fold < len(splits):
            raise ValueError(f"{splits_file}: fold {fold} requested but the file has {len(splits)} folds")
        known = set(str(c) for c in case_ids)
        missing = [c for c in splits[fold]["train"] + splits[fold]["val"] if c not in known]
        if missing:
            raise ValueError(f"{splits_file}: fold {fold} names cases not in the dataset: {missing[:10]}")
        return list(splits[fold]["train"]), list(splits[fold]["val"])
    splits = nnunet_kfold_splits(case_ids, n_folds, seed)
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}) or 'all', got {fold}")
    return splits[fold]["train"], splits[fold]["val"]
