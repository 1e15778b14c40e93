"""Stage 3, pack: the kept volumes in seeded order, cut into groups of ``output.volumes_per_group`` (the shuffle
buffer); each group's samples shuffled (seeded by the group) and copied -- byte ranges of the staging files,
in-kernel -- into its shards. Group ``g``'s shards are numbered from a layout fixed by the plan, so groups can be
packed in any order and by several threads, and a rerun produces byte-identical shards.
"""
from __future__ import annotations

import csv
import io
import os
import re
from concurrent.futures import Executor
from pathlib import Path

from data_curation.journal import Journal
from data_curation.shards import SHARD_PATTERN, ShardWriter, sample_key
from meddino_common.atomic import atomic_write_text
from meddino_common.seeding import seeded_rng


def volume_groups(kept: list[dict], seed: int, volumes_per_group: int) -> list[list[dict]]:
    """Volume records in seeded order (by uid, then permuted with ``seed``) cut into groups of ``volumes_per_group``
    (the cross-volume shuffle buffer)."""
    ordered = sorted(kept, key=lambda v: v["uid"])
    perm = seeded_rng(seed).permutation(len(ordered))
    ordered = [ordered[i] for i in perm]
    size = max(1, volumes_per_group)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def remove_shards_from(out: Path, first: int) -> None:
    """Delete shards (complete or temp) numbered ``first`` or higher: leftovers beyond the end of this build."""
    for path in out.glob("ct3m-*.tar*"):
        m = re.fullmatch(r"ct3m-(\d+)\.tar(\.tmp)?", path.name)
        if m and int(m.group(1)) >= first:
            path.unlink()


def shard_layout(groups: list[list[dict]], per_shard: int) -> list[tuple[int, int]]:
    """(first shard, number of shards) of every group: fixed by the plan, so groups can be packed in any order."""
    layout, first = [], 0
    for vols in groups:
        n_shards = -(-sum(v["n_slices"] for v in vols) // per_shard)
        layout.append((first, n_shards))
        first += n_shards
    return layout


def pack_group(g: int, vols: list[dict], first_shard: int, seed: int, per_shard: int, out: Path, journal: Journal,
               closer: Executor) -> None:
    """One group: its samples in seeded shuffled order (key ``(seed, g)``), copied (byte ranges of the staging files,
    in-kernel) into shards ``first_shard, ...`` of ``per_shard`` samples; each shard is fsynced once and renamed when
    complete (``closer`` threads, overlapping the next shard's copy); the group is recorded only when all its shards
    are durable."""
    items = [(vi, si) for vi, v in enumerate(vols) for si in range(v["n_slices"])]
    for i in range(first_shard, first_shard + -(-len(items) // per_shard)):  # leftovers of an interrupted attempt
        (out / (SHARD_PATTERN % i)).unlink(missing_ok=True)
        (out / f"{SHARD_PATTERN % i}.tmp").unlink(missing_ok=True)
    order = seeded_rng(seed, g).permutation(len(items))
    fds = [os.open(journal.staging / v["staging"], os.O_RDONLY) for v in vols]
    rows, closing = [], []
    try:
        for k, s0 in enumerate(range(0, len(order), per_shard)):
            shard_name = SHARD_PATTERN % (first_shard + k)
            writer = ShardWriter(out / shard_name)
            try:
                for idx in order[s0:s0 + per_shard]:
                    vi, si = items[idx]
                    v = vols[vi]
                    slice_index, offset, size = v["slices"][si]
                    writer.copy_blob(fds[vi], offset, size)
                    rows.append((sample_key(v["source"], v["case"], slice_index), shard_name, v["source"], v["case"], slice_index,
                                 v["source_path"]))
            except BaseException:
                writer.abort()
                raise
            closing.append(closer.submit(writer.close))
        shards = [fut.result() for fut in closing]  # every shard of the group is durable before the group is recorded
    finally:
        for fd in fds:
            os.close(fd)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    atomic_write_text(journal.parts / f"group-{g:06d}.csv", buf.getvalue())
    journal.append("groups.jsonl", {"group": g, "first_shard": first_shard, "n_shards": len(closing), "n_samples": len(rows),
                                    "volumes": [v["uid"] for v in vols], "shards": shards})
    for v in vols:
        (journal.staging / v["staging"]).unlink(missing_ok=True)


def pack(groups: list[list[dict]], seed: int, per_shard: int, out: Path, journal: Journal, progress: bool, threads: int = 1) -> None:
    """Stage 3: every group not yet recorded is packed (:func:`pack_group`), ``threads`` groups at a time (the work
    is in-kernel copies and fsyncs, which release the GIL); shards beyond the last group's are deleted. Samples are
    already encoded by the workers."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    done = {r["group"] for r in journal.read("groups.jsonl")}
    layout = shard_layout(groups, per_shard)
    todo = [g for g in range(len(groups)) if g not in done]
    threads = max(1, min(threads, len(todo)))
    with ThreadPoolExecutor(threads) as packers, ThreadPoolExecutor(threads + 1) as closer, \
            tqdm(total=len(groups), initial=len(groups) - len(todo), desc="pack", unit="group", disable=not progress, dynamic_ncols=True) as bar:
        futures = [packers.submit(pack_group, g, groups[g], layout[g][0], seed, per_shard, out, journal, closer) for g in todo]
        for fut in as_completed(futures):
            fut.result()
            bar.update(1)
    remove_shards_from(out, sum(n for _, n in layout))
