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
"""
from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a script: use the package (pip install -e .), not the sibling modules of this file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from omegaconf import OmegaConf

from data_curation.dedup import Fingerprint, find_duplicates
from data_curation.shards import SHARD_INDEX, SHARD_PATTERN, ShardWriter, atomic_write_text, sample_key
from data_curation.sources import REGISTRY
from data_curation.sources.base import collect_problems, with_source_path
from data_curation.strict_config import strict_merge
from meddino_datasets.case import Case

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "data" / "ct3m.yaml"
STATE_VERSION = 3  # 2: staging files hold encoded samples (.samples), not .npy stacks; 3: source_path, short keys


# ----------------------------------------------------------------------------------------------- configuration
def load_config(path: str | Path, roots: list[str] | None = None, dotlist: list[str] | None = None) -> dict:
    """Shipped defaults <- ``--config`` file <- ``key=value`` overrides (strict: an unknown key or a wrong type is an
    error naming it) + ``--root NAME=PATH`` -> plain dict."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config {path}: file not found")
    parts = [] if path.resolve() == DEFAULT_CONFIG.resolve() else [(str(path), OmegaConf.load(path))]
    try:
        cfg = strict_merge(OmegaConf.load(DEFAULT_CONFIG), *parts, ("command line", OmegaConf.from_dotlist(list(dotlist or []))))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = OmegaConf.to_container(cfg, resolve=True)
    for item in roots or []:
        if "=" not in item:
            raise SystemExit(f"--root expects NAME=PATH, got {item!r}")
        name, path_ = item.split("=", 1)
        if name not in REGISTRY:
            near = difflib.get_close_matches(name, list(REGISTRY), n=1)
            raise SystemExit(f"--root {item}: unknown source {name!r}" + (f"; did you mean {near[0]}?" if near else "")
                             + f" (known: {', '.join(REGISTRY)})")
        out["sources"].setdefault(name, {})["root"] = path_
    hist = out["stats"]["hu_histogram"]
    if (int(hist["max"]) - int(hist["min"])) % int(hist["bin"]):
        raise SystemExit(f"stats.hu_histogram: max - min ({hist['max']} - {hist['min']}) must be a multiple of bin ({hist['bin']})")
    return out


def source_root(cfg: dict, name: str) -> Path | None:
    root = (cfg["sources"].get(name) or {}).get("root")
    return Path(root).expanduser() if root else None


def discover(cfg: dict, names: list[str], problems: list[dict] | None = None) -> dict[str, list[Case]]:
    """Cases of each source in ``names`` (sources without a root are skipped); folders and files that were seen but
    could not be read are appended to ``problems`` (failure records with ``source`` set)."""
    found = {}
    for name in names:
        root = source_root(cfg, name)
        if root is None or not root.exists():
            continue
        with collect_problems() as seen:
            found[name] = [with_source_path(c, root) for c in REGISTRY[name].find(root, cfg["sources"].get(name) or {})]
        if problems is not None:
            problems.extend(dict(p, source=name, case="") for p in seen)
    return found


def empty_sources(cfg: dict, found: dict[str, list[Case]]) -> list[dict]:
    """A ``no_case_found`` record per source whose root yielded no case (wrong folder, or not the owners' layout)."""
    return [{"source": name, "case": "", "file": str(source_root(cfg, name)), "reason": "no_case_found", "filtered": True,
             "detail": f"no case found (expected layout: {REGISTRY[name].layout})"} for name, cases in found.items() if not cases]


