"""What the loader's shard verification costs, against reading the same shards.

The loader checks each shard against ``shards.csv`` before reading it (``pretrain.data.shards.verify_shard``): its
size, then its SHA-256 once per process. This script curates the embedded real CT sample (or takes ``--shards``, a
CT-3M build with ``shards.csv``), warms the page cache, and times per round, in one process: hashing every shard
(the verification, cache of verified shards cleared each round) against reading every shard as the loader does
(``iter_shard`` + ``decode_hu`` of every sample, verification skipped), and the loader's own work on those samples
(``build_batch`` with ``configs/pretrain/base.yaml``'s stage-1 multi-crop, one thread, as a DataLoader worker).
Printed: the median times, the ratios of verification to each, and the hashing throughput.

    .venv/bin/python benchmarks/shard_verify.py [--shards DIR] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pretrain.data import shards as shard_io

REPO = Path(__file__).resolve().parents[1]


def curate_sample(out: Path) -> Path:
    """CT-3M shards of the embedded real CT sample (data_curation/sample_ct), made by the curation CLI."""
    from data_curation.build_ct3m import main

    root = out / "root"
    root.mkdir(parents=True)
    for name in ("totalsegmentator", "msd_spleen"):
        (root / name).symlink_to(REPO / "data_curation" / "sample_ct" / name)
    build = out / "ct3m"
    if main(["--no-progress", "--workers", "0", "--out", str(build), "--root", f"folder={root}"]) != 0:
        raise SystemExit("curation of the sample failed")
    return build


def time_verify(paths: list[Path]) -> float:
    """Hash every shard once: ``verify_shard`` remembers the shards this process hashed, so each round first makes
    it forget them (contents and page cache unchanged) and the hashing is paid again."""
    shard_io.forget_verified_shards()
    t0 = time.perf_counter()
    for path in paths:
        shard_io.verify_shard(path)
    return time.perf_counter() - t0


def time_read(paths: list[Path]) -> tuple[float, int]:
    """Every sample read and decoded, verification already done (cached), as the loader reads after it."""
    for path in paths:
        shard_io.verify_shard(path)
    t0 = time.perf_counter()
    n = 0
    for path in paths:
        for sample in shard_io.iter_shard(path):
            shard_io.decode_hu(sample)
            n += 1
    return time.perf_counter() - t0, n


def time_batches(paths: list[Path], batch_size: int) -> float:
    """The loader's batch building (multi-crop + masks) over every sample of ``paths``, one thread."""
    import torch
    from pretrain.data.loader import SSLBatchSettings, build_batch
    from pretrain.train.config import default_config_dir, load_config

    torch.set_num_threads(1)
    cfg = load_config(default_config_dir() / "base.yaml", [  # one rank, one micro-batch of batch_size
        f"data.shards=[{','.join(str(p) for p in paths)}]", f"train.global_batch_size={batch_size}",
        f"data.max_batch_size_per_rank={batch_size}"])
    settings = SSLBatchSettings.from_config(cfg)
    slices = [shard_io.decode_hu(s) for p in paths for s in shard_io.iter_shard(p)]
    t0 = time.perf_counter()
    for i, b0 in enumerate(range(0, len(slices), batch_size)):
        build_batch(settings, slices[b0:b0 + batch_size], 0, i)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=None, help="a CT-3M build with shards.csv (default: curate the sample)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians are printed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.shards or curate_sample(Path(tmp))
        paths = shard_io.expand_shards(folder)
        n_bytes = sum(p.stat().st_size for p in paths)
        time_read(paths)  # warm the page cache
        verify = [time_verify(paths) for _ in range(args.rounds)]
        reads = [time_read(paths) for _ in range(args.rounds)]
        t_verify, t_read = statistics.median(verify), statistics.median(t for t, _ in reads)
        t_batches = time_batches(paths, 16)
        print(f"{len(paths)} shards, {n_bytes / 2**20:.1f} MiB, {reads[0][1]} samples, {args.rounds} rounds (medians)")
        print(f"verify (SHA-256): {t_verify * 1e3:.1f} ms ({n_bytes / 2**20 / t_verify:.0f} MiB/s)")
        print(f"read + decode:    {t_read * 1e3:.1f} ms")
        print(f"batch building:   {t_batches * 1e3:.1f} ms (multi-crop + masks, one thread)")
        print(f"verify / read = {t_verify / t_read:.2f}x, verify / (read + batch building) = {t_verify / (t_read + t_batches):.3f}x "
              "(paid once per shard per process; later epochs skip it)")


if __name__ == "__main__":
    main()
