"""End to end: the CLI on real CT -> shards readable by stock webdataset and tar, manifest/stats, resume after
kill -9, cross-source de-duplication, PHI never leaks, failures reported with a non-zero exit code."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_curation.build_ct3m import main
from data_curation.discovery import discover, holdout_cases
from data_curation.settings import load_settings
from meddino_common.config import ConfigError

pytestmark = pytest.mark.slow
SCRIPT = ["data_curation/build_ct3m.py", "--no-progress"]


def run_script(repo_root: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """``python data_curation/build_ct3m.py ...`` from the repo root, as users run it."""
    proc = subprocess.run([sys.executable, *SCRIPT, *args], cwd=repo_root, capture_output=True, text=True, timeout=600)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_build(capsys, monkeypatch, repo_root):
    """The CLI's ``main`` in this process (saves an interpreter + torch start per call on a 2-core CI box)."""
    monkeypatch.chdir(repo_root)

    def run(_repo_root: Path, *args: str, check: int | None = 0) -> _Result:
        capsys.readouterr()
        code = main(["--no-progress", *args] if "--workers" in args else ["--no-progress", "--workers", "0", *args])
        captured = capsys.readouterr()
        if check is not None:
            assert code == check, captured.out + captured.err
        return _Result(code, captured.out, captured.err)

    return run