def selected_sources(cfg: dict, arg: str | None) -> list[str]:
    """Sources to build: ``--sources`` or every source with a root. A root that is set but does not exist is an
    error (a mistyped path must not quietly build without that dataset)."""
    missing = [f"{n}={source_root(cfg, n)}" for n in REGISTRY if source_root(cfg, n) and not source_root(cfg, n).is_dir()]
    if missing:
        raise SystemExit(f"source root(s) not found or not a folder: {', '.join(missing)}; fix --root NAME=PATH or the config")
    if arg:
        names = [s.strip() for s in arg.split(",") if s.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise SystemExit(f"--sources: unknown source(s) {unknown}; known: {', '.join(REGISTRY)}")
        unset = [n for n in names if not source_root(cfg, n)]
        if unset:
            raise SystemExit(f"--sources: no root for {unset}; set it with --root NAME=PATH or in the config")
        return names
    return [n for n in REGISTRY if source_root(cfg, n)]


# ----------------------------------------------------------------------------------------------- leakage control
def read_exclusions(items: list[str]) -> set[str]:
    """``--exclude`` values: files with one case per line, or comma lists; entries ``source/case`` or ``case``."""
    out: set[str] = set()
    for item in items or []:
        entries = Path(item).read_text().split() if Path(item).is_file() else item.split(",")
        out.update(e.strip() for e in entries if e.strip() and not e.strip().startswith("#"))
    return out


def holdout_cases(cfg: dict, found: dict[str, list[Case]]) -> dict[str, list[str]]:
    """Fold-``holdout.fold`` validation cases of each finetune task -> their uids here.

    The split is the finetune package's own: ``finetune.splits.fold_split`` over the ids the finetune task gives the
    cases it trains and validates on (each adapter's ``finetune_case_id``: e.g. LiTS ``volume-7`` is ``train_7``
    there). The naming matters -- the nnU-Net split sorts the ids -- so the split is computed on the finetune ids and
    mapped back, never on this package's case names."""
    from meddino_datasets.splits import fold_split

    held: dict[str, list[str]] = {}
    for task, source in cfg["holdout"]["tasks"].items():
        to_finetune = REGISTRY[source].finetune_case_id
        if to_finetune is None:
            raise SystemExit(f"holdout.tasks.{task}: source {source} has no finetune case-id rule (finetune_case_id)")
        by_id: dict[str, Case] = {}
        for case in found.get(source, []):
            fid = to_finetune(case)
            if fid is not None:
                by_id[fid] = case
        if len(by_id) < 5:
            continue
        _, val = fold_split(sorted(by_id), fold=int(cfg["holdout"]["fold"]))
        held[task] = [by_id[f].uid for f in val]
    return held


def is_excluded(case: Case, excluded: set[str]) -> bool:
    return case.uid in excluded or case.case_id in excluded


def apply_exclusions(cfg: dict, found: dict[str, list[Case]], names: list[str], exclude: list[str], holdout: bool) -> tuple[list[Case], list[str]]:
    """-> (cases to build, uids excluded by ``--exclude`` lists and the ``--holdout-finetune`` split)."""
    excluded_ids = read_exclusions(exclude)
    if holdout:
        held = holdout_cases(cfg, found)
        for task, source in cfg["holdout"]["tasks"].items():
            if task in held:
                excluded_ids.update(held[task])
                print(f"holdout: {task}: {len(held[task])} fold-{cfg['holdout']['fold']} validation cases excluded", file=sys.stderr)
            else:
                print(f"holdout: {task}: source {source} not in this run (or < 5 labelled cases), nothing to exclude", file=sys.stderr)
    all_cases = [c for name in names for c in found.get(name, [])]
    cases = [c for c in all_cases if not is_excluded(c, excluded_ids)]
    return cases, sorted(c.uid for c in all_cases if is_excluded(c, excluded_ids))


# ----------------------------------------------------------------------------------------------- state
class State:
    """Append-only JSONL state under ``out/.state``; a line is written (and fsynced) only after its work is durable.

    One builder process owns an output directory, so each file is parsed once and then kept in memory (``append``
    and ``rewrite`` keep the copy current). Callers must not modify the records ``read`` returns."""

    def __init__(self, out: Path) -> None:
        self.dir = out / ".state"
        self.staging = self.dir / "staging"
        self.parts = self.dir / "manifest_parts"
        for d in (self.dir, self.staging, self.parts):
            d.mkdir(parents=True, exist_ok=True)
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


def plan_hash(cfg: dict, cases: list[Case]) -> str:
    frozen = {k: v for k, v in cfg.items() if k not in ("run",)}
    frozen = json.loads(json.dumps(frozen, sort_keys=True, default=str))
    for name in frozen.get("sources", {}):
        frozen["sources"][name] = {k: v for k, v in (frozen["sources"][name] or {}).items() if k != "root"}
    h = hashlib.sha256(json.dumps(frozen, sort_keys=True).encode())
    for c in cases:
        h.update(f"{c.uid}|{c.kind}|{len(c.paths)}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- stage 2: curate
_WORKER_CFG: dict = {}


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie -- killed, not yet reaped -- counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no procfs: os.kill said it exists
        return True


def _exit_with_builder(builder_pid: int, poll_s: float) -> None:
    """Daemon thread of a worker: end the worker when the builder process is gone (``kill -9``, OOM kill). Pool
    workers are children of the forkserver, not of the builder, and would otherwise wait forever for work."""
    def watch() -> None:
        while _process_alive(builder_pid):
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-builder", daemon=True).start()


def tune_malloc(run_cfg: dict) -> bool:
    """glibc only: keep freed memory in the worker's heap for the next slice instead of handing it back to the OS.

    A worker allocates and frees several 0.1-0.5 MB arrays per slice (decoded pixels, HU, resampled slice, sample
    bytes). With glibc's defaults each of those is a fresh ``mmap`` (or a heap top trimmed after every free), so
    every slice pays page faults on memory it just released (measured on a real uncompressed 512x512x20 series: the
    HU conversion 9.4 -> 2.9 ms, the series assembly 4.0 -> 2.1 ms with these settings). Arrays of ``run.malloc_mmap_threshold_mb`` or more (whole volumes) still come from and go back to the
    OS, so a worker keeps at most about ``run.malloc_trim_threshold_mb`` of free heap on top of what it uses.
    Returns whether the settings were applied (False on other C libraries, or when the config leaves them null)."""
    import ctypes
    import platform

    mmap_mb, trim_mb = run_cfg.get("malloc_mmap_threshold_mb"), run_cfg.get("malloc_trim_threshold_mb")
    if mmap_mb is None or trim_mb is None or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from glibc's <malloc.h>
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(m_mmap_threshold, int(mmap_mb * 2**20)) == 1
    return libc.mallopt(m_trim_threshold, int(trim_mb * 2**20)) == 1 and ok


def _init_worker(cfg: dict, staging: str, builder_pid: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    tune_malloc(cfg["run"])
    _WORKER_CFG["cfg"] = cfg
    _WORKER_CFG["staging"] = staging
    if builder_pid is not None and builder_pid != os.getpid():
        _exit_with_builder(builder_pid, float(cfg["run"]["orphan_poll_seconds"]))


def _work(case: Case) -> dict:
    from data_curation.process import process_case  # imports torch: only where volumes are processed

    if os.environ.get("CT3M_FAULT_INJECT_CASE") == case.uid:  # fault injection for the crash-isolation test
        os._exit(137)
    return process_case(case, _WORKER_CFG["cfg"], _WORKER_CFG["staging"])


def _pool_context():
    """forkserver: torch is imported once in the server and workers fork from it (cheap start, and safe: the server
    never ran parallel torch work); spawn where forkserver does not exist. The builder module is preloaded too: a
    new worker re-imports the main script, which then finds its imports (omegaconf...) already loaded -- 0.02 s
    instead of 0.3 s per worker start, measured."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_curation.process", "data_curation.build_ct3m"])
        return ctx
    return mp.get_context("spawn")


def _crash_record(case: Case, detail: str) -> dict:
    return {"case": case.uid, "source": case.source, "volumes": [], "seconds": 0.0, "read_seconds": 0.0, "cpu_seconds": 0.0,
            "rejections": [{"file": case.paths[0] if case.paths else case.uid, "reason": "worker_crashed", "detail": detail, "filtered": False}]}


def _run_pool(cases: list[Case], cfg: dict, staging: str, workers: int, record) -> None:
    """Curate ``cases`` in worker processes. A case that kills its worker (decoder segfault, OOM kill) is found by
    re-running the cases that were in flight one at a time, and is recorded as ``worker_crashed``; the rest go on."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = _pool_context()
    max_tasks = int(cfg["run"]["maxtasksperchild"])

    def run(batch: list[Case], n_workers: int) -> tuple[list[Case], list[Case]]:
        """-> (cases in flight when the pool broke, cases never submitted)."""
        queue = list(batch)
        with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, staging, os.getpid()),
                                 max_tasks_per_child=max_tasks) as ex:
            futures: dict = {}
            while queue and len(futures) < 2 * n_workers:
                c = queue.pop(0)
                futures[ex.submit(_work, c)] = c
            lost: list[Case] = []
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    case = futures.pop(fut)
                    try:
                        record(fut.result())
                    except BrokenProcessPool:
                        lost.append(case)
                        continue
                    if queue and not lost:
                        c = queue.pop(0)
                        futures[ex.submit(_work, c)] = c
        return lost, queue

    remaining = list(cases)
    while remaining:
        lost, remaining = run(remaining, workers)
        for case in lost:  # one at a time: the culprit breaks its own pool
            culprit, _ = run([case], 1)
            if culprit:
                record(_crash_record(case, "the worker process died while curating this case (segfault in a decoder or out of memory)"))


def largest_first(cases: list[Case]) -> list[Case]:
    """Cases by estimated input bytes (first file x number of files), largest first, stable: the pool ends with small
    cases instead of one worker finishing a big volume alone. Only the processing order changes, not the outputs."""
    def size(case: Case) -> int:
        try:
            return os.path.getsize(case.paths[0]) * len(case.paths) if case.paths else 0
        except OSError:
            return 0

    return sorted(cases, key=size, reverse=True)


def curate(cases: list[Case], cfg: dict, state: State, workers: int, progress: bool) -> None:
    """Stage 2. ``workers`` >= 1: process pool; 0: in this process (debugging)."""
    done = {r["case"] for r in state.read("volumes.jsonl")}
    pending = largest_first([c for c in cases if c.uid not in done])
    for tmp in state.staging.glob("*.tmp"):
        tmp.unlink()
    if not pending:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(cases), initial=len(cases) - len(pending), unit="vol", desc="curate", disable=not progress, dynamic_ncols=True)
    n_slices, t0 = 0, time.perf_counter()

    def record(result: dict) -> None:
        nonlocal n_slices
        state.append("volumes.jsonl", result)
        n_slices += sum(v["n_slices"] for v in result["volumes"])
        bar.update(1)
        bar.set_postfix(slices=n_slices, slices_per_s=f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f}")

    try:
        if workers <= 0:
            _init_worker(cfg, str(state.staging))
            for case in pending:
                record(_work(case))
        else:
            _run_pool(pending, cfg, str(state.staging), workers, record)
    finally:
        bar.close()


