"""The split must be nnU-Net's: sorted ids + sklearn KFold(5, shuffle=True, random_state=12345)."""
from __future__ import annotations

import json

import pytest

from meddino_datasets.splits import fold_split, kfold_indices, load_splits_file, nnunet_kfold_splits, save_splits_file


@pytest.mark.parametrize("n", [5, 6, 9, 13, 24, 30, 101])
def test_kfold_matches_sklearn(n):
    sklearn_model_selection = pytest.importorskip("sklearn.model_selection")
    ref = list(sklearn_model_selection.KFold(n_splits=5, shuffle=True, random_state=12345).split(range(n)))
    ours = kfold_indices(n, 5, 12345)
    assert len(ours) == 5
    for (tr, va), (rtr, rva) in zip(ours, ref):
        assert tr.tolist() == rtr.tolist()
        assert va.tolist() == rva.tolist()


def test_case_ids_sorted_then_split_like_nnunet():
    sklearn_model_selection = pytest.importorskip("sklearn.model_selection")
    import numpy as np

    ids = [f"amos_{i:04d}" for i in (507, 1, 33, 12, 400, 2, 98, 150, 3, 77, 41, 260)]
    splits = nnunet_kfold_splits(ids)
    keys = np.sort(np.array(ids))  # what nnU-Net does
    for fold, (tr, va) in enumerate(sklearn_model_selection.KFold(5, shuffle=True, random_state=12345).split(keys)):
        assert splits[fold]["train"] == list(keys[tr])
        assert splits[fold]["val"] == list(keys[va])
    # folds partition the cases; first n % 5 folds are one larger
    all_val = [c for s in splits for c in s["val"]]
    assert sorted(all_val) == sorted(ids)
    assert [len(s["val"]) for s in splits] == [3, 3, 2, 2, 2]


def test_known_nnunet_fold0_for_ten_cases():
    # Pinned value: RandomState(12345).shuffle(arange(10)) = [0 7 3 9 6 4 1 8 5 2]; fold 0 = {0, 7}.
    ids = [f"case_{i:02d}" for i in range(10)]
    train, val = fold_split(ids, fold=0)
    assert val == ["case_00", "case_07"]
    assert sorted(train + val) == ids and not set(train) & set(val)


def test_splits_file_roundtrip_and_errors(tmp_path):
    ids = [f"c{i}" for i in range(7)]
    path = tmp_path / "splits_final.json"
    save_splits_file(nnunet_kfold_splits(ids), path)
    assert fold_split(ids, 2, path) == fold_split(ids, 2)
    assert load_splits_file(path)[0]["val"] == fold_split(ids, 0)[1]
    with pytest.raises(ValueError, match="fold 7"):
        fold_split(ids, 7, path)
    with pytest.raises(ValueError, match="not in the dataset"):
        fold_split(ids[:-2], 0, path)
    (tmp_path / "bad.json").write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="bad.json"):
        fold_split(ids, 0, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="duplicate"):
        nnunet_kfold_splits(["a", "a", "b", "c", "d"])
    with pytest.raises(ValueError, match="cannot split"):
        nnunet_kfold_splits(["a", "b"])
    assert fold_split(ids, "all") == (sorted(ids), sorted(ids))
