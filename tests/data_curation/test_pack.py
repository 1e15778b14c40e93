"""Stage 3 on the embedded real CT: seeded groups, a shard layout fixed by the plan, shards made of the staged
sample bytes in a seeded shuffle, the same bytes whatever the number of packing threads or the order groups are
packed in, and a group packed again after its shard was lost."""
from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from data_curation.journal import Journal
from data_curation.pack import pack, remove_shards_from, shard_layout, volume_groups
from data_curation.shards import SHARD_PATTERN


@pytest.fixture
def build(curated_sample, tmp_path):
    settings, cases, src = curated_sample
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return settings, out


def _kept(journal: Journal) -> list[dict]:
    return [v for r in journal.read("volumes.jsonl") for v in r["volumes"] if v["n_slices"] > 0]


def test_groups_are_seeded_and_independent_of_input_order():
    vols = [{"uid": f"folder/v{i:02d}", "n_slices": 1} for i in range(10)]
    groups = volume_groups(vols, 0, 4)
    assert [len(g) for g in groups] == [4, 4, 2]
    assert sorted(v["uid"] for g in groups for v in g) == sorted(v["uid"] for v in vols)
    assert volume_groups(vols[::-1], 0, 4) == groups
    assert volume_groups(vols, 1, 4) != groups
    assert shard_layout([[{"n_slices": 45}], [{"n_slices": 40}, {"n_slices": 1}], [{"n_slices": 3}]], 40) == [(0, 2), (2, 2), (4, 1)]


def test_shards_hold_the_staged_samples_in_seeded_order(build):
    """Every staged sample lands once, byte for byte, in the shards of its group; a group's shards mix its volumes;
    the manifest part lists each sample with its shard; the staging files of a packed group are deleted."""
    settings, out = build
    journal = Journal(out)
    kept = _kept(journal)
    staged = {}
    for v in kept:
        data = (journal.staging / v["staging"]).read_bytes()
        for i, offset, size in v["slices"]:
            staged[(v["case"], i)] = data[offset:offset + size]
    groups = volume_groups(kept, settings.seed, settings.output.volumes_per_group)
    assert len(groups) == 1  # 2 volumes < 64 per group
    pack(groups, settings.seed, 40, out, journal, progress=False)
    shards = sorted(out.glob("ct3m-*.tar"))
    assert [p.name for p in shards] == [SHARD_PATTERN % i for i in range(-(-len(staged) // 40))]
    rows = (journal.parts / "group-000000.csv").read_text().splitlines()
    assert len(rows) == len(staged)
    got = b""
    for shard in shards:
        data = shard.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            names = [m.name for m in tf.getmembers()]
        assert len(names) == 2 * min(40, len(staged) - 40 * shards.index(shard))
        got += data
    for blob in staged.values():
        assert got.count(blob) == 1
    first = [r.split(",")[3] for r in rows[:40]]
    assert len(set(first)) == 2  # volumes are interleaved, not one after the other
    [record] = journal.read("groups.jsonl")
    assert record["n_samples"] == len(staged) and [s["shard"] for s in record["shards"]] == [p.name for p in shards]
    assert not list(journal.staging.iterdir())


def test_two_packing_threads_give_the_bytes_of_one(build, curated_sample, tmp_path):
    """One group per volume, packed by 2 threads (groups finish in any order) or by 1: identical shards, because each
    group's shard numbers come from the plan's layout and its order from ``(seed, group)``."""
    settings, out = build
    groups = volume_groups(_kept(Journal(out)), settings.seed, 1)
    assert len(groups) == 2
    pack(groups, settings.seed, 16, out, Journal(out), progress=False, threads=2)
    other = tmp_path / "other"
    shutil.copytree(curated_sample[2], other)
    pack(groups, settings.seed, 16, other, Journal(other), progress=False, threads=1)
    shards = {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")}
    assert len(shards) > 4 and {p.name: p.read_bytes() for p in other.glob("ct3m-*.tar")} == shards


def test_a_lost_group_is_packed_again_and_extra_shards_removed(build):
    settings, out = build
    journal = Journal(out)
    kept = _kept(journal)
    groups = volume_groups(kept, settings.seed, 1)
    saved = {v["staging"]: (journal.staging / v["staging"]).read_bytes() for v in kept}
    pack(groups, settings.seed, 16, out, journal, progress=False)
    reference = {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")}
    n = len(reference)
    (out / (SHARD_PATTERN % 0)).unlink()
    (out / (SHARD_PATTERN % (n + 3))).write_bytes(b"left from a bigger build")
    (out / f"{SHARD_PATTERN % (n + 4)}.tmp").write_bytes(b"half")
    journal.rewrite("groups.jsonl", [g for g in journal.read("groups.jsonl") if g["group"] != 0])
    for v in groups[0]:
        (journal.staging / v["staging"]).write_bytes(saved[v["staging"]])  # curated again, as the builder does
    pack(groups, settings.seed, 16, out, journal, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("ct3m-*")} == reference
    remove_shards_from(out, 1)
    assert [p.name for p in out.glob("ct3m-*")] == [SHARD_PATTERN % 0]
