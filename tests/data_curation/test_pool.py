"""Stage 2's scheduling on the embedded real CT: cases curated in this process and in a worker pool give the same
journal records, a rerun skips the cases already done, workers can tell when the builder is gone."""
from __future__ import annotations

from pathlib import Path
import os
import subprocess
import sys
import time
from dataclasses import replace

from data_curation.journal import Journal
from data_curation.pool import crash_record, curate, largest_first, pool_context, process_alive
from meddino_datasets.case import Case


def _without_timings(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if not k.endswith("seconds")} for r in records), key=lambda r: r["case"])


def test_largest_cases_first(sample_ct, tmp_path):
    """Estimated input bytes (first file x number of files): the 20-file DICOM series before the single NIfTI files, the
    bigger NIfTI before the smaller, a missing file last; stable for equal sizes."""
    dicom = tuple(sorted(str(p) for p in (sample_ct / "totalsegmentator_dicom" / "example_ct_dicom").iterdir()))
    spleen = Case("spleen", sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz", source="folder")
    ts = Case("ts", sample_ct / "totalsegmentator" / "example_ct.nii.gz", source="folder")
    series = Case("series", Path(dicom[0]).parent, source="folder", kind="dicom", dicom_files=tuple(dicom))
    gone = Case("gone", tmp_path / "gone.nii.gz", source="folder")
    sizes = {c.case_id: os.path.getsize(c.paths[0]) * len(c.paths) for c in (spleen, ts, series)}
    want = [c for c in sorted((spleen, ts, series), key=lambda c: -sizes[c.case_id])] + [gone]
    assert largest_first([gone, spleen, ts, series]) == want


def test_pool_and_in_process_curation_agree_and_a_rerun_skips_done_cases(curated_sample, tmp_path):
    """Two worker processes curate the sample into the same records and staging bytes as ``--workers 0``; a second
    call finds every case done and changes nothing; a half-written staging file of a killed worker is removed."""
    settings, cases, reference = curated_sample
    out = tmp_path / "pool"
    journal = Journal(out)
    curate(cases, replace(settings, run=replace(settings.run, workers=2)), journal, progress=False)
    records, ref = Journal(out).read("volumes.jsonl"), Journal(reference).read("volumes.jsonl")
    assert _without_timings(records) == _without_timings(ref) and len(records) == 2
    for name in (v["staging"] for r in ref for v in r["volumes"]):
        assert (journal.staging / name).read_bytes() == (reference / ".state" / "staging" / name).read_bytes()
    stale = journal.staging / ".folder-x.samples.tmp-k1.part"
    stale.write_bytes(b"half")
    before = (journal.dir / "volumes.jsonl").read_bytes()
    curate(cases, settings, journal, progress=False)
    assert (journal.dir / "volumes.jsonl").read_bytes() == before and not stale.exists()


def test_a_dead_or_zombie_builder_is_gone():
    """Workers poll the builder's pid: running is alive; exited but not yet reaped (zombie) and reaped are gone."""
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    t0 = time.time()
    while process_alive(child.pid) and time.time() - t0 < 30:
        time.sleep(0.02)
    assert not process_alive(child.pid)  # a zombie until waited for
    child.wait()
    assert not process_alive(child.pid)


def test_crash_record_and_pool_context():
    case = Case("x", Path("/data/x.nii.gz"), source="folder")
    rec = crash_record(case, "the worker died")
    assert rec["case"] == "folder/x" and rec["volumes"] == []
    assert rec["rejections"] == [{"file": "/data/x.nii.gz", "reason": "worker_crashed", "detail": "the worker died", "filtered": False}]
    assert pool_context().get_start_method() == ("forkserver" if sys.platform == "linux" else "spawn")