def lost_staging(state: State, cases: list[Case]) -> set[str]:
    """Cases recorded as done whose staging file (not yet packed) is missing or shorter than its recorded content."""
    if (state.dir / "complete").exists():  # staging files are deleted once the build has finished
        return set()
    packed = {uid for g in state.read("groups.jsonl") for uid in g["volumes"]}
    lost = set()
    for rec in state.read("volumes.jsonl"):
        for v in rec["volumes"]:
            if v["uid"] in packed or v["n_slices"] == 0:
                continue
            path = state.staging / v["staging"]
            try:
                ok = path.stat().st_size == v["staging_bytes"]
            except OSError:
                ok = False
            if not ok:
                lost.add(rec["case"])
    return lost


def damaged_shards(out: Path, state: State) -> dict[str, int]:
    """Shards of packed groups that are missing or not of their recorded size -> their group. A size check (a stat
    per shard) on every run; the loader checks the SHA-256 of each shard it reads."""
    damaged = {}
    for g in state.read("groups.jsonl"):
        for shard in g.get("shards", []):
            try:
                ok = (out / shard["shard"]).stat().st_size == shard["bytes"]
            except OSError:
                ok = False
            if not ok:
                damaged[shard["shard"]] = g["group"]
    return damaged


def case_records(state: State, cases: list[Case]) -> list[dict]:
    """Finished-case records in case order; volume ids that collide after sanitising (``a.b`` vs ``a_b``) keep the
    first and report the others as failures."""
    by_case = {r["case"]: r for r in state.read("volumes.jsonl")}
    records = [dict(by_case[c.uid]) for c in cases if c.uid in by_case]  # copies: the state's records stay as read
    seen: set[str] = set()
    for r in records:
        for v in list(r["volumes"]):
            if v["uid"] in seen:
                r["volumes"] = [x for x in r["volumes"] if x is not v]
                r["rejections"] = r["rejections"] + [{"file": r["case"], "reason": "case_id_collision", "filtered": False,
                                        "detail": f"another volume already has the id {v['uid']}; rename one of the inputs"}]
            seen.add(v["uid"])
    return records


