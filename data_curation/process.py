"""One case -> staged slices: read, canonicalise, select, resample, drop near-empty slices, fingerprint.

Runs inside a worker process and holds at most one volume in memory. Output per accepted volume:
``<staging>/<volume id>.samples`` -- the finished samples (tar bytes of image + json, in slice order; the
packer copies them into shards unchanged) -- and a record (returned to the parent, which appends it to the state
file) with each sample's slice index and byte range, the dedup fingerprint and an HU histogram. Encoding happens
here, in the workers, so it scales with ``--workers``. Staging files are written atomically
(:func:`meddino_common.atomic.atomic_write`), so a kill never leaves a half-written staging file that looks complete.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import IO

import numpy as np

from data_curation.dedup import slice_descriptors, volume_fingerprint
from data_curation.geometry import is_near_empty, output_geometry, resample_slices, select_slices, to_canonical_axial
from data_curation.settings import CurationSettings
from data_curation.shards import encode_image_pieces, sample_json, sample_key, volume_id, write_sample
from meddino_common.atomic import atomic_write
from meddino_datasets.case import Case
from meddino_datasets.ct_sanity import SpacingCheck
from meddino_datasets.readers.common import ImageRejected, RawVolume
from meddino_datasets.readers.dicom import DicomPolicy, read_dicom_series
from meddino_datasets.readers.nifti import read_nifti

STAGING_SUFFIX = ".samples"
_INFO_KEYS = ("format", "gantry_tilt_deg", "resampled", "variable_spacing", "missing_slices", "obliquity_deg", "nonfinite_voxels")


class StagingWriteError(OSError):
    """Writing a staging file failed (disk full, quota, I/O error on the output side): the build must stop, not
    record the case as failed -- a re-run after the cause is fixed curates it again."""


@contextlib.contextmanager
def output_side(path: Path):
    """Turn an ``OSError`` raised while writing ``path`` (nothing else in the block touches files) into a
    :class:`StagingWriteError`; the partial temporary file is gone (``atomic_write`` removes it)."""
    try:
        yield
    except StagingWriteError:
        raise
    except OSError as err:
        raise StagingWriteError(err.errno, err.strerror, str(path)) from None


def read_case(case: Case, settings: CurationSettings) -> tuple[list[RawVolume], list[dict]]:
    """Reader dispatch -> (volumes, rejection dicts)."""
    if case.kind == "nifti":
        try:
            return [read_nifti(case.paths[0], settings.reading)], []
        except ImageRejected as err:
            return [], [err.rejection.as_dict()]
    if case.kind == "dicom":
        volumes, rejections = read_dicom_series(list(case.paths), DicomPolicy.from_config(settings.dicom, settings.reading))
        return volumes, [r.as_dict() for r in rejections]
    raise ValueError(f"unknown case kind {case.kind!r}")


def process_case(case: Case, settings: CurationSettings, staging_dir: str) -> dict:
    """Curate one case -> its journal record ``{case, source, volumes, rejections, seconds, read_seconds,
    cpu_seconds}``, one volume record per accepted volume (:func:`_stage_volume`). Never raises for bad input:
    problems come back in ``rejections``; only a failing output side raises (:class:`StagingWriteError`)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        raws, rejections = read_case(case, settings)
    except Exception as exc:  # a reader bug must not stop the run; it is reported as a failure of this case
        raws, rejections = [], [{"file": case.paths[0] if case.paths else case.uid, "reason": "internal_error",
                                 "detail": f"{type(exc).__name__}: {exc}", "filtered": False}]
    t_read = time.perf_counter() - t0
    volumes = []
    for raw in raws:
        case_name = f"{case.case_id}_{raw.volume_suffix}" if raw.volume_suffix else case.case_id
        try:
            volume = _stage_volume(case, case_name, raw, settings, Path(staging_dir))
        except StagingWriteError:
            raise
        except ImageRejected as err:
            rejections.append(err.rejection.as_dict())
            continue
        except Exception as exc:
            rejections.append({"file": case.paths[0], "reason": "internal_error", "detail": f"{type(exc).__name__}: {exc}", "filtered": False})
            continue
        volumes.append(volume)
        if volume["n_slices"] == 0:  # kept in the record (dedup, stats) but said out loud
            rejections.append({"file": case.paths[0], "reason": "no_slices_kept", "filtered": True,
                               "detail": f"{case_name}: all {volume['n_native_slices']} slices near-empty or sub-sampled out "
                                         f"(body above {settings.slices.body_threshold_hu:g} HU in < {settings.slices.min_body_fraction:g} of a slice)"})
    if not raws and not rejections:
        rejections.append({"file": case.paths[0] if case.paths else case.uid, "reason": "no_slices_kept", "detail": "no image found", "filtered": True})
    return {"case": case.uid, "source": case.source, "volumes": volumes, "rejections": rejections,
            "seconds": round(time.perf_counter() - t0, 3), "read_seconds": round(t_read, 3),
            "cpu_seconds": round(time.process_time() - cpu0, 3)}


