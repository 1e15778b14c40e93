"""The loader checks every shard against the curation's shards.csv when it opens it (issue #18): a shard cut at a
member boundary, overwritten pixel bytes or a truncated file fail in one line naming the shard and the fix."""
from __future__ import annotations

import csv
import hashlib
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest

from pretrain.data.shards import CorruptShardError, count_samples, expand_shards, iter_shard, slot_stream


@pytest.fixture(scope="module")
def curated(tmp_path_factory, sample_ct: Path, repo_root: Path) -> Path:
    """Shards of the embedded real CT sample built by the curation CLI (4 shards of up to 40 samples)."""
    from data_curation.build_ct3m import main

    root = tmp_path_factory.mktemp("sample")
    for name in ("totalsegmentator", "msd_spleen"):
        (root / name).symlink_to(sample_ct / name)
    out = tmp_path_factory.mktemp("curated") / "ct3m"
    assert main(["--no-progress", "--workers", "0", "--out", str(out), "--root", f"folder={root}",
                 "--config", str(repo_root / "configs/data/ct3m.yaml"), "output.samples_per_shard=40"]) == 0
    return out


@pytest.fixture
def copy(curated: Path, tmp_path: Path) -> Path:
    """A fresh copy of the curated folder to damage (the loader's verification cache keys on path, size and mtime)."""
    dst = tmp_path / "ct3m"
    shutil.copytree(curated, dst, ignore=shutil.ignore_patterns(".state", ".lock"))
    return dst


def _read_all(folder: Path) -> int:
    return sum(1 for shard in expand_shards(folder) for _ in iter_shard(shard))


def test_manifest_records_size_count_and_digest_of_every_shard(curated: Path):
    rows = list(csv.DictReader(open(curated / "shards.csv")))
    shards = sorted(curated.glob("ct3m-*.tar"))
    assert [r["shard"] for r in rows] == [s.name for s in shards] and len(shards) == 4
    per_shard = {}
    for row in csv.DictReader(open(curated / "manifest.csv")):
        per_shard[row["shard"]] = per_shard.get(row["shard"], 0) + 1
    for row, shard in zip(rows, shards):
        assert int(row["bytes"]) == shard.stat().st_size
        assert row["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
        with tarfile.open(shard) as tar:
            assert int(row["n_samples"]) == per_shard[shard.name] == len(tar.getnames()) // 2 == count_samples(shard)
    assert _read_all(curated) == sum(per_shard.values())


def test_shard_cut_at_a_member_boundary_fails_at_open(copy: Path):
    """A valid tar holding the first half of the shard's members: plain tar reads it, the loader refuses it."""
    shard = copy / "ct3m-000001.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[40].offset  # the 21st sample's first member
    data = shard.read_bytes()[:offset]
    shard.write_bytes(data + bytes(10240 - len(data) % 10240 or 10240))
    with tarfile.open(shard) as tar:
        assert len(tar.getnames()) == 40
    with pytest.raises(CorruptShardError, match=r"^shard .*ct3m-000001.tar: \d+ bytes, shards.csv says \d+ \(cut short or replaced\); delete it and re-run the data_curation/build_ct3m.py command"):
        next(iter_shard(shard))


def test_overwritten_pixel_bytes_fail_at_open(copy: Path):
    shard = copy / "ct3m-000002.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        npy = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    data[npy.offset_data + 200:npy.offset_data + 1200] = bytes(1000)  # same size, garbage pixels
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"ct3m-000002.tar: SHA-256 differs from shards.csv \(bytes overwritten\); delete it and re-run"):
        next(iter_shard(shard))


def test_truncated_shard_fails_in_the_stream_naming_the_shard(copy: Path):
    shard = copy / "ct3m-000000.tar"
    shard.write_bytes(shard.read_bytes()[:70000])
    stream = slot_stream(expand_shards(copy), slot=0, n_slots=1, seed=0)
    with pytest.raises(CorruptShardError, match=r"ct3m-000000.tar: 70000 bytes, shards.csv says"):
        for _ in range(200):
            next(stream)


def test_build_without_shards_csv_is_read_after_a_warning(copy: Path):
    """Builds made before digests were recorded still train: one warning per folder, counts from manifest.csv."""
    (copy / "shards.csv").unlink()
    with pytest.warns(UserWarning, match="has no shards.csv: shards are read without verification"):
        n = _read_all(copy)
    assert n == sum(1 for _ in csv.DictReader(open(copy / "manifest.csv")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _read_all(copy)  # warned once per folder


def test_forgetting_the_verified_shards_hashes_them_again(copy: Path):
    """A shard is hashed once per process (keyed on path, size, mtime); ``forget_verified_shards`` (the verification
    benchmark's reset) makes the next read hash it again, so bytes overwritten behind an unchanged mtime are caught."""
    import os

    from pretrain.data.shards import forget_verified_shards

    shard = copy / "ct3m-000001.tar"
    next(iter_shard(shard))  # hashed and remembered
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        npy = next(m for m in tar.getmembers() if m.name.endswith(".npy"))
    data[npy.offset_data + 200:npy.offset_data + 1200] = b"\xff" * 1000  # same size, garbage pixels
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the cache still trusts it
    next(iter_shard(shard))
    forget_verified_shards()
    with pytest.raises(CorruptShardError, match=r"ct3m-000001.tar: SHA-256 differs from shards.csv"):
        next(iter_shard(shard))
