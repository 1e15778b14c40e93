"""The build's journal: durable JSONL records that survive a torn last line, leftovers of killed writes cleared, the
plan hash that refuses to mix two builds, and the checks that send lost staging files and damaged shards back
through their stage."""
from __future__ import annotations

from pathlib import Path
import json
import shutil

import pytest

from data_curation.journal import STATE_VERSION, Journal, case_records, check_plan, damaged_shards, lost_staging, plan_hash
from data_curation.pack import pack, volume_groups
from data_curation.settings import load_settings
from meddino_datasets.case import Case


@pytest.fixture
def build(curated_sample, tmp_path):
    """A copy of the curated sample build (stage 2 done) -> (settings, cases, out)."""
    settings, cases, src = curated_sample
    out = tmp_path / "out"
    shutil.copytree(src, out)
    return settings, cases, out


def test_records_survive_a_torn_last_line(tmp_path):
    journal = Journal(tmp_path)
    journal.append("volumes.jsonl", {"case": "folder/a", "volumes": []})
    journal.append("volumes.jsonl", {"case": "folder/b", "volumes": []})
    with open(journal.dir / "volumes.jsonl", "a") as fh:
        fh.write('{"case": "folder/c", "vol')  # a kill in the middle of an append: never committed
    again = Journal(tmp_path)
    assert [r["case"] for r in again.read("volumes.jsonl")] == ["folder/a", "folder/b"]
    again.truncate_torn("volumes.jsonl")
    assert (journal.dir / "volumes.jsonl").read_text().count("\n") == 2
    again.append("volumes.jsonl", {"case": "folder/c", "volumes": []})
    assert [r["case"] for r in Journal(tmp_path).read("volumes.jsonl")] == ["folder/a", "folder/b", "folder/c"]


def test_leftovers_of_killed_atomic_writes_are_cleared(tmp_path):
    """A kill during an atomic write leaves a hidden temporary file; the next run's journal removes it (state, staging
    and manifest parts), and never touches finished files."""
    state = tmp_path / ".state"
    leftovers = [state / ".groups.jsonl.tmp-x1.part", state / "staging" / ".folder-a.samples.tmp-x2.part",
                 state / "manifest_parts" / ".group-000000.csv.tmp-x3.part"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    (state / "staging" / "folder-a.samples").write_text("kept")
    Journal(tmp_path)
    assert not any(p.exists() for p in leftovers) and (state / "staging" / "folder-a.samples").exists()


def test_plan_hash_covers_what_changes_outputs():
    """``run`` settings and source roots change no output byte: same plan. Another output setting or case list: another."""
    cases = [Case("a", Path("/x/a.nii.gz"), source="folder"), Case("b", Path("/x/b.nii.gz"), source="folder")]
    base = plan_hash(load_settings(), cases)
    assert plan_hash(load_settings(roots=["folder=/elsewhere"], workers=7, overrides=["run.slice_batch=4"]), cases) == base
    assert plan_hash(load_settings(overrides=["output.samples_per_shard=40"]), cases) != base
    assert plan_hash(load_settings(), cases[:1]) != base


def test_a_build_refuses_another_plan_or_builder_version(tmp_path):
    journal = Journal(tmp_path)
    assert check_plan(journal, "abc", 2) is None  # a new build records its plan
    assert json.loads((journal.dir / "plan.json").read_text()) == {"plan_hash": "abc", "version": STATE_VERSION, "n_cases": 2}
    assert check_plan(journal, "abc", 2) is None
    assert check_plan(journal, "def", 2) == "holds a build with a different config or input list"
    (journal.dir / "plan.json").write_text(json.dumps({"plan_hash": "abc", "version": STATE_VERSION - 1}))
    assert check_plan(journal, "abc", 2) == "holds a partial build made by an older version of this builder"


def test_lost_staging_file_sends_its_case_back(build):
    """After an OS crash a staging file the journal lists can be short or missing: its case is curated again. Once the
    build is complete (staging deleted on purpose) nothing is lost."""
    _, _, out = build
    journal = Journal(out)
    records = {r["case"]: r for r in journal.read("volumes.jsonl")}
    assert lost_staging(journal) == set()
    spleen = records["folder/msd_spleen_sub-spleen2_ct"]["volumes"][0]
    path = journal.staging / spleen["staging"]
    path.write_bytes(path.read_bytes()[:1000])
    assert lost_staging(journal) == {"folder/msd_spleen_sub-spleen2_ct"}
    journal.complete.write_text("packed\n")
    assert lost_staging(journal) == set()


def test_damaged_shards_name_their_group(build):
    """A packed shard deleted or cut short afterwards is found by its recorded size, with the group to pack again."""
    settings, _, out = build
    journal = Journal(out)
    kept = [v for r in journal.read("volumes.jsonl") for v in r["volumes"]]
    groups = volume_groups(kept, settings.seed, 1)  # one volume per group: two groups
    pack(groups, settings.seed, 40, out, journal, progress=False)
    assert damaged_shards(out, journal) == {}
    recorded = {s["shard"]: g["group"] for g in journal.read("groups.jsonl") for s in g["shards"]}
    first, last = sorted(recorded)[0], sorted(recorded)[-1]
    (out / first).unlink()
    (out / last).write_bytes((out / last).read_bytes()[:5000])
    assert damaged_shards(out, journal) == {first: recorded[first], last: recorded[last]}


def test_colliding_volume_ids_keep_the_first(tmp_path):
    """Two cases whose volumes got one id (``a.b`` and ``a_b`` both sanitise to ``a_b``): the first in case order keeps
    it, the other is a failure of its case -- and the journal's own records stay as read."""
    journal = Journal(tmp_path)
    cases = [Case("a_b", Path("a_b.nii"), source="folder"), Case("a_b2", Path("a.b.nii"), source="folder")]
    vol = {"uid": "folder/a_b", "n_slices": 3}
    journal.append("volumes.jsonl", {"case": "folder/a_b2", "volumes": [vol], "rejections": []})
    journal.append("volumes.jsonl", {"case": "folder/a_b", "volumes": [vol], "rejections": []})
    first, second = case_records(journal, cases)
    assert first["case"] == "folder/a_b" and first["volumes"] == [vol] and first["rejections"] == []
    assert second["volumes"] == [] and [r["reason"] for r in second["rejections"]] == ["case_id_collision"]
    assert all(r["volumes"] == [vol] for r in journal.read("volumes.jsonl"))
