"""NIfTI: the file-name rule both sides use (:data:`NIFTI_SUFFIXES`), and curation's CT reader: nibabel, affine
kept as-is, HU as int16, read slab by slab so a float64 copy never exists.

nibabel already picks the sform/qform the way the NIfTI standard says; we only reject what cannot be a CT
volume (not 3-D, singular affine) and convert intensities (int or float, scaled or not; NaN/inf -> fill value).

Gzipped files (almost every CT-3M source ships ``.nii.gz``) are streamed through ISA-L's gzip decoder (``isal``)
when it is installed: inflating is most of the cost of reading a CT volume, and ISA-L inflates the same bytes 2-3x
faster than the zlib behind Python's ``gzip`` (measured in ``benchmarks/curation.py``). nibabel still parses the
header and slices the voxel data; only the decompressing file object differs. Without ``isal`` (or for a file
that is not a NIfTI-1/2 header), ``nib.load`` reads it as usual.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np

try:  # optional speed-up; the project depends on it, but the reader works without it
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _igzip = None

from meddino_datasets.ct_sanity import CtIntensityCheck
from meddino_datasets.readers.common import HuCheck, ImageRejected, RawVolume, to_int16_hu

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``amos_0001.nii.gz`` -> ``amos_0001`` (other names unchanged)."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_nifti(path: str | Path, reading_cfg: dict) -> RawVolume:
    """Read one NIfTI CT volume -> :class:`RawVolume` (``data`` int16 ``[I,J,K]``, voxel->RAS ``affine``).

    Raises :class:`ImageRejected` (``unreadable``, ``not_3d``, ``bad_affine``, ``all_nonfinite``, ``hu_out_of_range``,
    ``not_ct_intensity``: NIfTI carries no modality, so an MR slipped into a CT folder is caught by its missing air).
    """
    path = str(path)
    with contextlib.ExitStack() as stack:
        try:
            img = open_nifti(path, stack)
        except Exception as exc:  # nibabel raises many types for broken headers; a truncated gzip raises EOFError
            raise ImageRejected(path, "unreadable", f"nibabel cannot open it ({type(exc).__name__}: {exc})") from None
        return _read(path, img, reading_cfg)


_NIFTI_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # sizeof_hdr, the first field of the header


def open_nifti(path: str, stack: contextlib.ExitStack):
    """The nibabel image of ``path``; a gzipped NIfTI-1/2 file is read through ISA-L (closed by ``stack``). Public for
    ``benchmarks/curation.py``, whose decode-only baseline reads with this reader's decoder."""
    if _igzip is None or not path.endswith(".gz"):
        return nib.load(path, keep_file_open=True)
    fobj = stack.enter_context(_igzip.open(path, "rb"))
    head = fobj.read(4)
    klass = _NIFTI_HEADER_SIZES.get(int.from_bytes(head, "little")) or _NIFTI_HEADER_SIZES.get(int.from_bytes(head, "big"))
    if klass is None:  # not a NIfTI header (e.g. a gzipped Analyze or MGH file): let nibabel sniff the format
        return nib.load(path, keep_file_open=True)
    fobj.seek(0)
    return klass.from_file_map(klass.make_file_map({"image": fobj}))


def _read(path: str, img, reading_cfg: dict) -> RawVolume:
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise ImageRejected(path, "not_3d", f"shape {tuple(img.shape)}; expected a 3-D CT volume")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ImageRejected(path, "bad_affine", "affine is singular or not finite")

    check = HuCheck.from_cfg(reading_cfg["hu_sanity"])
    fill = int(reading_cfg["nan_fill_hu"])
    out = np.empty(shape, dtype=np.int16, order="F")  # F order: every axial slice [.., .., k] is contiguous
    slab = max(1, int(reading_cfg["nifti_slab_slices"]))
    n_nonfinite = 0
    air = CtIntensityCheck(float(reading_cfg["air_threshold_hu"]), float(reading_cfg["min_air_fraction"]))
    n_air = 0
    proxy = img.dataobj
    try:
        for k0 in range(0, shape[2], slab):
            k1 = min(shape[2], k0 + slab)
            chunk = np.asanyarray(proxy[:, :, k0:k1] if len(img.shape) == 3 else proxy[:, :, k0:k1, 0])
            if np.issubdtype(chunk.dtype, np.floating):
                finite = np.isfinite(chunk)
                check.update(chunk[finite] if not finite.all() else chunk)
            else:
                check.update(chunk)
            out[:, :, k0:k1], n_bad = to_int16_hu(chunk, fill)
            if air.min_air_fraction > 0:
                n_air += air.count_air(out[:, :, k0:k1])
            n_nonfinite += n_bad
    except ImageRejected:
        raise
    except Exception as exc:  # truncated gzip, short file...
        raise ImageRejected(path, "unreadable", f"voxel data cannot be read ({type(exc).__name__}: {exc})") from None
    finally:
        img.uncache()
        del proxy
    if n_nonfinite == out.size:
        raise ImageRejected(path, "all_nonfinite", f"every one of the {out.size} voxels is NaN or Inf")
    check.verify(path)
    problem = air.problem(n_air, out.size)
    if problem:
        raise ImageRejected(path, "not_ct_intensity", f"{problem}. Set reading.min_air_fraction: 0 to accept it")
    info = {"format": "nifti", "source_dtype": str(img.get_data_dtype())}
    if n_nonfinite:
        info["nonfinite_voxels"] = n_nonfinite
    return RawVolume(out, affine, None, info)