def read_samples(out: Path) -> dict[str, tuple[str, dict]]:
    """key -> (sha256 of the image bytes, json) via plain ``webdataset.WebDataset(url)``."""
    import webdataset as wds

    samples = {}
    for shard in sorted(out.glob("ct3m-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            assert s["__key__"] not in samples, f"duplicate sample {s['__key__']}"
            samples[s["__key__"]] = (hashlib.sha256(s["npy"]).hexdigest(), json.loads(s["json"]))
    return samples


@pytest.fixture(scope="module")
def sample_tree(tmp_path_factory, sample_ct) -> Path:
    """The two embedded NIfTI CT volumes (TotalSegmentator example, MSD spleen) under one ``folder`` root, as the demo
    curates them (``data_curation/sample_ct`` also holds a DICOM finetune validation case, kept out of curation)."""
    root = tmp_path_factory.mktemp("sample")
    for name in ("totalsegmentator", "msd_spleen"):
        os.symlink(sample_ct / name, root / name)
    return root


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory, real_data, sample_ct) -> Path:
    """Real CT of several kinds under one ``folder`` root: NIfTI (int32 RAS, float32, LPS int16), DICOM series
    (uncompressed with padding, JPEG 2000) and awkward files that must be filtered or fail."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(sample_ct / "totalsegmentator", root / "ts", ignore=shutil.ignore_patterns("*.json", "LICENSE"))
    shutil.copytree(sample_ct / "msd_spleen", root / "spleen", ignore=shutil.ignore_patterns("*.json"))
    shutil.copy(real_data / "totalsegmentator/aorta_report/ct_cropped.nii.gz", root / "aorta_ct.nii.gz")
    shutil.copy(real_data / "totalsegmentator/example_ct_sm.nii.gz", root / "ts_small.nii.gz")
    shutil.copytree(real_data / "dcmqi_ct3slice/dicom", root / "gep")
    (root / "j2k").mkdir()
    shutil.copy(real_data / "pylibjpeg_data_ct/ELSCINT1_JP2vsJ2K.dcm", root / "j2k")
    shutil.copytree(real_data / "dcm_qa_ct/Philips_localizer_and_rgb", root / "philips")
    return root


def test_sample_build_reads_back(tmp_path, repo_root, sample_tree, run_build):
    """The demo's curation: shards + manifest + stats, read with stock webdataset and plain tar."""
    out = tmp_path / "out"
    proc = run_script(repo_root, "--out", str(out), "--root", f"folder={sample_tree}", "output.samples_per_shard=40")
    assert "TOTAL" in proc.stdout
    samples = read_samples(out)
    shards = sorted(out.glob("ct3m-*.tar"))
    assert [s.name for s in shards] == [f"ct3m-{i:06d}.tar" for i in range(len(shards))] and len(shards) == 4
    with open(out / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["key", "shard", "source", "case", "slice_index", "source_path"]
    assert {r["case"]: r["source_path"] for r in rows} == {"totalsegmentator_example_ct": "totalsegmentator/example_ct.nii.gz",
                                                           "msd_spleen_sub-spleen2_ct": "msd_spleen/sub-spleen2_ct.nii.gz"}
    assert {r["key"] for r in rows} == set(samples) and len(rows) == len(samples)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_samples"] == len(samples) == stats["per_source"]["folder"]["slices"]
    assert sum(stats["hu_histogram"]["counts"]) == len(samples) * 64 * 64  # every 4th pixel per axis
    for key, (_, meta) in samples.items():
        assert "." not in key and key == f"folder-{meta['case']}-{meta['slice_index']:05d}"
        assert meta["orientation"] == "LPS" and meta["source"] == "folder" and len(meta["spacing_mm"]) == 2
        assert {"slice_spacing_mm", "original_shape", "original_spacing_mm", "slice_position_mm"} <= set(meta)
    # slices of one volume are spread over shards, and each shard mixes volumes
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], set()).add(r["shard"])
    assert all(len(s) == len(shards) for s in by_case.values())
    # plain tar lists the samples; an image decodes to int16 HU
    listing = subprocess.run(["tar", "tf", str(shards[0])], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 2 * 40 and all(n.endswith((".npy", ".json")) for n in listing)
    with tarfile.open(shards[0]) as tf:
        img = np.load(io.BytesIO(tf.extractfile(listing[1] if listing[1].endswith(".npy") else listing[0]).read()))
    assert img.dtype == np.int16 and img.shape == (256, 256) and -1024 <= img.min() < img.max() <= 4000
    # everything done: a rerun is a no-op that produces the same outputs
    before = {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")}
    run_build(repo_root, "--out", str(out), "--root", f"folder={sample_tree}", "output.samples_per_shard=40")
    assert {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")} == before


def test_png_format_roundtrip(tmp_path, repo_root, sample_ct, run_build):
    from data_curation.shards import decode_image

    out = tmp_path / "png"
    run_build(repo_root, "--out", str(out), "--root", f"folder={sample_ct / 'msd_spleen'}", "output.image_format=png", "geometry.output_size=null", "geometry.inplane_spacing_mm=null")
    ref = nib.load(sample_ct / "msd_spleen/sub-spleen2_ct.nii.gz")
    with tarfile.open(out / "ct3m-000000.tar") as tf:
        members = {m.name: m for m in tf.getmembers()}
        key = "folder-sub-spleen2_ct-00010"
        img = decode_image("png", tf.extractfile(members[key + ".png"]).read())
    # native geometry, canonical LPS: the RAS NIfTI slice flipped in x and y, transposed to [row, col]
    expected = np.rint(np.asarray(ref.dataobj)[::-1, ::-1, 10].T).astype(np.int16)
    np.testing.assert_array_equal(img, expected)


def test_failures_filtered_and_exit_code(tmp_path, repo_root, mixed_tree, real_data, run_build):
    """Bad input never stops the run; it lands in failures.jsonl with file and reason and makes the exit code 1
    unless --allow-failures. Filtered files (localizer, RGB) are logged in rejections.jsonl and are not failures."""
    tree = tmp_path / "tree"
    shutil.copytree(mixed_tree, tree, symlinks=True)
    shutil.copy(real_data / "pylibjpeg_data_ct/JPEGLossless_1s_1f_i_16_16_bad.dcm", tree / "j2k")
    (tree / "corrupt.nii.gz").write_bytes((tree / "ts_small.nii.gz").read_bytes()[:3000])
    out = tmp_path / "out"
    proc = run_build(repo_root, "--out", str(out), "--root", f"folder={tree}", "--workers", "2", check=1)
    assert "failed" in proc.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((Path(f["file"]).name, f["reason"]) for f in failures) == [
        ("JPEGLossless_1s_1f_i_16_16_bad.dcm", "hu_out_of_range"), ("corrupt.nii.gz", "unreadable")]
    rejections = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines()]
    assert sorted((Path(r["file"]).name, r["reason"]) for r in rejections) == [
        ("I10_localizer.dcm", "localizer"), ("I50_rgb_secondary.dcm", "not_grayscale")]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_failures"] == 2 and stats["per_source"]["folder"]["reasons"]["hu_out_of_range"] == 1
    cases = {m["case"] for _, m in read_samples(out).values()}
    assert {"j2k", "gep", "ts_example_ct", "aorta_ct", "spleen_sub-spleen2_ct", "ts_small"} == cases  # good data survived
    run_build(repo_root, "--out", str(out), "--root", f"folder={tree}", "--allow-failures", check=0)


def _wait_for(path: Path, n_lines: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n_lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"build ended before the kill point ({path.name} < {n_lines} lines)")
        time.sleep(0.005)
    raise AssertionError("kill point not reached")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc): the pool's forkserver, its workers, the resource tracker."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def test_kill_and_resume_equals_uninterrupted(tmp_path, repo_root, mixed_tree, run_build):
    """kill -9 during curation, then again during packing; the third run finishes. The result (shards byte for
    byte, manifest, stats) equals an uninterrupted run made with 2 workers (so 2 threads packing groups in whatever
    order they finish; the resumed run packs with one). The killed build's worker processes
    (children of the pool's forkserver, not of the builder) do not linger."""
    from data_curation.pool import process_alive

    args = ["--root", f"folder={mixed_tree}", "--allow-failures", "output.samples_per_shard=16", "output.volumes_per_group=2"]
    ref = tmp_path / "ref"
    run_build(repo_root, "--out", str(ref), "--workers", "2", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, *SCRIPT, "--out", str(out), "--workers", "1", *args]
    for state_file, lines in (("volumes.jsonl", 2), ("groups.jsonl", 1)):
        proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(out / ".state" / state_file, lines, proc)
        family = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        if state_file == "volumes.jsonl":
            assert len(family) >= 2  # forkserver + worker (+ resource tracker)
            t0 = time.time()
            while any(process_alive(p) for p in family) and time.time() - t0 < 15:
                time.sleep(0.1)
            assert not [p for p in family if process_alive(p)], "worker processes outlived the killed build"
    assert not (out / "manifest.csv").exists()  # really interrupted before the end
    # an OS crash can lose a staging file that the state already lists: it is detected and curated again
    staged = sorted((out / ".state" / "staging").glob("*.samples"))
    assert staged
    staged[0].write_bytes(staged[0].read_bytes()[:1000])
    run_build(repo_root, "--out", str(out), "--workers", "1", *args)
    ref_shards = {p.name: p.read_bytes() for p in ref.glob("ct3m-*.tar")}
    assert len(ref_shards) > 10
    assert {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")} == ref_shards
    assert not list(out.glob("*.tmp")) and not list((out / ".state" / "staging").iterdir())
    assert (out / "manifest.csv").read_text() == (ref / "manifest.csv").read_text()
    assert read_samples(out) == read_samples(ref)
    a, b = (json.loads((d / "stats.json").read_text()) for d in (out, ref))
    for s in (a, b):
        for src in s["per_source"].values():
            src.pop("seconds")
    assert a == b


def test_duplicate_across_sources(tmp_path, repo_root, real_data, sample_ct, run_build):
    """The same scan as a DICOM series (folder source) and as an RAS int16 NIfTI conversion with unmasked padding
    (CT-ORG layout): one copy kept (CT-ORG comes first in the priority order), the other reported."""
    dicom_dir = tmp_path / "mine" / "series1"
    shutil.copytree(real_data / "dcmqi_ct3slice/dicom", dicom_dir)
    shutil.copy(sample_ct / "msd_spleen/sub-spleen2_ct.nii.gz", tmp_path / "mine" / "other_ct.nii.gz")
    slices = sorted((pydicom.dcmread(f) for f in dicom_dir.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.int16) + int(d.RescaleIntercept) for d in slices], axis=-1)  # [row, col, z]
    d0 = slices[0]
    dr, dc = (float(x) for x in d0.PixelSpacing)
    dz = float(slices[1].ImagePositionPatient[2]) - float(d0.ImagePositionPatient[2])
    ipp = np.asarray(d0.ImagePositionPatient, float)
    # voxel (i=col, j=row, k) in LPS, then flip i and j so the NIfTI is stored RAS
    data = hu.transpose(1, 0, 2)[::-1, ::-1, :]
    ncol, nrow = data.shape[:2]
    affine = np.array([[dc, 0, 0, -ipp[0] - (ncol - 1) * dc], [0, dr, 0, -ipp[1] - (nrow - 1) * dr], [0, 0, dz, ipp[2]], [0, 0, 0, 1]])
    ctorg = tmp_path / "ctorg" / "OrganSegmentations"
    ctorg.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), ctorg / "volume-7.nii.gz")
    out = tmp_path / "out"
    run_build(repo_root, "--out", str(out), "--root", f"folder={tmp_path / 'mine'}", "--root", f"ctorg={tmp_path / 'ctorg'}")
    with open(out / "duplicates.csv") as fh:
        dups = list(csv.DictReader(fh))
    assert [(d["dropped"], d["kept"]) for d in dups] == [("folder/series1", "ctorg/volume-7")]
    assert float(dups[0]["mean_abs_diff_hu"]) < 0.5
    cases = {(m["source"], m["case"]) for _, m in read_samples(out).values()}
    assert cases == {("ctorg", "volume-7"), ("folder", "other_ct")}
    assert json.loads((out / "stats.json").read_text())["n_duplicates_dropped"] == 1


