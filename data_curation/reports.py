"""Stage 4, reports: what a finished build says about itself, next to its shards.

``manifest.csv`` (one row per sample: key, shard, source, case, slice index, source path), ``shards.csv`` (per shard:
samples, bytes, SHA-256 -- the training loader verifies each shard against it), ``failures.jsonl`` (bad input),
``rejections.jsonl`` (filtered by design), ``duplicates.csv`` and ``stats.json`` (counts per source, HU histogram),
each written atomically; and the summary table printed at the end of a build.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from data_curation.journal import STATE_VERSION, Journal
from data_curation.settings import CurationSettings
from data_curation.shards import SHARD_INDEX
from meddino_datasets.case import Case
from meddino_common.atomic import atomic_write_json, atomic_write_text


def write_reports(out: Path, settings: CurationSettings, journal: Journal, cases: list[Case], records: list[dict], duplicates: list[dict],
                  excluded: list[str], n_groups: int, discovery: Sequence[dict] = ()) -> tuple[dict, int]:
    """manifest.csv, shards.csv, failures.jsonl (bad input), rejections.jsonl, duplicates.csv, stats.json -> (stats,
    number of failures). ``discovery``: what case discovery saw and could not use (unreadable folders and files,
    roots without a case), one rejection dict each, with its ``source``."""
    parts = sorted(journal.parts.glob("group-*.csv"))
    parts = [p for p in parts if int(p.stem.split("-")[1]) < n_groups]
    header = "key,shard,source,case,slice_index,source_path\n"
    atomic_write_text(out / "manifest.csv", header + "".join(p.read_text() for p in parts))
    shard_rows = [s for g in sorted(journal.read("groups.jsonl"), key=lambda g: g["group"]) if g["group"] < n_groups for s in g["shards"]]
    atomic_write_text(out / SHARD_INDEX, "shard,n_samples,bytes,sha256\n"
                      + "".join(f"{s['shard']},{s['n_samples']},{s['bytes']},{s['sha256']}\n" for s in shard_rows))
    failures, rejections = [], []
    dropped = {d["dropped"] for d in duplicates}
    bins = settings.hu_histogram
    edges = np.arange(bins.min, bins.max + bins.bin, bins.bin)
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    per_source: dict[str, dict] = {}
    n_cases = {}
    for c in cases:
        n_cases[c.source] = n_cases.get(c.source, 0) + 1
    found_nothing = [{"source": d["source"], "case": "", "volumes": [], "seconds": 0.0,
                      "rejections": [{k: d[k] for k in ("file", "reason", "detail", "filtered")}]} for d in discovery]
    for rec in [*records, *found_nothing]:
        s = per_source.setdefault(rec["source"], {"cases": n_cases.get(rec["source"], 0), "volumes": 0, "slices": 0, "native_slices": 0,
                                                  "empty_skipped": 0, "subsampled_out": 0, "duplicates_dropped": 0,
                                                  "failed": 0, "filtered": 0, "reasons": {}, "seconds": 0.0})
        s["seconds"] = round(s["seconds"] + rec["seconds"], 3)
        for r in rec["rejections"]:
            entry = dict(r, source=rec["source"], case=rec["case"])
            (rejections if r["filtered"] else failures).append(entry)
            s["filtered" if r["filtered"] else "failed"] += 1
            s["reasons"][r["reason"]] = s["reasons"].get(r["reason"], 0) + 1
        for v in rec["volumes"]:
            if v["uid"] in dropped:
                s["duplicates_dropped"] += 1
                continue
            s["volumes"] += 1
            s["slices"] += v["n_slices"]
            s["native_slices"] += v["n_native_slices"]
            s["empty_skipped"] += v["n_empty_skipped"]
            s["subsampled_out"] += v["n_subsampled_out"]
            hist += np.asarray(v["hu_histogram"], dtype=np.int64)
    atomic_write_text(out / "failures.jsonl", "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
    atomic_write_text(out / "rejections.jsonl", "".join(json.dumps(f, sort_keys=True) + "\n" for f in rejections))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dropped", "kept", "mean_abs_diff_hu", "reason"])
    w.writerows([[d["dropped"], d["kept"], d["mean_abs_diff_hu"], d["reason"]] for d in duplicates])
    atomic_write_text(out / "duplicates.csv", buf.getvalue())
    groups = journal.read("groups.jsonl")
    stats = {
        "version": STATE_VERSION,
        "n_samples": int(sum(s["slices"] for s in per_source.values())),
        "n_shards": int(sum(g["n_shards"] for g in groups if g["group"] < n_groups)),
        "n_volumes": int(sum(s["volumes"] for s in per_source.values())),
        "n_failures": len(failures),
        "n_filtered": len(rejections),
        "n_duplicates_dropped": len(duplicates),
        "n_excluded_cases": len(excluded),
        "excluded_cases": sorted(excluded),
        "image_format": settings.output.image_format,
        "geometry": settings.config["geometry"],  # as configured (plain data)
        "seed": settings.seed,
        "per_source": per_source,
        "hu_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }
    atomic_write_json(out / "stats.json", stats, indent=1, sort_keys=True)
    return stats, len(failures)


def print_summary(stats: dict, file: TextIO | None = None) -> None:
    """The per-source table (cases, volumes, slices, duplicates, filtered, failed, seconds per volume), shard and
    exclusion counts and the rejection reasons, from ``stats.json``'s content."""
    file = file or sys.stdout
    cols = ["source", "cases", "volumes", "slices", "dupes", "filtered", "failed", "s/vol"]
    rows = []
    for name, s in stats["per_source"].items():
        n = max(s["volumes"] + s["duplicates_dropped"], 1)
        rows.append([name, s["cases"], s["volumes"], s["slices"], s["duplicates_dropped"], s["filtered"], s["failed"], f"{s['seconds'] / n:.2f}"])
    rows.append(["TOTAL", sum(r[1] for r in rows), stats["n_volumes"], stats["n_samples"], stats["n_duplicates_dropped"],
                 stats["n_filtered"], stats["n_failures"], ""])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    print(line.format(*cols), file=file)
    for r in rows:
        print(line.format(*r), file=file)
    print(f"{stats['n_shards']} shards, {stats['n_excluded_cases']} cases excluded", file=file)
    reasons: dict[str, int] = {}
    for s in stats["per_source"].values():
        for k, v in s["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    if reasons:
        print("rejections: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), file=file)
