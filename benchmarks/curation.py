"""Curation throughput vs a decode-only baseline, measured in the same run on the real CT in shared/data.

    .venv/bin/python benchmarks/curation.py [--repeat 3] [--workers 1 2] [--shared PATH]

Decode-only = just reading the inputs (nibabel ``dataobj`` -> array; pydicom ``pixel_array`` for every file).
Curation = ``build_ct3m.main`` end to end (read + HU checks + canonical orientation + resample to 256x256 +
fingerprints + staging + shuffled shard packing + reports), de-duplication off so the repeated inputs are all
packed. Both are reported as native input slices per second per worker; the ratio (target <= 1.5x) compares
one worker with the single-process decode. Scaling is reported for each ``--workers`` value. A warm-up run
(one volume) precedes the timed runs, so imports and the worker pool's forkserver (which imports torch once per
build) are not in them; that one-off start is measured separately in a fresh interpreter and printed.
The machine is shared: run it twice and read the spread.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402

INPUTS = [  # (relative path in shared/data/real, kind); "@512nifti" is made in the run, see make_512_nifti
    ("totalsegmentator/example_ct.nii.gz", "nifti"),
    ("totalsegmentator/aorta_report/ct_cropped.nii.gz", "nifti"),
    ("ivadomed_msd_spleen/sub-spleen2_ct.nii.gz", "nifti"),
    ("totalsegmentator/example_ct_dicom", "dicom"),  # JPEG 2000 lossless, 20 x 512^2
    ("dcm_qa_ct/GE_head_tilt_varspacing", "dicom"),  # uncompressed, tilted, 28 x 512^2
    ("dcmqi_ct3slice/dicom", "dicom"),
    ("@512nifti", "nifti"),  # example_ct_dicom re-saved as int16 .nii.gz: a 512^2 NIfTI like most CT-3M sources
]


def make_512_nifti(real: Path, dst: Path) -> Path:
    """The real 512x512x20 Siemens series as a gzipped int16 NIfTI (real pixels, only the container changes):
    the shared corpus has no 512^2 NIfTI CT, and most CT-3M sources are 512^2 .nii.gz."""
    from data_curation.readers.dicom import read_dicom_series

    cfg = {"max_tilt_deg": 30, "gantry_tilt": "resample", "shear_tol_px": 0.05, "duplicate_tol_mm": 0.01, "spacing_rel_tol": 0.05,
           "on_variable_spacing": "keep", "on_missing_slices": "keep", "min_slices": 1, "localizer_tokens": ["LOCALIZER"],
           "reject_image_type_tokens": []}
    reading = {"padding_fill_hu": -1024, "hu_sanity": {"low": -1024, "high": 4000, "slack": 2048, "max_outside_fraction": 0.001}}
    files = [str(f) for f in sorted((real / "totalsegmentator" / "example_ct_dicom").iterdir())]
    vol = read_dicom_series(files, cfg, reading)[0][0]
    path = dst / "example_ct_512.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(vol.data), vol.affine), path)
    return path


def build_tree(real: Path, dst: Path, repeat: int) -> list[tuple[Path, str]]:
    items = []
    made = make_512_nifti(real, dst.parent)
    for r in range(repeat):
        for i, (rel, kind) in enumerate(INPUTS):
            src = made if rel == "@512nifti" else real / rel
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


def decode_only(items: list[tuple[Path, str]]) -> tuple[int, float]:
    """Native slices and seconds to just read every input (per-input seconds accumulate in ``PER_INPUT``)."""
    n, t_all = 0, time.perf_counter()
    for idx, (path, kind) in enumerate(items):
        t0 = time.perf_counter()
        if kind == "nifti":
            arr = np.asanyarray(nib.load(path).dataobj)
            n += arr.shape[2]
        else:
            for f in sorted(path.iterdir()):
                pydicom.dcmread(f).pixel_array
                n += 1
        PER_INPUT[idx % len(INPUTS)] = PER_INPUT.get(idx % len(INPUTS), 0.0) + time.perf_counter() - t0
    return n, time.perf_counter() - t_all


def measure_encodings(real: Path) -> None:
    """npy vs 16-bit PNG for the image field, on real 512^2 CT slices and their 256^2 resize (the config comment)."""
    from data_curation.geometry import resample_slices
    from data_curation.shards import decode_image, encode_image

    files = sorted((real / "totalsegmentator" / "example_ct_dicom").iterdir())
    native = np.stack([(pydicom.dcmread(f).pixel_array.astype(np.int32) - 1024).astype(np.int16) for f in files])
    small = resample_slices(native, (256, 256), None, {"interpolation": "linear", "antialias": True})
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
            "from data_curation.build_ct3m import _pool_context; ex = ProcessPoolExecutor(1, mp_context=_pool_context()); "
            "ex.submit(int, 1).result(); print(time.perf_counter() - t); ex.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return float(out.stdout.strip().splitlines()[-1])


def curate(tree: Path, workers: int) -> tuple[int, float, dict]:
    from data_curation.build_ct3m import main

    out = Path(tempfile.mkdtemp(prefix="ct3m_bench_"))
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["--out", str(out), "--root", f"folder={tree}", "--workers", str(workers), "--no-progress",
                         "--allow-failures", "dedup.enabled=false"])
        seconds = time.perf_counter() - t0
        assert code == 0, code
        import json

        stats = json.loads((out / "stats.json").read_text())
        native = sum(s["native_slices"] for s in stats["per_source"].values())
        records = [json.loads(line) for line in (out / ".state" / "volumes.jsonl").read_text().splitlines()]
        stats["bench_read_s"] = sum(r["read_seconds"] for r in records)
        stats["bench_volume_s"] = sum(r["seconds"] for r in records)
        stats["bench_per_input"] = {i: sum(r["seconds"] for r in records if f"_v{i}_" in r["case"]) for i in range(len(INPUTS))}
        return native, seconds, stats
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--repeat", type=int, default=3, help="copies of the input set (amortises per-run overheads)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    real = Path(args.shared) / "real"
    if not real.exists():
        raise SystemExit(f"{real} not found (pass --shared)")
    import torch

    torch.set_num_threads(1)  # one worker = one core, for decode and curation alike
    with tempfile.TemporaryDirectory() as tmp:
        items = build_tree(real, Path(tmp) / "in", args.repeat)
        decode_only(items[: len(INPUTS)])  # warm the page cache and imports (decode and curation alike)
        PER_INPUT.clear()
        warm = Path(tmp) / "warm"
        warm.mkdir()
        os.symlink(items[0][0], warm / items[0][0].name)
        curate(warm, 1)
        n_dec, t_dec_a = decode_only(items)
        results = {w: curate(Path(tmp) / "in", w) for w in args.workers}
        t_pool = pool_start_seconds()
        _, t_dec_b = decode_only(items)
    t_dec = (t_dec_a + t_dec_b) / 2
    dec_rate = n_dec / t_dec
    print(f"inputs: {len(items)} volumes ({args.repeat} x {len(INPUTS)} real CT: NIfTI gz, JPEG 2000 and uncompressed DICOM), "
          f"{n_dec} native slices")
    print(f"decode-only baseline      : {dec_rate:8.1f} slices/s   ({t_dec:.2f} s; runs {t_dec_a:.2f} / {t_dec_b:.2f} s)")
    base = None
    for w, (n, t, stats) in results.items():
        rate = n / t
        base = base or rate
        print(f"curation --workers {w:<2}     : {rate:8.1f} slices/s total, {rate / w:8.1f} per worker   ({t:.2f} s, "
              f"{stats['n_samples']} samples in {stats['n_shards']} shards)   scaling x{rate / base:.2f}")
    n1, t1, st1 = results[args.workers[0]]
    print(f"  inside the workers ({args.workers[0]} worker): reading {st1['bench_read_s']:.2f} s, whole per-volume work "
          f"{st1['bench_volume_s']:.2f} s (x{st1['bench_volume_s'] / max(st1['bench_read_s'], 1e-9):.2f}); the rest of the run "
          f"(discovery, packing shards, reports) {t1 - st1['bench_volume_s']:.2f} s")
    for i, (rel, _) in enumerate(INPUTS):
        dec = PER_INPUT[i] / 2  # two decode-only passes
        work = st1["bench_per_input"][i]
        print(f"  {rel.replace('@512nifti', 'example_ct_dicom as 512^2 .nii.gz'):<48s} decode-only {dec:6.2f} s   per-volume curation in the worker {work:6.2f} s   x{work / dec:.2f}")
    ratio = (t1 / n1) / (t_dec / n_dec)
    print(f"RATIO curation/decode-only (per slice, {args.workers[0]} worker): {ratio:.2f}x   (target <= 1.5x)")
    print(f"(not in the timed runs: the one-off worker-pool start, {t_pool:.2f} s in a fresh interpreter (torch import), "
          f"paid once per build; with it: {((t1 + t_pool) / n1) / (t_dec / n_dec):.2f}x)")
    print("image field encodings (real CT, example_ct_dicom):")
    measure_encodings(real)


if __name__ == "__main__":
    main()
