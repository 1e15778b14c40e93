"""Build CT-3M: public CT (NIfTI, DICOM) -> axial-slice webdataset shards + manifest.csv + stats.json.

    python data_curation/build_ct3m.py --out DIR [--config configs/data/ct3m.yaml] [--root NAME=PATH ...]
        [--sources a,b] [--workers N] [--list-sources] [--dry-run] [--exclude LIST] [--holdout-finetune]
        [--allow-failures] [key=value ...]

Stages (state in ``DIR/.state``; a rerun after a crash or ``kill -9`` continues where it stopped and produces the
same samples, byte-identical shards included):

1. discover cases with the source adapters; drop ``--exclude`` / ``--holdout-finetune`` cases;
2. curate every case in a worker process (one volume in memory per worker) into a staging file of finished,
   encoded samples; the finished case is appended to ``volumes.jsonl`` (fsync) -- that line makes a case "done";
3. de-duplicate across sources (fingerprints), order volumes with the seed, cut them into groups of
   ``output.volumes_per_group`` (the shuffle buffer), shuffle each group's samples and copy them (byte ranges of
   the staging files) into its shards (temp name, one fsync per shard, rename); a finished group is appended to
   ``groups.jsonl``;
4. write manifest.csv (one row per sample), shards.csv (per shard: samples, bytes, SHA-256 -- the training loader
   verifies each shard against it), stats.json, failures.jsonl (bad input), rejections.jsonl (filtered by design),
   duplicates.csv; print a summary table. Exit code 1 when any input failed, unless ``--allow-failures``.

This file is the command line; each stage has its module: ``settings`` (the config, parsed once), ``discovery``
(1), ``pool`` and ``process`` (2), ``dedup`` and ``pack`` (3), ``reports`` (4), and ``journal`` (the state that makes
every stage resumable). Run as a file, Python puts ``data_curation/`` first on ``sys.path``; no module here is named
like a standard-library or installed top-level module (``tests/data_curation/test_build_ct3m_cli.py`` checks it), so
the imports below resolve to the installed package either way.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from data_curation.dedup import Fingerprint, find_duplicates
from data_curation.discovery import apply_exclusions, discover, empty_sources, selected_sources
from data_curation.journal import Journal, case_records, check_plan, damaged_shards, lost_staging, plan_hash
from data_curation.pack import pack, volume_groups
from data_curation.pool import curate
from data_curation.reports import print_summary, write_reports
from data_curation.settings import DEFAULT_CONFIG, CurationSettings, load_settings
from data_curation.sources import REGISTRY
from meddino_datasets.case import Case
from meddino_common.atomic import atomic_write_text, remove_stale_temporaries
from meddino_common.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory (shards, manifest.csv, stats.json, state)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="curation config (default: configs/data/ct3m.yaml)")
    p.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="root folder of a source (repeatable)")
    p.add_argument("--sources", help="comma list of sources to run (default: every source whose root exists)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: run.workers in the config; 0 = in this process)")
    p.add_argument("--list-sources", action="store_true", help="print each source, its root and its case count")
    p.add_argument("--dry-run", action="store_true", help="print the plan (cases, estimated slices and bytes), write nothing")
    p.add_argument("--exclude", action="append", default=[], metavar="LIST", help="case list file or comma list (source/case or case)")
    p.add_argument("--holdout-finetune", action="store_true", help="exclude fold-0 validation cases of amos22/btcv/kits23/lits")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even if some inputs failed")
    p.add_argument("--allow-empty", action="store_true", help="build even when a source root yields no case (else an error)")
    p.add_argument("--restart", action="store_true", help="discard the state of a previous build in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. output.samples_per_shard=500")
    return p.parse_args(argv)


def list_sources(settings: CurationSettings) -> None:
    """Each source, its case count (``-``: no root, ``missing``: root not found), root and expected layout."""
    print(f"{'source':<18} {'cases':>6}  root / layout")
    for name, adapter in REGISTRY.items():
        root = settings.source_root(name)
        if root is None:
            n = "-"
        elif not root.exists():
            n = "missing"
        else:
            n = str(len(adapter.find(root, settings.sources[name])))
        print(f"{name:<18} {n:>6}  {root or '(not set)'}  [{adapter.layout}]")


def dry_run(settings: CurationSettings, found: dict[str, list[Case]], cases: list[Case], excluded: list[str]) -> None:
    """The plan per source: cases, estimated slices and bytes (from the NIfTI headers; 512x512 per DICOM file)."""
    import nibabel as nib

    size = settings.geometry.output_size
    print(f"{'source':<18} {'cases':>6} {'est. slices':>12} {'est. GiB':>9}")
    total_slices = total_bytes = 0
    for name in found:
        n_slices = n_bytes = 0
        for c in (c for c in cases if c.source == name):
            if c.kind == "nifti":
                try:
                    shp = nib.load(c.paths[0]).shape
                except Exception:
                    continue
                z, hw = shp[2], (shp[1], shp[0])
            else:
                z, hw = len(c.paths), (512, 512)
            h, w = size if size else hw
            n_slices += z
            n_bytes += z * (h * w * 2 + 1024 + 128)  # image + json + tar headers
        total_slices += n_slices
        total_bytes += n_bytes
        print(f"{name:<18} {sum(1 for c in cases if c.source == name):>6} {n_slices:>12} {n_bytes / 2**30:>9.2f}")
    print(f"{'TOTAL':<18} {len(cases):>6} {total_slices:>12} {total_bytes / 2**30:>9.2f}   ({len(excluded)} cases excluded; "
          "estimate before near-empty slices are skipped)")


class OutputUnusable(Exception):
    """``--out`` cannot hold a build: a file, not writable, or in use by another build."""


def lock_output(out: Path):
    """Create ``out`` if needed and take an exclusive lock on ``out/.lock`` for the whole build (released when the
    returned file is closed or the process ends, ``kill -9`` included): two builds writing one folder would mix
    their state files, so the second is refused."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise OutputUnusable(f"--out {out} is a file; give a folder for the build")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / ".lock", "a+")
    except OSError as err:
        raise OutputUnusable(f"--out {out}: cannot write there ({err.strerror})") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise OutputUnusable(f"--out {out} is being written by another build (pid {holder}); wait for it or use another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    try:
        settings = load_settings(args.config, args.root, args.overrides, args.workers)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    if args.list_sources:
        list_sources(settings)
        return 0
    names = selected_sources(settings, args.sources)
    if not names:
        print("no source has an existing root: set one with --root NAME=PATH (see --list-sources)", file=sys.stderr)
        return 2
    discovered: list[dict] = []
    found = discover(settings, names, discovered)
    empty = empty_sources(settings, found)
    if empty and not args.allow_empty:
        print("error: " + "; ".join(f"{e['source']}={e['file']}: {e['detail']}" for e in empty)
              + ". Fix the root, or pass --allow-empty to build without it", file=sys.stderr)
        return 2
    discovered += empty
    cases, excluded = apply_exclusions(settings, found, names, args.exclude, args.holdout_finetune)
    if args.dry_run:
        dry_run(settings, found, cases, excluded)
        return 0
    if not args.out:
        print("--out is required (except with --list-sources / --dry-run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        lock = lock_output(out)
    except OutputUnusable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return build(args, settings, out, cases, excluded, discovered, t_start)
    except OSError as err:  # output side: disk full, quota, read-only or failing disk (inputs are the workers' job)
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: writing the build in {out} failed: {err.strerror or err}{where}. Nothing is lost: fix the cause "
              "(free space...) and run the same command again to continue", file=sys.stderr)
        return 3
    finally:
        lock.close()


def build(args: argparse.Namespace, settings: CurationSettings, out: Path, cases: list[Case], excluded: list[str], discovery: list[dict],
          t_start: float) -> int:
    """Stages 2-4 into ``out`` (locked by the caller). An ``OSError`` here is the output side failing; every stage is
    resumable, so the caller reports it in one line and a re-run continues."""
    if args.restart and (out / ".state").exists():
        shutil.rmtree(out / ".state")
        for old in out.glob("ct3m-*.tar*"):
            old.unlink()
    journal = Journal(out)
    remove_stale_temporaries(out)  # reports a killed run was writing
    refused = check_plan(journal, plan_hash(settings, cases), len(cases))
    if refused:
        print(f"{out} {refused}; use a new --out or --restart", file=sys.stderr)
        return 2
    journal.truncate_torn("volumes.jsonl")
    journal.truncate_torn("groups.jsonl")
    damaged = damaged_shards(out, journal)
    if damaged:  # their groups are packed again below, from their cases curated again (lost_staging)
        print(f"{len(damaged)} shard(s) missing or changed since they were written ({', '.join(sorted(damaged))}): "
              "building their groups again", file=sys.stderr)
        journal.rewrite("groups.jsonl", [g for g in journal.read("groups.jsonl") if g["group"] not in set(damaged.values())])
        journal.complete.unlink(missing_ok=True)
    progress = not args.no_progress
    t_curate = time.perf_counter()
    curate(cases, settings, journal, progress)

    lost = lost_staging(journal)
    if lost:  # only after an OS crash: state says done but the staging file did not reach the disk
        print(f"{len(lost)} staging file(s) missing or truncated: curating those cases again", file=sys.stderr)
        journal.rewrite("volumes.jsonl", [r for r in journal.read("volumes.jsonl") if r["case"] not in lost])
        curate(cases, settings, journal, progress)
    records = case_records(journal, cases)
    duplicates = []
    if settings.dedup.enabled:
        fps = [Fingerprint.from_dict(v["fingerprint"]) for r in records for v in r["volumes"]]
        duplicates = find_duplicates(fps, list(settings.sources), settings.dedup.max_mean_abs_diff_hu, settings.dedup.extent_rel_tol)
    dropped = {d["dropped"] for d in duplicates}
    kept = [v for r in records for v in r["volumes"] if v["n_slices"] > 0 and v["uid"] not in dropped]
    groups = volume_groups(kept, settings.seed, settings.output.volumes_per_group)
    t_pack = time.perf_counter()
    pack(groups, settings.seed, settings.output.samples_per_shard, out, journal, progress, settings.run.pack_threads)
    t_reports = time.perf_counter()
    atomic_write_text(journal.complete, "packed\n")
    for leftover in journal.staging.glob("*"):
        leftover.unlink()
    stats, n_failed = write_reports(out, settings, journal, cases, records, duplicates, excluded, len(groups), discovery)
    print_summary(stats)
    t_end = time.perf_counter()
    elapsed = t_end - t_start
    print(f"{elapsed:.1f} s this run ({stats['n_samples'] / max(elapsed, 1e-9):.0f} samples/s overall; setup {t_curate - t_start:.2f} s, "
          f"curate {t_pack - t_curate:.2f} s, pack {t_reports - t_pack:.2f} s, reports {t_end - t_reports:.2f} s) -> {out}")
    if n_failed:
        print(f"{n_failed} input(s) failed: see {out / 'failures.jsonl'}", file=sys.stderr)
        if not args.allow_failures:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
