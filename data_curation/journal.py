"""The build's journal under ``OUT/.state``: what is durable, so that a rerun after a crash or ``kill -9`` continues
where the last run stopped and produces the same bytes.

- ``plan.json``: the plan hash (config + case list) and :data:`STATE_VERSION`; a rerun with another plan is refused;
- ``volumes.jsonl``: one line per curated case, appended (fsync) only after its staging file is complete -- that line
  makes a case "done";
- ``groups.jsonl``: one line per packed group, appended only after all its shards are durable;
- ``staging/``: the workers' encoded samples per volume, deleted once packed; ``manifest_parts/``: manifest rows per
  group.

A kill can leave a torn last JSONL line (dropped on the next start), a half-written temporary file (removed), a
staging file shorter than recorded after an OS crash (:func:`lost_staging`) or a shard deleted/cut later
(:func:`damaged_shards`); each sends its case or group through its stage again.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from data_curation.settings import CurationSettings
from meddino_datasets.case import Case
from meddino_common.atomic import atomic_write_text, remove_stale_temporaries

STATE_VERSION = 3  # 2: staging files hold encoded samples (.samples), not .npy stacks; 3: source_path, short keys


class Journal:
    """Append-only JSONL files under ``out/.state``; a line is written (and fsynced) only after its work is durable.

    One builder process owns an output directory, so each file is parsed once and then kept in memory (``append``
    and ``rewrite`` keep the copy current). Callers must not modify the records ``read`` returns."""

    def __init__(self, out: Path) -> None:
        self.dir = out / ".state"
        self.staging = self.dir / "staging"
        self.parts = self.dir / "manifest_parts"
        for d in (self.dir, self.staging, self.parts):
            d.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(d)  # atomic writes a killed run left half-done
        self._records: dict[str, list[dict]] = {}
        self._lock = threading.Lock()  # pack threads append to groups.jsonl

    def read(self, name: str) -> list[dict]:
        if name not in self._records:
            records = []
            path = self.dir / name
            if path.exists():
                with open(path) as fh:
                    for line in fh:
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError:  # torn last line from a kill: that record was never committed
                            break
            self._records[name] = records
        return list(self._records[name])

    def append(self, name: str, record: dict) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            records = self.read(name)
            with open(self.dir / name, "a") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._records[name] = records + [record]

    def rewrite(self, name: str, records: list[dict]) -> None:
        """Atomically replace a JSONL file with ``records``."""
        atomic_write_text(self.dir / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._records[name] = list(records)

    def truncate_torn(self, name: str) -> None:
        """Rewrite a JSONL file with only its complete lines (a kill can leave a partial last line)."""
        if (self.dir / name).exists():
            self.rewrite(name, self.read(name))

    @property
    def complete(self) -> Path:
        """Marker written once every group is packed (staging files are deleted after it)."""
        return self.dir / "complete"


def plan_hash(settings: CurationSettings, cases: list[Case]) -> str:
    """SHA-256 of the merged config (without ``run``, which changes no output, and the source roots, which may move)
    and of the case list: what a resumed build must share with the build it continues."""
    frozen = {k: v for k, v in settings.config.items() if k not in ("run",)}
    frozen = json.loads(json.dumps(frozen, sort_keys=True, default=str))
    for name in frozen["sources"]:
        frozen["sources"][name] = {k: v for k, v in (frozen["sources"][name] or {}).items() if k != "root"}
    h = hashlib.sha256(json.dumps(frozen, sort_keys=True).encode())
    for c in cases:
        h.update(f"{c.uid}|{c.kind}|{len(c.paths)}\n".encode())
    return h.hexdigest()


def check_plan(journal: Journal, digest: str, n_cases: int) -> str | None:
    """Record the plan of a new build, or compare it with the recorded one -> None, or why ``out`` cannot be resumed."""
    plan_file = journal.dir / "plan.json"
    if not plan_file.exists():
        atomic_write_text(plan_file, json.dumps({"plan_hash": digest, "version": STATE_VERSION, "n_cases": n_cases}) + "\n")
        return None
    previous = json.loads(plan_file.read_text())
    if previous.get("version") != STATE_VERSION:
        return "holds a partial build made by an older version of this builder"
    if previous.get("plan_hash") != digest:
        return "holds a build with a different config or input list"
    return None


def lost_staging(journal: Journal) -> set[str]:
    """Cases recorded as done whose staging file (not yet packed) is missing or shorter than its recorded content."""
    if journal.complete.exists():  # staging files are deleted once the build has finished
        return set()
    packed = {uid for g in journal.read("groups.jsonl") for uid in g["volumes"]}
    lost = set()
    for rec in journal.read("volumes.jsonl"):
        for v in rec["volumes"]:
            if v["uid"] in packed or v["n_slices"] == 0:
                continue
            path = journal.staging / v["staging"]
            try:
                ok = path.stat().st_size == v["staging_bytes"]
            except OSError:
                ok = False
            if not ok:
                lost.add(rec["case"])
    return lost


def damaged_shards(out: Path, journal: Journal) -> dict[str, int]:
    """Shards of packed groups that are missing or not of their recorded size -> their group. A size check (a stat
    per shard) on every run; the loader checks the SHA-256 of each shard it reads."""
    damaged = {}
    for g in journal.read("groups.jsonl"):
        for shard in g["shards"]:
            try:
                ok = (out / shard["shard"]).stat().st_size == shard["bytes"]
            except OSError:
                ok = False
            if not ok:
                damaged[shard["shard"]] = g["group"]
    return damaged


def case_records(journal: Journal, cases: list[Case]) -> list[dict]:
    """Finished-case records in case order; volume ids that collide after sanitising (``a.b`` vs ``a_b``) keep the
    first and report the others as failures."""
    by_case = {r["case"]: r for r in journal.read("volumes.jsonl")}
    records = [dict(by_case[c.uid]) for c in cases if c.uid in by_case]  # copies: the journal's records stay as read
    seen: set[str] = set()
    for r in records:
        for v in list(r["volumes"]):
            if v["uid"] in seen:
                r["volumes"] = [x for x in r["volumes"] if x is not v]
                r["rejections"] = r["rejections"] + [{"file": r["case"], "reason": "case_id_collision", "filtered": False,
                                                      "detail": f"another volume already has the id {v['uid']}; rename one of the inputs"}]
            seen.add(v["uid"])
    return records
