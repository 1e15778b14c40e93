"""Stage 2, curate: every pending case through :func:`data_curation.process.process_case` in a pool of worker
processes (one volume in memory per worker), each finished case appended to the journal.

A case that kills its worker (decoder segfault, OOM kill) is isolated and recorded as ``worker_crashed``; workers
end themselves when the builder is killed (they are children of the forkserver, not of the builder).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from typing import Callable

from data_curation.journal import Journal
from data_curation.settings import CurationSettings, RunSettings
from meddino_datasets.case import Case
from meddino_common.atomic import remove_stale_temporaries

_WORKER: dict = {}  # the settings and staging folder of this worker process (set by init_worker)
FAULT_INJECT_ENV = "CT3M_FAULT_INJECT_CASE"  # a case uid whose worker exits hard: the crash-isolation test's fault


def process_alive(pid: int) -> bool:
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
        while process_alive(builder_pid):
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-builder", daemon=True).start()


def tune_malloc(run: RunSettings) -> bool:
    """glibc only: keep freed memory in the worker's heap for the next slice instead of handing it back to the OS.

    A worker allocates and frees several 0.1-0.5 MB arrays per slice (decoded pixels, HU, resampled slice, sample
    bytes). With glibc's defaults each of those is a fresh ``mmap`` (or a heap top trimmed after every free), so
    every slice pays page faults on memory it just released (measured on a real uncompressed 512x512x20 series: the
    HU conversion 9.4 -> 2.9 ms, the series assembly 4.0 -> 2.1 ms with these settings). Arrays of
    ``run.malloc_mmap_threshold_mb`` or more (whole volumes) still come from and go back to the OS, so a worker keeps
    at most about ``run.malloc_trim_threshold_mb`` of free heap on top of what it uses. Returns whether the settings
    were applied (False on other C libraries, or when the config leaves them null)."""
    import ctypes
    import platform

    mmap_mb, trim_mb = run.malloc_mmap_threshold_mb, run.malloc_trim_threshold_mb
    if mmap_mb is None or trim_mb is None or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from glibc's <malloc.h>
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(m_mmap_threshold, int(mmap_mb * 2**20)) == 1
    return libc.mallopt(m_trim_threshold, int(trim_mb * 2**20)) == 1 and ok


def init_worker(settings: CurationSettings, staging: str, builder_pid: int | None = None) -> None:
    """Set up a worker process (or the builder itself with ``--workers 0``): one torch thread, malloc tuning, and
    an exit when ``builder_pid`` dies."""
    import torch

    torch.set_num_threads(1)
    tune_malloc(settings.run)
    _WORKER["settings"] = settings
    _WORKER["staging"] = staging
    if builder_pid is not None and builder_pid != os.getpid():
        _exit_with_builder(builder_pid, settings.run.orphan_poll_seconds)


def work(case: Case) -> dict:
    """Curate one case in a process set up by :func:`init_worker` -> its journal record."""
    from data_curation.process import process_case  # imports torch: only where volumes are processed

    if os.environ.get(FAULT_INJECT_ENV) == case.uid:
        os._exit(137)
    return process_case(case, _WORKER["settings"], _WORKER["staging"])


def pool_context() -> mp.context.BaseContext:
    """The multiprocessing context of the curation's worker pool (``benchmarks/curation.py`` starts its decode-only
    pool the same way). forkserver: torch is imported once in the server and workers fork from it (cheap start, and
    safe: the server never ran parallel torch work); spawn where forkserver does not exist. The CLI module is
    preloaded too: a new worker re-imports the main script, which then finds its imports (omegaconf...) already
    loaded -- 0.02 s instead of 0.3 s per worker start, measured."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_curation.process", "data_curation.build_ct3m"])
        return ctx
    return mp.get_context("spawn")


def crash_record(case: Case, detail: str) -> dict:
    """The journal record of a case whose worker died: no volume, one ``worker_crashed`` failure."""
    return {"case": case.uid, "source": case.source, "volumes": [], "seconds": 0.0, "read_seconds": 0.0, "cpu_seconds": 0.0,
            "rejections": [{"file": case.paths[0] if case.paths else case.uid, "reason": "worker_crashed", "detail": detail, "filtered": False}]}


def run_pool(cases: list[Case], settings: CurationSettings, staging: str, workers: int, record: Callable[[dict], None]) -> None:
    """Curate ``cases`` in worker processes. A case that kills its worker (decoder segfault, OOM kill) is found by
    re-running the cases that were in flight one at a time, and is recorded as ``worker_crashed``; the rest go on."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = pool_context()

    def run(batch: list[Case], n_workers: int) -> tuple[list[Case], list[Case]]:
        """-> (cases in flight when the pool broke, cases never submitted)."""
        queue = list(batch)
        with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=init_worker, initargs=(settings, staging, os.getpid()),
                                 max_tasks_per_child=settings.run.maxtasksperchild) as ex:
            futures: dict = {}
            while queue and len(futures) < 2 * n_workers:
                c = queue.pop(0)
                futures[ex.submit(work, c)] = c
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
                        futures[ex.submit(work, c)] = c
        return lost, queue

    remaining = list(cases)
    while remaining:
        lost, remaining = run(remaining, workers)
        for case in lost:  # one at a time: the culprit breaks its own pool
            culprit, _ = run([case], 1)
            if culprit:
                record(crash_record(case, "the worker process died while curating this case (segfault in a decoder or out of memory)"))


def largest_first(cases: list[Case]) -> list[Case]:
    """Cases by estimated input bytes (first file x number of files), largest first, stable: the pool ends with small
    cases instead of one worker finishing a big volume alone. Only the processing order changes, not the outputs."""
    def size(case: Case) -> int:
        try:
            return os.path.getsize(case.paths[0]) * len(case.paths) if case.paths else 0
        except OSError:
            return 0

    return sorted(cases, key=size, reverse=True)


def curate(cases: list[Case], settings: CurationSettings, journal: Journal, progress: bool) -> None:
    """Stage 2: every case not yet in ``volumes.jsonl``. ``settings.run.workers`` >= 1: process pool; 0: in this
    process (debugging)."""
    done = {r["case"] for r in journal.read("volumes.jsonl")}
    pending = largest_first([c for c in cases if c.uid not in done])
    remove_stale_temporaries(journal.staging)  # staging files a killed worker left half-written
    if not pending:
        return
    from tqdm import tqdm

    bar = tqdm(total=len(cases), initial=len(cases) - len(pending), unit="vol", desc="curate", disable=not progress, dynamic_ncols=True)
    n_slices, t0 = 0, time.perf_counter()

    def record(result: dict) -> None:
        nonlocal n_slices
        journal.append("volumes.jsonl", result)
        n_slices += sum(v["n_slices"] for v in result["volumes"])
        bar.update(1)
        bar.set_postfix(slices=n_slices, slices_per_s=f"{n_slices / max(time.perf_counter() - t0, 1e-9):.0f}")

    try:
        if settings.run.workers <= 0:
            init_worker(settings, str(journal.staging))
            for case in pending:
                record(work(case))
        else:
            run_pool(pending, settings, str(journal.staging), settings.run.workers, record)
    finally:
        bar.close()
