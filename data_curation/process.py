"""One case -> staged slices: read, canonicalise, select, resample, drop near-empty slices, fingerprint.

Runs inside a worker process and holds at most one volume in memory. Output per accepted volume:
``<staging>/<source>__<case>.samples`` -- the finished samples (tar bytes of image + json, in slice order; the
packer copies them into shards unchanged) -- and a record (returned to the parent, which appends it to the state
file) with each sample's slice index and byte range, the dedup fingerprint and an HU histogram. Encoding happens
here, in the workers, so it scales with ``--workers``. Files are written under a temp name and renamed, so a kill
never leaves a half-written staging file that looks complete.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from data_curation.dedup import slice_descriptors, volume_fingerprint
from data_curation.geometry import is_near_empty, output_geometry, resample_slices, select_slices, to_canonical_axial
from data_curation.shards import encode_image_pieces, sample_json, sample_key, volume_id, write_sample
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
    :class:`StagingWriteError`; a partial ``*.tmp`` is deleted by the builder when it starts again."""
    try:
        yield
    except StagingWriteError:
        raise
    except OSError as err:
        raise StagingWriteError(err.errno, err.strerror, str(path)) from None


def read_case(case: Case, cfg: dict) -> tuple[list[RawVolume], list[dict]]:
    """Reader dispatch -> (volumes, rejection dicts)."""
    if case.kind == "nifti":
        try:
            return [read_nifti(case.paths[0], cfg["reading"])], []
        except ImageRejected as err:
            return [], [err.rejection.as_dict()]
    if case.kind == "dicom":
        volumes, rejections = read_dicom_series(list(case.paths), DicomPolicy.from_config(cfg["dicom"], cfg["reading"]))
        return volumes, [r.as_dict() for r in rejections]
    raise ValueError(f"unknown case kind {case.kind!r}")


def process_case(case: Case, cfg: dict, staging_dir: str) -> dict:
    """Curate one case. Never raises for bad input: problems come back in ``rejections``."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        raws, rejections = read_case(case, cfg)
    except Exception as exc:  # a reader bug must not stop the run; it is reported as a failure of this case
        raws, rejections = [], [{"file": case.paths[0] if case.paths else case.uid, "reason": "internal_error",
                                 "detail": f"{type(exc).__name__}: {exc}", "filtered": False}]
    t_read = time.perf_counter() - t0
    volumes = []
    for raw in raws:
        case_name = f"{case.case_id}_{raw.volume_suffix}" if raw.volume_suffix else case.case_id
        try:
            volume = _stage_volume(case, case_name, raw, cfg, Path(staging_dir))
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
                                         f"(body above {cfg['slices']['body_threshold_hu']} HU in < {cfg['slices']['min_body_fraction']} of a slice)"})
    if not raws and not rejections:
        rejections.append({"file": case.paths[0] if case.paths else case.uid, "reason": "no_slices_kept", "detail": "no image found", "filtered": True})
    return {"case": case.uid, "source": case.source, "volumes": volumes, "rejections": rejections,
            "seconds": round(time.perf_counter() - t0, 3), "read_seconds": round(t_read, 3),
            "cpu_seconds": round(time.process_time() - cpu0, 3)}


def _stage_volume(case: Case, case_name: str, raw: RawVolume, cfg: dict, staging: Path) -> dict:
    """Canonicalise, select, resample, skip empties, fingerprint -- and encode every kept slice straight into its
    final sample bytes (image + json in tar form, :func:`data_curation.shards.write_sample`) in a staging file, so
    the packer only concatenates byte ranges. Holds the volume plus one batch of ``run.slice_batch`` slices."""
    vol = to_canonical_axial(raw)
    del raw
    low, high = cfg["reading"]["spacing_range_mm"]
    problem = SpacingCheck(float(low), float(high)).problem((vol.slice_spacing_mm, *vol.spacing_mm))
    if problem:
        raise ImageRejected(case.paths[0] if case.kind == "nifti" else str(Path(case.paths[0]).parent), "implausible_spacing",
                            f"{problem}; set reading.spacing_range_mm to accept it")
    z, h, w = vol.array.shape
    geo = cfg["geometry"]
    sl_cfg = cfg["slices"]
    out_cfg = cfg["output"]
    fmt = out_cfg["image_format"]
    level = int(out_cfg.get("png_compress_level", 1))
    out_hw, out_spacing, crop_to = output_geometry((h, w), vol.spacing_mm, geo)
    selected = np.zeros(z, dtype=bool)
    selected[select_slices(vol.positions_mm, sl_cfg.get("min_slice_step_mm"))] = True
    skip_empty = bool(sl_cfg.get("skip_empty", True))
    grid = tuple(cfg["dedup"]["grid"])
    batch = int(cfg["run"]["slice_batch"])
    hist_cfg = cfg["stats"]["hu_histogram"]
    hist_lo, hist_hi, hist_bin = int(hist_cfg["min"]), int(hist_cfg["max"]), int(hist_cfg["bin"])
    hist_step = int(hist_cfg.get("pixel_step", 1))  # a statistic: every step-th pixel per axis is plenty
    hist = np.zeros((hist_hi - hist_lo) // hist_bin, dtype=np.int64)
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
    tmp = staging / f"{name}{STAGING_SUFFIX}.tmp"
    with output_side(tmp), open(tmp, "wb", buffering=0) as fh:  # unbuffered: each sample is one writev from the slice
        for b0 in range(0, z, batch):
            native = vol.array[b0:b0 + batch]
            descriptors.append(slice_descriptors(native, grid[1:]))
            idx = np.flatnonzero(selected[b0:b0 + len(native)])
            if not len(idx):
                continue
            src = native if len(idx) == len(native) else native[idx]
            out = resample_slices(src, out_hw, crop_to, geo)  # any strides: every path reads it once into a new array
            keep = ~is_near_empty(out, float(sl_cfg["body_threshold_hu"]), float(sl_cfg["min_body_fraction"])) if skip_empty else np.ones(len(out), bool)
            n_empty += int(len(out) - keep.sum())
            if not keep.any():
                continue
            values = np.clip(out[keep, ::hist_step, ::hist_step], hist_lo, hist_hi - 1).ravel().astype(np.intp)
            values -= hist_lo
            hist += np.bincount(values, minlength=hist_hi - hist_lo).reshape(len(hist), hist_bin).sum(axis=1)  # 1-HU counts -> bins
            for j in np.flatnonzero(keep):
                i = int(b0 + idx[j])
                key = sample_key(case.source, case_name, i)
                meta = dict(common, key=key, slice_index=i, slice_position_mm=round(float(pos[i]), 4), slice_spacing_mm=local_gap(i))
                ext, image = encode_image_pieces(out[j], fmt, level)
                size = write_sample(fh.fileno(), key, {ext: image, "json": sample_json(meta)})
                slices.append([i, offset, size])
                offset += size
        if cfg["run"].get("fsync_staging", False):  # kill -9 needs no fsync; the builder re-verifies staging files
            os.fsync(fh.fileno())
    with output_side(tmp):
        os.replace(tmp, staging / f"{name}{STAGING_SUFFIX}")
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