def _stage_volume(case: Case, case_name: str, raw: RawVolume, settings: CurationSettings, staging: Path) -> dict:
    """Canonicalise, select, resample, skip empties, fingerprint -- and encode every kept slice straight into its
    final sample bytes (image + json in tar form, :func:`data_curation.shards.write_sample`) in a staging file, so
    the packer only concatenates byte ranges. Holds the volume plus one batch of ``run.slice_batch`` slices."""
    vol = to_canonical_axial(raw)
    del raw
    low, high = settings.reading["spacing_range_mm"]
    problem = SpacingCheck(float(low), float(high)).problem((vol.slice_spacing_mm, *vol.spacing_mm))
    if problem:
        raise ImageRejected(case.paths[0] if case.kind == "nifti" else str(Path(case.paths[0]).parent), "implausible_spacing",
                            f"{problem}; set reading.spacing_range_mm to accept it")
    z, h, w = vol.array.shape
    geo, sl, out_cfg = settings.geometry, settings.slices, settings.output
    fmt, level = out_cfg.image_format, out_cfg.png_compress_level
    out_hw, out_spacing, crop_to = output_geometry((h, w), vol.spacing_mm, geo)
    selected = np.zeros(z, dtype=bool)
    selected[select_slices(vol.positions_mm, sl.min_slice_step_mm)] = True
    grid = settings.dedup.grid
    batch = settings.run.slice_batch
    bins = settings.hu_histogram  # a statistic: every pixel_step-th pixel per axis is plenty
    hist_lo, hist_hi, hist_bin, hist_step = bins.min, bins.max, bins.bin, bins.pixel_step
    hist = np.zeros(bins.n_bins, dtype=np.int64)
    uid = f"{case.source}/{case_name}"
    pos = vol.positions_mm
    gaps = np.diff(pos)

    def local_gap(i: int) -> float:
        near = [gaps[j] for j in (i - 1, i) if 0 <= j < len(gaps)]
        return round(float(min(near)), 4) if near else round(vol.slice_spacing_mm, 4)

    common = {
        "source": case.source,
        "case": case_name,
        "spacing_mm": [round(out_spacing[0], 5), round(out_spacing[1], 5)],
        "original_spacing_mm": [round(vol.spacing_mm[0], 5), round(vol.spacing_mm[1], 5)],
        "original_shape": [h, w],
        "volume_shape": [z, h, w],
        "orientation": "LPS",
        "dtype": "int16",
        "units": "HU",
        "image_format": fmt,
        "source_path": case.source_path,
    }
    common.update({k: vol.info[k] for k in _INFO_KEYS if k in vol.info})
    descriptors = []
    slices: list[list[int]] = []  # [slice_index, byte offset, byte size] of each sample in the staging file
    n_empty = offset = 0
    name = volume_id(case.source, case_name)  # short enough for any filesystem
    path = staging / f"{name}{STAGING_SUFFIX}"

    def write_samples(fh: IO[bytes]) -> None:
        """Every kept slice, each sample one ``writev`` at the file's descriptor (no copy through a buffer)."""
        nonlocal n_empty, offset
        for b0 in range(0, z, batch):
            native = vol.array[b0:b0 + batch]
            descriptors.append(slice_descriptors(native, grid[1:]))
            idx = np.flatnonzero(selected[b0:b0 + len(native)])
            if not len(idx):
                continue
            src = native if len(idx) == len(native) else native[idx]
            out = resample_slices(src, out_hw, crop_to, geo)  # any strides: every path reads it once into a new array
            keep = ~is_near_empty(out, sl.body_threshold_hu, sl.min_body_fraction) if sl.skip_empty else np.ones(len(out), bool)
            n_empty += int(len(out) - keep.sum())
            if not keep.any():
                continue
            values = np.clip(out[keep, ::hist_step, ::hist_step], hist_lo, hist_hi - 1).ravel().astype(np.intp)
            values -= hist_lo
            hist[:] += np.bincount(values, minlength=hist_hi - hist_lo).reshape(len(hist), hist_bin).sum(axis=1)  # 1-HU counts -> bins
            for j in np.flatnonzero(keep):
                i = int(b0 + idx[j])
                key = sample_key(case.source, case_name, i)
                meta = dict(common, key=key, slice_index=i, slice_position_mm=round(float(pos[i]), 4), slice_spacing_mm=local_gap(i))
                ext, image = encode_image_pieces(out[j], fmt, level)
                size = write_sample(fh.fileno(), key, {ext: image, "json": sample_json(meta)})
                slices.append([i, offset, size])
                offset += size

    with output_side(path):  # kill -9 needs no fsync (run.fsync_staging); the builder re-verifies staging files' sizes
        atomic_write(path, write_samples, fsync=settings.run.fsync_staging)
    fp = volume_fingerprint(uid, np.concatenate(descriptors), (z, h, w), (vol.slice_spacing_mm, *vol.spacing_mm), grid[0])
    return {
        "uid": uid,
        "source": case.source,
        "case": case_name,
        "source_path": case.source_path,
        "staging": f"{name}{STAGING_SUFFIX}",
        "staging_bytes": offset,
        "n_slices": len(slices),
        "n_native_slices": int(z),
        "n_empty_skipped": n_empty,
        "n_subsampled_out": int(z - selected.sum()),
        "slices": slices,
        "fingerprint": fp.as_dict(),
        "hu_histogram": hist.tolist(),
    }