PHI = {"PatientName": "Zzyzx^Quintessa^PHIMARK", "PatientID": "PHIID-93127", "PatientBirthDate": "19230405",
       "InstitutionName": "St Phimark General", "ReferringPhysicianName": "Drphimark^Otto", "AccessionNumber": "ACC88231",
       "StudyDate": "19990817", "SeriesDate": "19990817", "PatientAddress": "12 Phimark Lane", "StudyID": "STUDYPHI7"}


def test_no_phi_in_outputs(tmp_path, repo_root, real_data, run_build):
    """Plant identifiers in a DICOM copy; no output byte (shards, manifest, stats, logs, state, stdout/stderr)
    contains any of them."""
    src = tmp_path / "in" / "series"
    src.mkdir(parents=True)
    for f in sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for kw, value in PHI.items():
            setattr(ds, kw, value)
        ds.save_as(src / f.name)
    (src / "bad.dcm").write_bytes(pydicom.dcmread(src / "01.dcm").PatientName.original_string + b" garbage")
    out = tmp_path / "out"
    proc = run_script(repo_root, "--out", str(out), "--root", f"folder={tmp_path / 'in'}", "--allow-failures")
    assert len(read_samples(out)) == 3
    needles = {v.encode().lower() for v in PHI.values()} | {p.encode().lower() for v in PHI.values() for p in v.split("^") if len(p) > 4}
    blobs = [(str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()] + [("stdout", proc.stdout.encode()), ("stderr", proc.stderr.encode())]
    assert len(blobs) > 5
    for name, blob in blobs:
        low = blob.lower()
        for needle in needles:
            assert needle not in low, f"{needle!r} leaked into {name}"


def test_list_sources_and_dry_run(tmp_path, repo_root, sample_tree, run_build):
    proc = run_build(repo_root, "--list-sources", "--root", f"folder={sample_tree}", "--root", f"btcv={tmp_path}")
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(lines) >= {"btcv", "amos22", "msd_spleen", "abdomenatlas", "folder"}
    assert lines["folder"].split()[1] == "2" and lines["btcv"].split()[1] == "0" and lines["kits23"].split()[1] == "-"
    out = tmp_path / "dry"
    proc = run_build(repo_root, "--out", str(out), "--dry-run", "--root", f"folder={sample_tree}")
    total = [line for line in proc.stdout.splitlines() if line.startswith("TOTAL")][0].split()
    assert total[1] == "2" and int(total[2]) == 112 + 26
    assert not out.exists()


def test_holdout_finetune_uses_the_nnunet_split(tmp_path, repo_root, sample_ct, run_build):
    """--holdout-finetune drops exactly fold 0's validation cases of meddino_datasets.splits over the labelled cases."""
    from meddino_datasets.splits import fold_split

    nii = sample_ct / "msd_spleen/sub-spleen2_ct.nii.gz"
    ids = [f"img{i:04d}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 21, 22, 23)]
    for i in ids:
        p = tmp_path / "btcv/RawData/Training/img" / f"{i}.nii.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(nii, p)
    test_img = tmp_path / "btcv/RawData/Testing/img/img0061.nii.gz"
    test_img.parent.mkdir(parents=True)
    os.symlink(nii, test_img)
    settings = load_settings(repo_root / "configs/data/ct3m.yaml", [f"btcv={tmp_path / 'btcv'}"])
    held = holdout_cases(settings, discover(settings, ["btcv"]))
    _, val = fold_split(ids, fold=0)
    assert held == {"btcv": [f"btcv/{c}" for c in val]} and len(val) == 3
    proc = run_build(repo_root, "--dry-run", "--holdout-finetune", "--root", f"btcv={tmp_path / 'btcv'}", "--exclude", "btcv/img0061")
    assert "(4 cases excluded" in proc.stdout
    total = [line for line in proc.stdout.splitlines() if line.startswith("TOTAL")][0].split()
    assert total[1] == str(len(ids) - 3)


def test_worker_crash_is_isolated(tmp_path, repo_root, sample_tree):
    """A case that kills its worker process (segfault, OOM kill) is recorded as failed; the others are curated.
    (Subprocess: forkserver workers inherit the environment of the server's first start.)"""
    out = tmp_path / "out"
    env = dict(os.environ, CT3M_FAULT_INJECT_CASE="folder/totalsegmentator_example_ct")
    proc = subprocess.run([sys.executable, *SCRIPT, "--out", str(out), "--root", f"folder={sample_tree}", "--workers", "2"],
                          cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["case"], f["reason"]) for f in failures] == [("folder/totalsegmentator_example_ct", "worker_crashed")]
    assert {m["case"] for _, m in read_samples(out).values()} == {"msd_spleen_sub-spleen2_ct"}


def test_tcia_dicom_source_keys_and_sources_filter(tmp_path, repo_root, real_data, sample_ct, run_build):
    """Pancreas-CT laid out as the NBIA downloader writes it: the case is the anonymised patient folder, the dated
    study/series folder names never reach the outputs; --sources limits the run to the named sources."""
    series = tmp_path / "tcia" / "Pancreas-CT" / "PANCREAS_0007" / "11-24-2015-PANCREAS0007-Pancreas-12345" / "Pancreas-54321"
    series.mkdir(parents=True)
    for i, f in enumerate(sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm"))):
        shutil.copy(f, series / f"1-{i + 1:03d}.dcm")
    out = tmp_path / "out"
    run_build(repo_root, "--out", str(out), "--root", f"pancreas_ct={tmp_path / 'tcia'}", "--root", "folder=data_curation/sample_ct",
              "--sources", "pancreas_ct")
    samples = read_samples(out)
    assert sorted(samples) == [f"pancreas_ct-PANCREAS_0007-{i:05d}" for i in range(3)]
    meta = samples["pancreas_ct-PANCREAS_0007-00000"][1]
    assert meta["format"] == "dicom" and meta["original_shape"] == [512, 512] and meta["slice_spacing_mm"] == 1.0
    for p in out.rglob("*"):
        if p.is_file():
            assert b"11-24-2015" not in p.read_bytes() and b"12345" not in p.read_bytes()
    with pytest.raises(SystemExit, match="no root for"):
        run_build(repo_root, "--out", str(tmp_path / "x"), "--sources", "kits23")


def test_changed_config_refused_then_restart(tmp_path, repo_root, sample_ct, run_build):
    """Resuming into an output made with another config is refused (it would mix two builds); --restart rebuilds.
    Thin-slice sub-sampling by mm keeps slices at least that far apart."""
    out = tmp_path / "out"
    root = f"folder={sample_ct / 'msd_spleen'}"
    run_build(repo_root, "--out", str(out), "--root", root)
    n_all = json.loads((out / "stats.json").read_text())["n_samples"]
    proc = run_build(repo_root, "--out", str(out), "--root", root, "slices.min_slice_step_mm=10", check=2)
    assert "different config" in proc.stderr
    run_build(repo_root, "--out", str(out), "--root", root, "slices.min_slice_step_mm=10", "--restart")
    positions = sorted(m["slice_position_mm"] for _, m in read_samples(out).values())
    assert len(positions) < n_all and min(np.diff(positions)) >= 10 - 1e-6  # 5 mm slices -> every other one


def test_tune_malloc_applies_on_glibc_and_is_optional(repo_root):
    """The workers' malloc settings (config ``run.malloc_*``) apply on glibc; null leaves the C library alone."""
    import platform

    from dataclasses import replace

    from data_curation.pool import tune_malloc

    run = load_settings(repo_root / "configs" / "data" / "ct3m.yaml").run
    assert tune_malloc(run) == (platform.libc_ver()[0] == "glibc")
    assert not tune_malloc(replace(run, malloc_mmap_threshold_mb=None, malloc_trim_threshold_mb=None))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MiB tmpfs (needs root: mount), grown with ``remount`` by the test; None where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("medium", ["tmpfs", "emulated", "emulated_pack"])
def test_disk_full_stops_the_build_and_a_rerun_equals_an_uninterrupted_build(tmp_path, repo_root, sample_tree, run_build,
                                                                               small_tmpfs, monkeypatch, disk_full_after, medium):
    """Out of space while curating: one line, exit code 3, no case recorded as failed; after space is freed the same
    command finishes with exactly the shards, manifest and stats of a build that never ran out of space. On a real
    6 MiB tmpfs (needs root to mount it), and with ENOSPC raised at the staging write call (curation) or at the
    shard copy (packing)."""
    if medium == "tmpfs" and small_tmpfs is None:
        pytest.skip("mounting a tmpfs needs root; the emulated case runs the same logic")
    args = ["--root", f"folder={sample_tree}", "output.samples_per_shard=40"]
    reference = tmp_path / "reference"
    run_build(repo_root, "--out", str(reference), *args)
    if medium == "tmpfs":
        out = small_tmpfs / "out"
    elif medium == "emulated":
        out = tmp_path / "out"
        disk_full_after(60)
    else:
        import errno

        from data_curation.shards import ShardWriter

        out = tmp_path / "out"
        real_copy, calls = ShardWriter.copy_blob, []

        def copy_until_full(self, fd, offset, size):
            calls.append(offset)
            if len(calls) > 50:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))
            return real_copy(self, fd, offset, size)

        monkeypatch.setattr(ShardWriter, "copy_blob", copy_until_full)
    proc = run_build(repo_root, "--out", str(out), *args, check=3)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run the same command again" in lines[0], proc.stderr
    assert len(list(out.glob("ct3m-*.tar"))) < 4 and not (out / "failures.jsonl").exists()
    if medium == "tmpfs":
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    else:
        monkeypatch.undo()
    run_build(repo_root, "--out", str(out), *args)
    assert (out / "failures.jsonl").read_text() == ""
    for name in ["manifest.csv", *(p.name for p in reference.glob("ct3m-*.tar"))]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    strip = lambda s: {k: v for k, v in json.loads(s).items() if k != "per_source"}  # per_source holds timings
    assert strip((out / "stats.json").read_text()) == strip((reference / "stats.json").read_text())


