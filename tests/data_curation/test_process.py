"""One case through the worker's pipeline on real CT: finished samples at their byte ranges, slice selection, bad input
and implausible geometry reported in the record, a full disk stopping the build without a partial file."""
from __future__ import annotations

import errno
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_curation.geometry import output_geometry, resample_slices, to_canonical_axial
from data_curation.process import STAGING_SUFFIX, StagingWriteError, process_case
from meddino_datasets.readers.nifti import read_nifti
from data_curation.shards import decode_image
from data_curation.settings import load_settings
from meddino_datasets.case import Case

SETTINGS = load_settings()  # the shipped configs/data/ct3m.yaml


def _resaved(src: Path, dst: Path, zooms=None, data=None) -> Path:
    img = nib.load(str(src))
    array = np.asanyarray(img.dataobj) if data is None else data
    affine = img.affine.copy()
    if zooms is not None:
        affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(zooms)
    nib.save(nib.Nifti1Image(array, affine), str(dst))
    return dst


def test_100mm_voxels_are_refused(tmp_path, real_data):
    path = _resaved(real_data / "totalsegmentator" / "example_ct_sm.nii.gz", tmp_path / "huge.nii.gz", zooms=(100.0, 100.0, 3.0))
    record = process_case(Case("huge", Path(path), source="folder"), SETTINGS, str(tmp_path))
    assert record["volumes"] == []
    [rej] = record["rejections"]
    assert (rej["reason"], rej["filtered"]) == ("implausible_spacing", False)
    assert "voxel spacing (3, 100, 100) mm is outside the plausible CT range [0.05, 20] mm" in rej["detail"]


def test_volume_without_a_kept_slice_is_reported(tmp_path, real_data):
    """A real CT whose every slice is air (the body replaced by -1000 HU) keeps 0 slices: logged as
    ``no_slices_kept``, not a silent "0 slices"."""
    src = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    air = np.full(nib.load(str(src)).shape, -1000, np.int16)
    air[0, 0, :] = 500  # a few non-air voxels: still a CT by the intensity rule, no slice has a body
    path = _resaved(src, tmp_path / "air.nii.gz", data=air)
    record = process_case(Case("air", Path(path), source="folder"), SETTINGS, str(tmp_path))
    assert record["volumes"][0]["n_slices"] == 0
    assert [(r["reason"], r["filtered"]) for r in record["rejections"]] == [("no_slices_kept", True)]


def _spleen_case(sample_ct: Path) -> Case:
    return Case("spleen", sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz", source="folder",
                source_path="spleen.nii.gz")


def _samples(staging: Path, volume: dict) -> dict[str, dict[str, bytes]]:
    """The staged samples of one volume record, each byte range read as the tar members it holds."""
    data = (staging / volume["staging"]).read_bytes()
    assert len(data) == volume["staging_bytes"]
    out = {}
    for slice_index, offset, size in volume["slices"]:
        with tarfile.open(fileobj=io.BytesIO(data[offset:offset + size] + bytes(1024))) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        key = {name.split(".")[0] for name in members}.pop()
        out[key] = {name.split(".", 1)[1]: blob for name, blob in members.items()}
        assert json.loads(out[key]["json"])["slice_index"] == slice_index
    return out