# ----------------------------------------------------------------------------------------------- stage 3: pack
def volume_groups(kept: list[dict], cfg: dict) -> list[list[dict]]:
    """Seeded volume order cut into groups of ``output.volumes_per_group`` (the cross-volume shuffle buffer)."""
    ordered = sorted(kept, key=lambda v: v["uid"])
    perm = np.random.default_rng(int(cfg["seed"])).permutation(len(ordered))
    ordered = [ordered[i] for i in perm]
    size = max(1, int(cfg["output"]["volumes_per_group"]))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _remove_shards_from(out: Path, first: int) -> None:
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


def pack_group(g: int, vols: list[dict], first_shard: int, cfg: dict, out: Path, state: State, closer) -> None:
    """One group: its samples in seeded shuffled order, copied (byte ranges of the staging files, in-kernel) into
    shards ``first_shard, ...``; each shard is fsynced once and renamed when complete (``closer`` threads, overlapping
    the next shard's copy); the group is recorded only when all its shards are durable."""
    per_shard = int(cfg["output"]["samples_per_shard"])
    items = [(vi, si) for vi, v in enumerate(vols) for si in range(v["n_slices"])]
    for i in range(first_shard, first_shard + -(-len(items) // per_shard)):  # leftovers of an interrupted attempt
        (out / (SHARD_PATTERN % i)).unlink(missing_ok=True)
        (out / f"{SHARD_PATTERN % i}.tmp").unlink(missing_ok=True)
    order = np.random.default_rng([int(cfg["seed"]), g]).permutation(len(items))
    fds = [os.open(state.staging / v["staging"], os.O_RDONLY) for v in vols]
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
    atomic_write_text(state.parts / f"group-{g:06d}.csv", buf.getvalue())
    state.append("groups.jsonl", {"group": g, "first_shard": first_shard, "n_shards": len(closing), "n_samples": len(rows),
                                  "volumes": [v["uid"] for v in vols], "shards": shards})
    for v in vols:
        (state.staging / v["staging"]).unlink(missing_ok=True)


def pack(groups: list[list[dict]], cfg: dict, out: Path, state: State, progress: bool, threads: int = 1) -> None:
    """Stage 3: every group not yet recorded is packed (:func:`pack_group`), ``threads`` groups at a time (the work
    is in-kernel copies and fsyncs, which release the GIL). Samples are already encoded by the workers."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    done = {r["group"] for r in state.read("groups.jsonl")}
    layout = shard_layout(groups, int(cfg["output"]["samples_per_shard"]))
    todo = [g for g in range(len(groups)) if g not in done]
    threads = max(1, min(threads, len(todo)))
    with ThreadPoolExecutor(threads) as packers, ThreadPoolExecutor(threads + 1) as closer, \
            tqdm(total=len(groups), initial=len(groups) - len(todo), desc="pack", unit="group", disable=not progress, dynamic_ncols=True) as bar:
        futures = [packers.submit(pack_group, g, groups[g], layout[g][0], cfg, out, state, closer) for g in todo]
        for fut in as_completed(futures):
            fut.result()
            bar.update(1)
    _remove_shards_from(out, sum(n for _, n in layout))


# ----------------------------------------------------------------------------------------------- stage 4: report
def write_reports(out: Path, cfg: dict, state: State, cases: list[Case], records: list[dict], duplicates: list[dict],
                  excluded: list[str], n_groups: int, discovery: Sequence[dict] = ()) -> tuple[dict, int]:
    """manifest.csv, shards.csv, failures.jsonl (bad input), rejections.jsonl, duplicates.csv, stats.json -> (stats,
    number of failures). ``discovery``: what case discovery saw and could not use (unreadable folders and files,
    roots without a case), one rejection dict each, with its ``source``."""
    parts = sorted(state.parts.glob("group-*.csv"))
    parts = [p for p in parts if int(p.stem.split("-")[1]) < n_groups]
    header = "key,shard,source,case,slice_index,source_path\n"
    atomic_write_text(out / "manifest.csv", header + "".join(p.read_text() for p in parts))
    shard_rows = [s for g in sorted(state.read("groups.jsonl"), key=lambda g: g["group"]) if g["group"] < n_groups for s in g["shards"]]
    atomic_write_text(out / SHARD_INDEX, "shard,n_samples,bytes,sha256\n"
                      + "".join(f"{s['shard']},{s['n_samples']},{s['bytes']},{s['sha256']}\n" for s in shard_rows))
    failures, rejections = [], []
    dropped = {d["dropped"] for d in duplicates}
    hist_cfg = cfg["stats"]["hu_histogram"]
    edges = np.arange(hist_cfg["min"], hist_cfg["max"] + hist_cfg["bin"], hist_cfg["bin"])
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
    groups = state.read("groups.jsonl")
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
        "image_format": cfg["output"]["image_format"],
        "geometry": cfg["geometry"],
        "seed": cfg["seed"],
        "per_source": per_source,
        "hu_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=1, sort_keys=True) + "\n")
    return stats, len(failures)


def print_summary(stats: dict, file=None) -> None:
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


# ----------------------------------------------------------------------------------------------- CLI
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


def list_sources(cfg: dict) -> None:
    print(f"{'source':<18} {'cases':>6}  root / layout")
    for name, adapter in REGISTRY.items():
        root = source_root(cfg, name)
        if root is None:
            n = "-"
        elif not root.exists():
            n = "missing"
        else:
            n = str(len(adapter.find(root, cfg["sources"].get(name) or {})))
        print(f"{name:<18} {n:>6}  {root or '(not set)'}  [{adapter.layout}]")


def dry_run(cfg: dict, found: dict[str, list[Case]], cases: list[Case], excluded: list[str]) -> None:
    import nibabel as nib

    size = cfg["geometry"].get("output_size")
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
    cfg = load_config(args.config, args.root, args.overrides)
    if args.workers is not None:
        cfg["run"]["workers"] = args.workers
    if args.list_sources:
        list_sources(cfg)
        return 0
    names = selected_sources(cfg, args.sources)
    if not names:
        print("no source has an existing root: set one with --root NAME=PATH (see --list-sources)", file=sys.stderr)
        return 2
    discovered: list[dict] = []
    found = discover(cfg, names, discovered)
    empty = empty_sources(cfg, found)
    if empty and not args.allow_empty:
        print("error: " + "; ".join(f"{e['source']}={e['file']}: {e['detail']}" for e in empty)
              + ". Fix the root, or pass --allow-empty to build without it", file=sys.stderr)
        return 2
    discovered += empty
    cases, excluded = apply_exclusions(cfg, found, names, args.exclude, args.holdout_finetune)
    if args.dry_run:
        dry_run(cfg, found, cases, excluded)
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
        return build(args, cfg, out, cases, excluded, discovered, t_start)
    except OSError as err:  # output side: disk full, quota, read-only or failing disk (inputs are the workers' job)
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: writing the build in {out} failed: {err.strerror or err}{where}. Nothing is lost: fix the cause "
              "(free space...) and run the same command again to continue", file=sys.stderr)
        return 3
    finally:
        lock.close()


def build(args: argparse.Namespace, cfg: dict, out: Path, cases: list[Case], excluded: list[str], discovery: list[dict],
          t_start: float) -> int:
    """Stages 2-4 into ``out`` (locked by the caller). An ``OSError`` here is the output side failing; every stage is
    resumable, so the caller reports it in one line and a re-run continues."""
    if args.restart and (out / ".state").exists():
        shutil.rmtree(out / ".state")
        for old in out.glob("ct3m-*.tar*"):
            old.unlink()
    state = State(out)
    digest = plan_hash(cfg, cases)
    plan_file = state.dir / "plan.json"
    if plan_file.exists():
        previous = json.loads(plan_file.read_text())
        if previous.get("version") != STATE_VERSION:
            print(f"{out} holds a partial build made by an older version of this builder; use a new --out or --restart", file=sys.stderr)
            return 2
        if previous.get("plan_hash") != digest:
            print(f"{out} holds a build with a different config or input list; use a new --out or --restart", file=sys.stderr)
            return 2
    else:
        atomic_write_text(plan_file, json.dumps({"plan_hash": digest, "version": STATE_VERSION, "n_cases": len(cases)}) + "\n")
    state.truncate_torn("volumes.jsonl")
    state.truncate_torn("groups.jsonl")
    damaged = damaged_shards(out, state)
    if damaged:  # their groups are packed again below, from their cases curated again (lost_staging)
        print(f"{len(damaged)} shard(s) missing or changed since they were written ({', '.join(sorted(damaged))}): "
              "building their groups again", file=sys.stderr)
        state.rewrite("groups.jsonl", [g for g in state.read("groups.jsonl") if g["group"] not in set(damaged.values())])
        (state.dir / "complete").unlink(missing_ok=True)
    progress = not args.no_progress
    t_curate = time.perf_counter()
    curate(cases, cfg, state, int(cfg["run"]["workers"]), progress)

    lost = lost_staging(state, cases)
    if lost:  # only after an OS crash: state says done but the staging file did not reach the disk
        print(f"{len(lost)} staging file(s) missing or truncated: curating those cases again", file=sys.stderr)
        state.rewrite("volumes.jsonl", [r for r in state.read("volumes.jsonl") if r["case"] not in lost])
        curate(cases, cfg, state, int(cfg["run"]["workers"]), progress)
    records = case_records(state, cases)
    duplicates = []
    if cfg["dedup"]["enabled"]:
        fps = [Fingerprint.from_dict(v["fingerprint"]) for r in records for v in r["volumes"]]
        duplicates = find_duplicates(fps, list(cfg["sources"]), float(cfg["dedup"]["max_mean_abs_diff_hu"]), float(cfg["dedup"]["extent_rel_tol"]))
    dropped = {d["dropped"] for d in duplicates}
    kept = [v for r in records for v in r["volumes"] if v["n_slices"] > 0 and v["uid"] not in dropped]
    groups = volume_groups(kept, cfg)
    t_pack = time.perf_counter()
    pack(groups, cfg, out, state, progress, int(cfg["run"].get("pack_threads") or max(1, int(cfg["run"]["workers"]))))
    t_reports = time.perf_counter()
    atomic_write_text(state.dir / "complete", "packed\n")
    for leftover in state.staging.glob("*"):
        leftover.unlink()
    stats, n_failed = write_reports(out, cfg, state, cases, records, duplicates, excluded, len(groups), discovery)
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
