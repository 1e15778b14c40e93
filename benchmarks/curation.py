"""Curation throughput vs a decode-only baseline, and its scaling with --workers, measured in the same run on the
real CT in shared/data.

    .venv/bin/python benchmarks/curation.py [--repeat 5] [--rounds 3] [--shared PATH]

Inputs: the real CT files listed in ``INPUTS`` (NIfTI gz of three sizes, JPEG 2000 and uncompressed/tilted DICOM,
plus the 512^2 JPEG 2000 series re-saved as a 512^2 .nii.gz and as uncompressed DICOM -- same pixels, the
containers most CT-3M sources use), replicated ``--repeat`` times as symlinks so that two workers have enough
volumes to share (the corpus holds too few CT volumes for a scaling measurement).

Decode-only = just reading the inputs (nibabel ``dataobj`` -> array; pydicom ``pixel_array`` for every file), in
one process and in a pool of 2 processes (the box's own scaling at that moment: the reference for the curation's).
The curation's NIfTI reader inflates ``.nii.gz`` with ISA-L, faster than the zlib behind stock nibabel, so a third
decode-only run reads the NIfTI inputs that way too: the ratio against it is the cost of everything but decoding.
Curation = ``build_ct3m.main`` end to end (read + HU checks + canonical orientation + resample to 256x256 +
fingerprints + encoding + staging + shuffled shard packing with fsync + reports), de-duplication off so the
repeated inputs are all packed, with ``--workers 1`` and ``--workers 2``. The five measurements are interleaved in
``--rounds`` rounds (order rotated per round) and the load average is printed with each, because the box is
shared; medians are reported. Rates are native input slices per second. The ratio (target <= 1.5x) compares
curation with one worker and the one-process decode of the same round. A warm-up run precedes the timed runs,
so imports and the worker pool's forkserver (which imports torch once per build) are not in them; that one-off
start is measured separately in a fresh interpreter and printed.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]

INPUTS = [  # (relative path in shared/data/real, kind); "@512nifti" is made in the run, see make_512_nifti
    ("totalsegmentator/example_ct.nii.gz", "nifti"),
    ("totalsegmentator/aorta_report/ct_cropped.nii.gz", "nifti"),
    ("ivadomed_msd_spleen/sub-spleen2_ct.nii.gz", "nifti"),
    ("totalsegmentator/example_ct_dicom", "dicom"),  # JPEG 2000 lossless, 20 x 512^2
    ("dcm_qa_ct/GE_head_tilt_varspacing", "dicom"),  # uncompressed, tilted, 28 x 512^2
    ("dcmqi_ct3slice/dicom", "dicom"),
    ("@512nifti", "nifti"),  # example_ct_dicom re-saved as int16 .nii.gz: a 512^2 NIfTI like most CT-3M sources
    ("@512dicom", "dicom"),  # example_ct_dicom re-saved uncompressed: 512^2 DICOM as TCIA Pancreas-CT / CHAOS ship it
]
MADE = {"@512nifti": "example_ct_dicom as 512^2 .nii.gz", "@512dicom": "example_ct_dicom uncompressed"}


def make_512_nifti(real: Path, dst: Path) -> Path:
    """The real 512x512x20 Siemens series as a gzipped int16 NIfTI (real pixels, only the container changes):
    the shared corpus has no 512^2 NIfTI CT, and most CT-3M sources are 512^2 .nii.gz."""
    from data_curation.settings import load_settings
    from meddino_datasets.readers.dicom import DicomPolicy, read_dicom_series

    settings = load_settings()  # the shipped reader settings
    files = [str(f) for f in sorted((real / "totalsegmentator" / "example_ct_dicom").iterdir())]
    vol = read_dicom_series(files, DicomPolicy.from_config(settings.dicom, settings.reading))[0][0]
    path = dst / "example_ct_512.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(vol.data), vol.affine), path)
    return path


def make_uncompressed_dicom(real: Path, dst: Path) -> Path:
    """The real 512x512x20 Siemens series (JPEG 2000 lossless) re-saved uncompressed, file by file (same pixels and
    headers): the shared corpus has no 512^2 uncompressed CT series, the form most DICOM sources of CT-3M ship."""
    out = dst / "example_ct_dicom_uncompressed"
    out.mkdir()
    for f in sorted((real / "totalsegmentator" / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(f)
        ds.decompress()
        ds.save_as(out / f.name, enforce_file_format=True)
    return out


def build_tree(real: Path, dst: Path, repeat: int) -> list[tuple[Path, str]]:
    items = []
    made = {"@512nifti": make_512_nifti(real, dst.parent), "@512dicom": make_uncompressed_dicom(real, dst.parent)}
    for r in range(repeat):
        for i, (rel, kind) in enumerate(INPUTS):
            src = made.get(rel) or real / rel
            if kind == "nifti":
                target = dst / f"r{r}" / f"v{i}_{src.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src, target)
            else:
                target = dst / f"r{r}" / f"v{i}_dicom"
                target.mkdir(parents=True)
                for f in sorted(src.iterdir()):
                    if f.is_file() and f.name not in ("LICENSE", "README.upstream.md"):
                        os.symlink(f, target / f.name)
            items.append((target, kind))
    return items


PER_INPUT: dict[int, float] = {}


DECODE_CPU: list[float] = []


def decode_only(items: list[tuple[Path, str]], isal: bool = False) -> tuple[int, float]:
    """Native slices and seconds to just read every input (per-input seconds accumulate in ``PER_INPUT``, CPU
    seconds of each call in ``DECODE_CPU``; both only for the stock decode). ``isal``: gzipped NIfTI inflated by
    ISA-L as the curation's reader does (``meddino_datasets.readers.nifti``), instead of stock ``nib.load`` (zlib);
    DICOM is read the same either way."""
    from meddino_datasets.readers import nifti

    n, t_all, cpu0 = 0, time.perf_counter(), time.process_time()
    for idx, (path, kind) in enumerate(items):
        t0 = time.perf_counter()
        if kind == "nifti" and isal:
            with contextlib.ExitStack() as stack:
                arr = np.asanyarray(nifti.open_nifti(str(path), stack).dataobj)
            n += arr.shape[2]
        elif kind == "nifti":
            arr = np.asanyarray(nib.load(path).dataobj)
            n += arr.shape[2]
        else:
            for f in sorted(path.iterdir()):
                pydicom.dcmread(f).pixel_array
                n += 1
        if not isal:
            PER_INPUT[idx % len(INPUTS)] = PER_INPUT.get(idx % len(INPUTS), 0.0) + time.perf_counter() - t0
    if not isal:
        DECODE_CPU.append(time.process_time() - cpu0)
    return n, time.perf_counter() - t_all


def measure_encodings(real: Path) -> None:
    """npy vs 16-bit PNG for the image field, on real 512^2 CT slices and their 256^2 resize (the config comment)."""
    from data_curation.geometry import resample_slices
    from data_curation.settings import load_settings
    from data_curation.shards import decode_image, encode_image

    files = sorted((real / "totalsegmentator" / "example_ct_dicom").iterdir())
    native = np.stack([(pydicom.dcmread(f).pixel_array.astype(np.int32) - 1024).astype(np.int16) for f in files])
    small = resample_slices(native, (256, 256), None, load_settings().geometry)  # the shipped 512 -> 256 resize
    for name, stack in (("512x512", native), ("256x256", small)):
        for fmt, level in (("npy", 0), ("png", 1), ("png", 6)):
            t0 = time.perf_counter()
            blobs = [encode_image(sl, fmt, level)[1] for sl in stack]
            t_enc = (time.perf_counter() - t0) / len(stack)
            t0 = time.perf_counter()
            back = [decode_image(fmt, b) for b in blobs]
            t_dec = (time.perf_counter() - t0) / len(stack)
            assert all(np.array_equal(a, b) for a, b in zip(back, stack))
            label = fmt if fmt == "npy" else f"png(level {level})"
            print(f"  {name} {label:<13s} {np.mean([len(b) for b in blobs]) / 1024:7.1f} KiB/slice   encode {t_enc * 1e3:6.2f} ms   "
                  f"decode {t_dec * 1e3:6.2f} ms   (lossless: verified)")


def pool_start_seconds() -> float:
    """One-off cost of starting the builder's worker pool (the forkserver imports torch), in a fresh interpreter:
    in this process the warm-up run has already started the forkserver, so the timed runs do not pay it."""
    import subprocess

    code = ("import time; t = time.perf_counter(); from concurrent.futures import ProcessPoolExecutor; "
            "from data_curation.pool import pool_context; ex = ProcessPoolExecutor(1, mp_context=pool_context()); "
            "ex.submit(int, 1).result(); print(time.perf_counter() - t); ex.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def decode_one(item: tuple[Path, str]) -> int:
    return decode_only([item])[0]


def decode_pool(items: list[tuple[Path, str]], workers: int) -> tuple[int, float]:
    """Decode-only in ``workers`` processes started like the builder's pool (one volume per task, largest first as
    the builder schedules them)."""
    from concurrent.futures import ProcessPoolExecutor

    from data_curation.pool import pool_context

    def size(item: tuple[Path, str]) -> int:
        files = [item[0]] if item[1] == "nifti" else sorted(item[0].iterdir())
        return os.path.getsize(files[0]) * len(files)

    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=pool_context()) as ex:
        n = sum(ex.map(decode_one, sorted(items, key=size, reverse=True)))
    return n, time.perf_counter() - t0


def curate(tree: Path, workers: int) -> tuple[int, float, dict]:
    from data_curation.build_ct3m import main

    out = Path(tempfile.mkdtemp(prefix="ct3m_bench_"))
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = main(["--out", str(out), "--root", f"folder={tree}", "--workers", str(workers), "--no-progress",
                         "--allow-failures", "dedup.enabled=false"])
        seconds = time.perf_counter() - t0
        parent_cpu = time.process_time() - cpu0
        assert code == 0, code
        import json

        stats = json.loads((out / "stats.json").read_text())
        native = sum(s["native_slices"] for s in stats["per_source"].values())
        records = [json.loads(line) for line in (out / ".state" / "volumes.jsonl").read_text().splitlines()]
        stats["bench_read_s"] = sum(r["read_seconds"] for r in records)
        stats["bench_volume_s"] = sum(r["seconds"] for r in records)
        stats["bench_per_input"] = {i: sum(r["seconds"] for r in records if f"_v{i}_" in r["case"]) for i in range(len(INPUTS))}
        stats["bench_cpu_s"] = parent_cpu + sum(r["cpu_seconds"] for r in records)  # builder process + per-case worker CPU
        stats["bench_phases"] = printed.getvalue().strip().splitlines()[-1].split("overall; ", 1)[1].split(")")[0]
        stats["bench_phase_s"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", stats["bench_phases"])}
        return native, seconds, stats
    finally:
        shutil.rmtree(out, ignore_errors=True)


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--repeat", type=int, default=5, help="copies of the input set (volumes for 2 workers to share)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the five measurements (medians reported)")
    p.add_argument("--no-encodings", action="store_true", help="skip the npy/PNG encoding measurement")
    args = p.parse_args()
    real = Path(args.shared) / "real"
    if not real.exists():
        raise SystemExit(f"{real} not found (pass --shared)")
    import torch

    torch.set_num_threads(1)  # one worker = one core, for decode and curation alike
    runs: dict[str, list[float]] = {"decode x1": [], "decode x2": [], "curate w1": [], "curate w2": [], "decode x1 isal": []}
    ratios, cpu_ratios, loads, cpu_w2_over_w1, predicted, isal_ratios = [], [], [], [], [], []
    last_stats: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = build_tree(real, Path(tmp) / "in", args.repeat)
        decode_only(items[: len(INPUTS)])  # warm the page cache and imports (decode and curation alike)
        warm = Path(tmp) / "warm"
        warm.mkdir()
        os.symlink(items[0][0], warm / items[0][0].name)
        curate(warm, 1)  # starts the forkserver (torch import) once, as a build does
        decode_pool(items[:2], 2)
        PER_INPUT.clear()
        n_native = 0
        print(f"inputs: {len(items)} volumes ({args.repeat} symlinked copies of {len(INPUTS)} real CT inputs: NIfTI gz, "
              f"JPEG 2000 and uncompressed DICOM, two of them the real 512^2 series re-saved); load average (1 min) at start {load1():.2f} on {os.cpu_count()} CPUs")
        order = list(runs)
        for r in range(args.rounds):
            seq = order[r % len(order):] + order[: r % len(order)]
            got, load_before = {}, load1()
            for name in seq:
                if name == "decode x1":
                    n, t = decode_only(items)
                    cpu_dec = DECODE_CPU[-1]
                elif name == "decode x1 isal":
                    n, t = decode_only(items, isal=True)
                elif name == "decode x2":
                    n, t = decode_pool(items, 2)
                else:
                    n, t, st = curate(Path(tmp) / "in", int(name[-1]))
                    if name == "curate w1":
                        last_stats = st
                        last_stats["bench_wall"] = t
                        cpu_cur = st["bench_cpu_s"]
                        ph = st["bench_phase_s"]
                        serial = t - ph["curate"]  # setup, pool start, pack, reports: the builder process alone
                        predicted.append(t / (serial + ph["curate"] / 2))
                    else:
                        cpu_w2 = st["bench_cpu_s"]
                n_native = n_native or n
                assert n == n_native, (name, n, n_native)
                got[name] = t
                runs[name].append(t)
            ratios.append(got["curate w1"] / got["decode x1"])
            isal_ratios.append(got["curate w1"] / got["decode x1 isal"])
            cpu_ratios.append(cpu_cur / cpu_dec)
            cpu_w2_over_w1.append(cpu_w2 / cpu_cur)
            loads.append((load_before, load1()))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items())
                  + f"; ratio {ratios[-1]:.2f}x (CPU {cpu_cur:.2f} / {cpu_dec:.2f} s = {cpu_ratios[-1]:.2f}x); load {load_before:.2f} -> {loads[-1][1]:.2f}")
        t_pool = pool_start_seconds()
    med = {k: float(np.median(v)) for k, v in runs.items()}
    rate = {k: n_native / v for k, v in med.items()}
    print(f"{n_native} native slices per run; medians over {args.rounds} rounds:")
    print(f"  decode-only, 1 process      : {rate['decode x1']:8.1f} slices/s   ({med['decode x1']:.2f} s)")
    print(f"  decode-only, 2 processes    : {rate['decode x2']:8.1f} slices/s   ({med['decode x2']:.2f} s)   "
          f"box scaling x{rate['decode x2'] / rate['decode x1']:.2f}")
    print(f"  curation --workers 1        : {rate['curate w1']:8.1f} slices/s   ({med['curate w1']:.2f} s)")
    print(f"  curation --workers 2        : {rate['curate w2']:8.1f} slices/s   ({med['curate w2']:.2f} s)   "
          f"{rate['curate w2'] / 2:.1f} per worker")
    st1 = last_stats
    print(f"  inside the workers (1 worker, last round): reading {st1['bench_read_s']:.2f} s, whole per-volume work "
          f"{st1['bench_volume_s']:.2f} s (x{st1['bench_volume_s'] / max(st1['bench_read_s'], 1e-9):.2f}); the rest of the run "
          f"(discovery, pool start, packing shards, reports) {st1['bench_wall'] - st1['bench_volume_s']:.2f} s; "
          f"{st1['n_samples']} samples in {st1['n_shards']} shards; builder phases: {st1['bench_phases']}")
    n_dec_runs = len(runs["decode x1"])
    for i, (rel, _) in enumerate(INPUTS):
        dec = PER_INPUT[i] / n_dec_runs
        work = st1["bench_per_input"][i]
        print(f"  {MADE.get(rel, rel):<48s} decode-only {dec:6.2f} s   "
              f"per-volume curation in the worker {work:6.2f} s   x{work / dec:.2f}")
    print("load average (1 min) per round: " + ", ".join(f"{a:.2f}->{b:.2f}" for a, b in loads))
    print(f"RATIO curation/decode-only (1 worker vs 1 process, median of per-round ratios {', '.join(f'{x:.2f}' for x in ratios)}): "
          f"{float(np.median(ratios)):.2f}x   (target <= 1.5x)")
    print(f"  the same against a decode-only that inflates .nii.gz with ISA-L like the curation's reader ({rate['decode x1 isal']:.1f} "
          f"slices/s; per round {', '.join(f'{x:.2f}' for x in isal_ratios)}): {float(np.median(isal_ratios)):.2f}x   (the cost "
          f"of everything but decoding, with the faster decoder on both sides)")
    print(f"CPU-time ratio (builder + worker CPU seconds vs decode CPU seconds; less sensitive to the load, per round "
          f"{', '.join(f'{x:.2f}' for x in cpu_ratios)}): {float(np.median(cpu_ratios)):.2f}x")
    print(f"SCALING --workers 2 vs 1: x{med['curate w1'] / med['curate w2']:.2f}   (decode-only 2 vs 1 processes on the box "
          f"at the same time: x{med['decode x1'] / med['decode x2']:.2f}; ideal x2.00 on an idle 2-core box)")
    print(f"  work added by the second worker: CPU seconds --workers 2 / --workers 1 = x{float(np.median(cpu_w2_over_w1)):.2f}; "
          f"predicted from the measured split of the --workers 1 run into the builder's serial phases and the per-volume "
          f"curation (Amdahl, 2 free cores, perfect balance): x{float(np.median(predicted)):.2f}")
    print(f"(not in the timed runs: the one-off worker-pool start, {t_pool:.2f} s in a fresh interpreter (torch import), "
          f"paid once per build)")
    if not args.no_encodings:
        print("image field encodings (real CT, example_ct_dicom):")
        measure_encodings(real)


if __name__ == "__main__":
    main()