def test_real_ct_is_staged_as_finished_samples(tmp_path, sample_ct):
    """The embedded MSD spleen CT (26 slices of 164x166 at 0.79 mm, 5 mm apart): each kept slice is one finished
    sample (npy + json, tar bytes) at its recorded byte range, its pixels those of the configured 256x256 resize of the
    canonical slice; the counts add up; the HU histogram counts every 4th pixel per axis; no temporary file is left."""
    record = process_case(_spleen_case(sample_ct), SETTINGS, str(tmp_path))
    assert record["rejections"] == [] and record["case"] == "folder/spleen"
    [vol] = record["volumes"]
    assert vol["n_native_slices"] == 26 and vol["n_slices"] + vol["n_empty_skipped"] + vol["n_subsampled_out"] == 26
    assert vol["n_slices"] > 20 and vol["n_subsampled_out"] == 0
    assert sum(vol["hu_histogram"]) == vol["n_slices"] * 64 * 64 and len(vol["hu_histogram"]) == SETTINGS.hu_histogram.n_bins
    samples = _samples(tmp_path, vol)
    assert sorted(samples) == [f"folder-spleen-{i:05d}" for i, _, _ in vol["slices"]]
    canonical = to_canonical_axial(read_nifti(_spleen_case(sample_ct).paths[0], SETTINGS.reading))
    out_hw, spacing, crop = output_geometry(canonical.array.shape[1:], canonical.spacing_mm, SETTINGS.geometry)
    for i, _, _ in vol["slices"][::7]:
        fields = samples[f"folder-spleen-{i:05d}"]
        meta = json.loads(fields["json"])
        assert meta["source_path"] == "spleen.nii.gz" and meta["orientation"] == "LPS" and meta["units"] == "HU"
        assert meta["spacing_mm"] == [round(s, 5) for s in spacing] and meta["original_shape"] == [166, 164]
        np.testing.assert_array_equal(decode_image("npy", fields["npy"]),
                                      resample_slices(canonical.array[i:i + 1], out_hw, crop, SETTINGS.geometry)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [vol["staging"]]


def test_min_slice_step_subsamples_thin_slices(tmp_path, sample_ct):
    """``slices.min_slice_step_mm: 10`` on 5 mm slices keeps every other slice."""
    settings = replace(SETTINGS, slices=replace(SETTINGS.slices, min_slice_step_mm=10.0))
    [vol] = process_case(_spleen_case(sample_ct), settings, str(tmp_path))["volumes"]
    assert vol["n_subsampled_out"] == 13 and all(i % 2 == 0 for i, _, _ in vol["slices"])


def test_full_disk_stops_with_a_staging_error_and_no_partial_file(tmp_path, sample_ct, disk_full_after):
    """Out of space while staging: the case is not recorded as bad input (StagingWriteError, an OSError naming the
    staging file) and no half-written file stays behind."""
    disk_full_after(3)
    with pytest.raises(StagingWriteError) as err:
        process_case(_spleen_case(sample_ct), SETTINGS, str(tmp_path))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / f"folder-spleen{STAGING_SUFFIX}")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_and_reader_bug_are_failures_of_the_case(tmp_path, sample_ct, monkeypatch):
    """A truncated real .nii.gz is ``unreadable``; an exception inside a reader is ``internal_error`` naming it. Both
    come back in the record (the build goes on), neither leaves a staging file."""
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes((sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz").read_bytes()[:3000])
    staging = tmp_path / "staging"
    staging.mkdir()
    record = process_case(Case("cut", Path(cut), source="folder"), SETTINGS, str(staging))
    assert record["volumes"] == [] and [(r["reason"], r["filtered"]) for r in record["rejections"]] == [("unreadable", False)]
    import data_curation.process as process

    def broken_reader(path, reading):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(process, "read_nifti", broken_reader)
    record = process_case(_spleen_case(sample_ct), SETTINGS, str(staging))
    assert [(r["reason"], r["detail"]) for r in record["rejections"]] == [("internal_error", "RuntimeError: decoder bug")]
    assert list(staging.iterdir()) == []


def test_dicom_series_case(tmp_path, sample_ct):
    """The embedded TotalSegmentator DICOM series (JPEG 2000, 512x512) through the DICOM reader: one volume whose
    samples say so in their json."""
    folder = sample_ct / "totalsegmentator_dicom" / "example_ct_dicom"
    files = tuple(sorted(str(p) for p in folder.iterdir()))
    series = Case("series", Path(files[0]).parent, source="folder", kind="dicom", dicom_files=tuple(files))
    record = process_case(series, SETTINGS, str(tmp_path))
    [vol] = record["volumes"]
    assert record["rejections"] == [] and vol["n_native_slices"] == len(files)
    meta = json.loads(next(iter(_samples(tmp_path, vol).values()))["json"])
    assert meta["format"] == "dicom" and meta["original_shape"] == [512, 512]