def test_out_that_is_a_file_or_locked_is_refused(tmp_path, repo_root, sample_ct, run_build):
    import fcntl

    target = tmp_path / "out"
    target.write_text("a file")
    proc = run_build(repo_root, "--out", str(target), "--root", f"folder={sample_ct / 'msd_spleen'}", check=2)
    assert proc.stderr.strip() == f"error: --out {target} is a file; give a folder for the build"
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another build holds the lock
        held.write("4242\n")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_build(repo_root, "--out", str(out), "--root", f"folder={sample_ct / 'msd_spleen'}", check=2)
    assert "is being written by another build (pid 4242)" in proc.stderr and not (out / ".state").exists()
    run_build(repo_root, "--out", str(out), "--root", f"folder={sample_ct / 'msd_spleen'}")  # lock released: builds


def test_mistyped_root_and_empty_root_are_errors(tmp_path, repo_root, sample_ct, run_build):
    with pytest.raises(SystemExit, match=r"--root foldr=.*unknown source 'foldr'; did you mean folder\?"):
        run_build(repo_root, "--out", str(tmp_path / "o"), "--root", f"foldr={sample_ct}")
    with pytest.raises(SystemExit, match=r"source root\(s\) not found or not a folder: folder=.*/no_such_dir"):
        run_build(repo_root, "--out", str(tmp_path / "o"), "--root", f"folder={tmp_path / 'no_such_dir'}")
    # a root of the wrong layout: the MSD spleen folder given as the btcv root
    args = ["--out", str(tmp_path / "o"), "--root", f"btcv={sample_ct / 'msd_spleen'}", "--root", f"folder={sample_ct / 'msd_spleen'}"]
    proc = run_build(repo_root, *args, check=2)
    assert "btcv=" in proc.stderr and "no case found (expected layout: RawData" in proc.stderr and "--allow-empty" in proc.stderr
    assert not (tmp_path / "o" / ".state").exists()
    run_build(repo_root, *args, "--allow-empty")
    rejections = [json.loads(line) for line in (tmp_path / "o" / "rejections.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejections] == [("btcv", "no_case_found")]


def test_unreadable_folder_and_extensionless_dicom_are_failures(tmp_path, repo_root, real_data, sample_ct, as_unprivileged):
    """chmod 000 on a sub-folder and on an extension-less DICOM file: both are in failures.jsonl, exit code 1. Root
    reads anything, so as root the build runs without the capabilities that bypass file permissions."""
    tree = tmp_path / "tree"
    shutil.copytree(sample_ct / "msd_spleen", tree / "spleen", ignore=shutil.ignore_patterns("*.json"))
    shutil.copytree(real_data / "dcmqi_ct3slice" / "dicom", tree / "locked")
    (tree / "series").mkdir()
    for i, f in enumerate(sorted((real_data / "dcmqi_ct3slice" / "dicom").glob("*.dcm"))):
        shutil.copy(f, tree / "series" / f"IM{i:04d}")
    os.chmod(tree / "locked", 0)
    os.chmod(tree / "series" / "IM0001", 0)
    out = tmp_path / "out"
    try:
        proc = subprocess.run([*as_unprivileged, sys.executable, *SCRIPT, "--workers", "0", "--out", str(out), "--root", f"folder={tree}"],
                              cwd=repo_root, capture_output=True, text=True, timeout=600)
    finally:
        os.chmod(tree / "locked", 0o755)
        os.chmod(tree / "series" / "IM0001", 0o644)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((Path(f["file"]).name, f["reason"]) for f in failures) == [("IM0001", "unreadable"), ("locked", "unreadable")]
    assert all("Permission denied" in f["detail"] for f in failures)
    cases = {m["case"] for _, m in read_samples(out).values()}
    assert cases == {"spleen_sub-spleen2_ct", "series"}  # the readable files of the series are still used


def test_nbia_download_tree_gets_short_stable_keys(tmp_path, repo_root, real_data, run_build):
    """The NBIA downloader's folder names make case ids of ~100 characters: keys are shortened with a hash of the case
    id (under the 100-byte tar name limit, identical on every run) and the full path stays in the json and manifest."""
    rel = ("manifest-1599750808610/Pancreas-CT/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-99667/"
           "1.000000-Pancreas-99667-Abdomen-Venous-Phase")
    series = tmp_path / "nbia" / rel
    series.mkdir(parents=True)
    for i, f in enumerate(sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm"))):
        shutil.copy(f, series / f"1-{i + 1:03d}.dcm")
    out = tmp_path / "out"
    run_build(repo_root, "--out", str(out), "--root", f"folder={tmp_path / 'nbia'}")
    samples = read_samples(out)
    assert len(samples) == 3
    for key, (_, meta) in samples.items():
        assert len(f"{key}.json".encode()) <= 100 and key.startswith("folder-manifest-1599750808610_Pancreas-CT_PANCREAS_0001")
        assert meta["source_path"] == rel and meta["case"] == rel.replace("/", "_").replace(".", "_")
    with open(out / "manifest.csv") as fh:
        assert {r["source_path"] for r in csv.DictReader(fh)} == {rel}
    again = tmp_path / "again"
    run_build(repo_root, "--out", str(again), "--root", f"folder={tmp_path / 'nbia'}")
    assert sorted(read_samples(again)) == sorted(samples)


def test_config_typos_and_wrong_types_are_errors(tmp_path, repo_root):
    default = repo_root / "configs/data/ct3m.yaml"
    with pytest.raises(SystemExit, match=r"^error: command line: unknown config key output.samples_per_shrd \(did you mean output.samples_per_shard\?\)$"):
        main(["--dry-run", "output.samples_per_shrd=3"])
    with pytest.raises(ConfigError, match=r"command line: geometry.output_size=256 is a number, but geometry.output_size takes a list"):
        load_settings(default, [], ["geometry.output_size=256"])
    copy = tmp_path / "mine.yaml"
    copy.write_text(default.read_text().replace("  min_slice_step_mm: null", "  min_slice_stepmm: 2.0"))
    with pytest.raises(ConfigError, match=rf"{copy}: unknown config key slices.min_slice_stepmm \(did you mean slices.min_slice_step_mm\?\)"):
        load_settings(copy)
    settings = load_settings(default, [], ["output.samples_per_shard=500", "slices.min_slice_step_mm=2.5", "geometry.output_size=null"])
    assert settings.output.samples_per_shard == 500 and settings.slices.min_slice_step_mm == 2.5 and settings.geometry.output_size is None


def test_rerun_rebuilds_a_deleted_or_cut_shard(tmp_path, repo_root, sample_tree, run_build):
    """After a finished build, a shard deleted or cut short is found by the next run of the same command, which
    curates and packs its group again: the shards are byte-identical to the original build."""
    out = tmp_path / "out"
    args = ["--out", str(out), "--root", f"folder={sample_tree}", "output.samples_per_shard=40"]
    run_build(repo_root, *args)
    before = {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")}
    (out / "ct3m-000001.tar").unlink()
    (out / "ct3m-000002.tar").write_bytes(before["ct3m-000002.tar"][:5000])
    proc = run_build(repo_root, *args)
    assert "2 shard(s) missing or changed since they were written (ct3m-000001.tar, ct3m-000002.tar)" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.glob("ct3m-*.tar")} == before


def test_out_that_is_not_writable_is_one_line(tmp_path, repo_root, sample_ct, as_unprivileged):
    """--out inside a read-only folder: one line, exit code 2, no traceback (as root: without CAP_DAC_OVERRIDE)."""
    parent = tmp_path / "readonly"
    parent.mkdir()
    os.chmod(parent, 0o555)
    proc = subprocess.run([*as_unprivileged, sys.executable, *SCRIPT, "--out", str(parent / "out"), "--root", f"folder={sample_ct / 'msd_spleen'}"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    os.chmod(parent, 0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"error: --out {parent / 'out'}: cannot write there (Permission denied)"
