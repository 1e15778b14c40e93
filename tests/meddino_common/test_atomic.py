"""Atomic writes: the target is either the old file or the whole new one, never a part, and no litter."""
from __future__ import annotations

import json
import os

import pytest

from meddino_common.atomic import (atomic_write, atomic_write_json, atomic_write_text, atomic_write_to_path,
                                   remove_stale_temporaries)


def test_text_and_json_round_trip_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_path_writers_see_the_suffix(tmp_path):
    seen = []
    atomic_write_to_path(tmp_path / "x.nii.gz", lambda p: (seen.append(p), open(p, "wb").write(b"1")))
    assert seen[0].endswith(".nii.gz") and (tmp_path / "x.nii.gz").read_bytes() == b"1"


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".ckpt.pth.tmp-abc.part").write_bytes(b"x")
    (tmp_path / "ckpt.pth").write_bytes(b"y")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".ckpt.pth.tmp-abc.part"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
