"""Stage 4 on the embedded real CT: the reports agree with the shards they describe (manifest rows, shards.csv
sizes and SHA-256), failures and filtered inputs go to their own files, stats count per source, and the summary
table prints the totals."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil

from data_curation.journal import Journal, case_records
from data_curation.pack import pack, volume_groups
from data_curation.reports import print_summary, write_reports
from data_curation.shards import SHARD_INDEX


def test_reports_describe_the_build(curated_sample, tmp_path):
    settings, cases, src = curated_sample
    out = tmp_path / "out"
    shutil.copytree(src, out)
    journal = Journal(out)
    records = case_records(journal, cases)
    kept = [v for r in records for v in r["volumes"]]
    groups = volume_groups(kept, settings.seed, settings.output.volumes_per_group)
    pack(groups, settings.seed, 40, out, journal, progress=False)
    bad = {"source": "btcv", "case": "", "file": "/data/btcv", "reason": "no_case_found", "detail": "no case", "filtered": True}
    failed = dict(records[0], rejections=[{"file": "x.nii.gz", "reason": "unreadable", "detail": "cut", "filtered": False}])
    duplicates = [{"dropped": "folder/y", "kept": "ctorg/z", "mean_abs_diff_hu": 0.2, "reason": "same scan"}]
    stats, n_failed = write_reports(out, settings, journal, cases, [failed, *records[1:]], duplicates, ["folder/held"],
                                    len(groups), [bad])
    n_samples = sum(v["n_slices"] for v in kept)
    with open(out / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_samples == stats["n_samples"] and len({r["key"] for r in rows}) == n_samples
    with open(out / SHARD_INDEX) as fh:
        index = list(csv.DictReader(fh))
    assert [r["shard"] for r in index] == sorted(p.name for p in out.glob("ct3m-*.tar")) and len(index) == stats["n_shards"]
    for r in index:
        data = (out / r["shard"]).read_bytes()
        assert int(r["bytes"]) == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(r["n_samples"]) == sum(1 for row in rows if row["shard"] == r["shard"])
    assert n_failed == 1 == stats["n_failures"]
    assert [json.loads(line)["reason"] for line in (out / "failures.jsonl").read_text().splitlines()] == ["unreadable"]
    assert [json.loads(line)["source"] for line in (out / "rejections.jsonl").read_text().splitlines()] == ["btcv"]
    assert (out / "duplicates.csv").read_text() == "dropped,kept,mean_abs_diff_hu,reason\nfolder/y,ctorg/z,0.2,same scan\n"
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    folder = stats["per_source"]["folder"]
    assert folder["cases"] == 2 and folder["volumes"] == 2 and folder["failed"] == 1 and folder["slices"] == n_samples
    assert stats["per_source"]["btcv"]["filtered"] == 1 and stats["excluded_cases"] == ["folder/held"]
    assert sum(stats["hu_histogram"]["counts"]) == n_samples * 64 * 64
    assert stats["geometry"]["output_size"] == [256, 256] and stats["image_format"] == "npy"
    printed = io.StringIO()
    print_summary(stats, printed)
    total = [line.split() for line in printed.getvalue().splitlines() if line.strip().startswith("TOTAL")][0]
    assert total[:7] == ["TOTAL", "2", "2", str(n_samples), "1", "1", "1"]
    assert "rejections: no_case_found=1, unreadable=1" in printed.getvalue()
