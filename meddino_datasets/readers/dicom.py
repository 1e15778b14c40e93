"""THE DICOM reader: files of one folder -> accepted series as :class:`RawVolume` + logged rejections.

One reader, two policies (:class:`DicomPolicy`): curation's (``DicomPolicy.from_config`` on ``configs/data/ct3m.yaml``)
takes axial CT in HU only and repairs what it can (de-shears gantry tilt, keeps variable spacing with exact
positions); prediction's (:data:`PREDICTION`, ``finetune/predict.py``) takes a scan of any orientation and
modality a user hands a model, keeps the values as float32, keeps gantry tilt in the affine, and refuses a stack it
cannot describe with one affine (variable spacing, missing slices). :func:`read_dicom_folder` picks the largest
accepted series of a folder. Everything below follows the policy where it names one.

Pipeline (each step names its rejection reason, see ``FILTERED_REASONS`` for the ones that are by design):

1. Header of every file (each file is read once, and its pixels are decoded right away while the bytes are still
   in the CPU cache -- unless its orientation already dooms its series, step 3). Not a DICOM -> ``unreadable``; cut
   short -> ``truncated``; zero or negative PixelSpacing -> ``bad_geometry``; SEG / RT objects ->
   ``seg_object`` / ``rt_object``; modality outside ``policy.modalities`` -> ``not_ct``; colour (RGB screenshots, dose pages) ->
   ``not_grayscale``; localizer / scout / surview -> ``localizer``; derived maps (perfusion, MIP...) ->
   ``derived_map``; CT-labelled secondary captures -> ``secondary_capture``; missing geometry -> ``no_geometry``.
   Enhanced (multi-frame) CT is read frame by frame from the functional groups (position, orientation,
   spacing, rescale found only there).
2. Group by SeriesInstanceUID + matrix size + orientation; each group is one candidate volume.
3. Orientation: the slice normal must be within ``max_tilt_deg`` of the patient z axis, else ``not_axial``.
4. Decode pixels (compressed syntaxes through pylibjpeg/gdcm; a missing decoder -> ``no_decoder`` with the pip
   command), apply RescaleSlope/Intercept, mask PixelPaddingValue (and PixelPaddingRangeLimit) to
   ``padding_fill_hu``, HU sanity check (when the policy has one) -> ``hu_out_of_range`` for the file.
5. Sort along the normal; identical duplicate positions are dropped (``duplicate_slice``), conflicting ones
   reject the series (``duplicate_position_conflict``); missing slices and variable spacing are detected and
   recorded (policy ``keep``/``reject``), per-slice positions are kept so the spacing stays exact.
6. Gantry tilt (slice stack sheared relative to its own normal): policy ``resample`` (curation) shifts each slice
   in-plane so the stack becomes an orthogonal grid in the tilted frame -- the acquired slice is only moved,
   never re-sliced, so its pixels stay the scanner's; ``affine`` (prediction) keeps the pixels where they are
   and puts the shear into the affine's slice column (a prediction written with it overlays the series);
   or ``reject`` (``gantry_tilt``).

No patient-identifying attribute is read into anything that is returned or logged: only geometry, pixel
encoding, ImageType and SOP class.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.uid import UID

from meddino_datasets.readers.common import LPS_TO_RAS, HuCheck, ImageRejected, RawVolume, Rejection, to_int16_hu

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_PREFIX = "1.2.840.10008.5.1.4.1.1.481"
_DECODER_HINT = (
    "install a decoder: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg (JPEG, JPEG-LS, JPEG 2000) "
    "or pip install python-gdcm"
)


@dataclass(frozen=True)
class DicomPolicy:
    """What the reader accepts and how it assembles a series (see the module docstring for each step).

    ``modalities``: accepted Modality tags (``None``: any image modality; SEG/RT objects are never images).
    ``hu_sanity``: ``(low, high, slack, max_outside_fraction)`` of :class:`HuCheck`, or ``None`` for no check.
    ``as_int16``: values rounded to int16 (HU) or kept as float32. ``gantry_tilt``: ``resample`` | ``affine`` |
    ``reject``. ``on_variable_spacing`` / ``on_missing_slices``: ``keep`` | ``reject``.
    """

    modalities: Optional[tuple[str, ...]]
    localizer_tokens: tuple[str, ...]
    reject_image_type_tokens: tuple[str, ...]
    max_tilt_deg: float
    gantry_tilt: str
    shear_tol_px: float
    duplicate_tol_mm: float
    spacing_rel_tol: float
    on_variable_spacing: str
    on_missing_slices: str
    min_slices: int
    padding_fill_hu: int
    hu_sanity: Optional[tuple[float, float, float, float]]
    as_int16: bool

    def __post_init__(self) -> None:
        for name, allowed in (("gantry_tilt", ("resample", "affine", "reject")), ("on_variable_spacing", ("keep", "reject")),
                              ("on_missing_slices", ("keep", "reject"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"dicom.{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        if self.gantry_tilt == "resample" and not self.as_int16:
            raise ValueError("dicom.gantry_tilt=resample moves int16 HU slices; it needs as_int16")

    @classmethod
    def from_config(cls, dicom_cfg: dict, reading_cfg: dict) -> "DicomPolicy":
        """Curation's policy: the ``dicom:`` and ``reading:`` sections of ``configs/data/ct3m.yaml`` (CT in HU only)."""
        hu = reading_cfg["hu_sanity"]
        return cls(
            modalities=("CT",),
            localizer_tokens=tuple(dicom_cfg["localizer_tokens"]),
            reject_image_type_tokens=tuple(dicom_cfg["reject_image_type_tokens"]),
            max_tilt_deg=float(dicom_cfg["max_tilt_deg"]),
            gantry_tilt=str(dicom_cfg["gantry_tilt"]),
            shear_tol_px=float(dicom_cfg["shear_tol_px"]),
            duplicate_tol_mm=float(dicom_cfg["duplicate_tol_mm"]),
            spacing_rel_tol=float(dicom_cfg["spacing_rel_tol"]),
            on_variable_spacing=str(dicom_cfg["on_variable_spacing"]),
            on_missing_slices=str(dicom_cfg["on_missing_slices"]),
            min_slices=int(dicom_cfg["min_slices"]),
            padding_fill_hu=int(reading_cfg["padding_fill_hu"]),
            hu_sanity=(float(hu["low"]), float(hu["high"]), float(hu["slack"]), float(hu["max_outside_fraction"])),
            as_int16=True,
        )


#: Prediction on a user's scan (``finetune/predict.py``): the model's own checks (modality, spacing, memory) come
#: after reading, so the reader takes any orientation and modality and keeps float values. A stack one affine cannot
#: describe is refused: gaps may differ by at most 1 % (variable spacing and missing slices would put predicted
#: labels at the wrong height), positions closer than 1 micrometre are duplicates. Padding becomes -1024 (air).
PREDICTION = DicomPolicy(
    modalities=None, localizer_tokens=(), reject_image_type_tokens=(), max_tilt_deg=90.0, gantry_tilt="affine",
    shear_tol_px=0.05, duplicate_tol_mm=1e-3, spacing_rel_tol=0.01, on_variable_spacing="reject",
    on_missing_slices="reject", min_slices=1, padding_fill_hu=-1024, hu_sanity=None, as_int16=False,
)


@dataclass
class Frame:
    """One 2-D CT image: a classic single-frame file or one frame of an enhanced multi-frame file."""

    path: str
    frame: int | None
    series_key: str
    rows: int
    cols: int
    iop: np.ndarray  # (6,) row direction (along columns index), column direction (along rows index), LPS
    ipp: np.ndarray  # (3,) LPS mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slope: float
    intercept: float
    dataset: object = None  # the file's pydicom Dataset until its pixels are decoded (then released)
    hu: np.ndarray | None = None  # [rows, cols] int16 HU (float32 under a float policy) once decoded
    error: Rejection | None = None  # why the pixels of this frame are unusable (reported if its series is assembled)


def _tokens(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip().upper() for t in value.split("\\")]
    return [str(t).strip().upper() for t in value]


def _first(seq_owner, *names):
    """Walk nested single-item sequences, e.g. ``_first(fg, "PlanePositionSequence", "ImagePositionPatient")``."""
    obj = seq_owner
    for name in names:
        if obj is None or name not in obj:
            return None
        obj = obj[name].value
        if isinstance(obj, pydicom.Sequence):
            if len(obj) == 0:
                return None
            obj = obj[0]
    return obj


def _truncation(ds, caught: list) -> str:
    """Why a file pydicom read without an exception is nevertheless cut short ("" when it is whole). pydicom stops
    quietly at the end of a truncated file: inside the pixel data it warns and returns an empty dataset; inside the
    header it returns the elements read so far -- which would look like "Modality missing" or "no pixel data"."""
    if any("end of file" in str(w.message).lower() for w in caught):
        return "the file ends inside its data (truncated copy?)"
    announced = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if announced and "SOPClassUID" not in ds:
        return f"the file meta announces SOP class {announced} but the dataset stops before it (truncated copy?)"
    if announced in (CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT) and ("PixelData" not in ds or "Modality" not in ds):
        return "a CT image file without pixel data or Modality: the file ends early (truncated copy?)"
    return ""


def _headers(path: str, policy: DicomPolicy) -> list[Frame] | Rejection:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)  # whole file once: header and pixel bytes
    except Exception as exc:
        return Rejection(path, "unreadable", f"not a readable DICOM file ({type(exc).__name__})")
    cut = _truncation(ds, caught)
    if cut:
        return Rejection(path, "truncated", cut)
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    image_type = _tokens(ds.get("ImageType"))
    if sop == SEG_STORAGE or modality == "SEG":
        return Rejection(path, "seg_object", "DICOM-SEG segmentation, not an image")
    if sop.startswith(RT_PREFIX) or modality.startswith("RT"):
        return Rejection(path, "rt_object", f"radiotherapy object (Modality={modality})")
    if policy.modalities is not None and modality not in policy.modalities:
        return Rejection(path, "not_ct", f"Modality={modality or 'missing'}")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
        return Rejection(path, "not_grayscale", f"SamplesPerPixel={ds.get('SamplesPerPixel')}, "
                         f"PhotometricInterpretation={ds.get('PhotometricInterpretation')} (screenshot / dose page)")
    localizer = [t for t in image_type if any(k in t for k in policy.localizer_tokens)]
    if localizer:
        return Rejection(path, "localizer", f"ImageType={'/'.join(image_type)}")
    derived = [t for t in image_type if t in set(policy.reject_image_type_tokens)]
    if derived:
        return Rejection(path, "derived_map", f"ImageType={'/'.join(image_type)}: derived map, values are not HU")
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return Rejection(path, "secondary_capture", "Secondary Capture labelled CT: no reliable geometry or HU")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return Rejection(path, "not_image", "no pixel data")
    series = str(ds.get("SeriesInstanceUID", "")) or "no-series-uid"
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if sop in (ENHANCED_CT, LEGACY_ENHANCED_CT) or "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, path, series, rows, cols, policy)
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        ps = ds.PixelSpacing
        spacing = (float(ps[0]), float(ps[1]))
    except (AttributeError, TypeError, ValueError, IndexError):
        return Rejection(path, "no_geometry", "ImageOrientationPatient, ImagePositionPatient or PixelSpacing missing")
    if not min(spacing) > 0:
        return _bad_spacing(path, spacing)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return [Frame(path, None, series, rows, cols, iop, ipp, spacing, slope, intercept, ds)]


def _bad_spacing(path: str, spacing: tuple[float, float]) -> Rejection:
    """PixelSpacing is a distance: a zero or negative value is a broken header. Taking it at face value would lay
    the pixels out mirrored while the slices are still labelled LPS, so the file is refused."""
    return Rejection(path, "bad_geometry", f"PixelSpacing {spacing[0]:g}\\{spacing[1]:g} mm: must be positive")


def _enhanced_frames(ds, path: str, series: str, rows: int, cols: int, policy: DicomPolicy) -> list[Frame] | Rejection:
    """Per-frame geometry and rescale of an enhanced CT file; values absent from a frame come from the shared groups."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    n = int(ds.get("NumberOfFrames", len(per_frame) or 1))
    frames: list[Frame] = []
    for i in range(n):
        fg = per_frame[i] if i < len(per_frame) else None

        def look(*names):
            val = _first(fg, *names) if fg is not None else None
            return val if val is not None else _first(shared, *names)

        frame_type = _tokens(look("CTImageFrameTypeSequence", "FrameType"))
        if [t for t in frame_type if any(k in t for k in policy.localizer_tokens)]:
            return Rejection(path, "localizer", f"FrameType={'/'.join(frame_type)}")
        if [t for t in frame_type if t in set(policy.reject_image_type_tokens)]:
            return Rejection(path, "derived_map", f"FrameType={'/'.join(frame_type)}: values are not HU")
        iop, ipp, ps = look("PlaneOrientationSequence", "ImageOrientationPatient"), look("PlanePositionSequence", "ImagePositionPatient"), look("PixelMeasuresSequence", "PixelSpacing")
        if iop is None or ipp is None or ps is None:
            return Rejection(path, "no_geometry", f"frame {i}: plane position/orientation or pixel spacing missing from functional groups")
        slope = look("PixelValueTransformationSequence", "RescaleSlope")
        intercept = look("PixelValueTransformationSequence", "RescaleIntercept")
        slope = float(slope if slope is not None else ds.get("RescaleSlope", 1.0))
        intercept = float(intercept if intercept is not None else ds.get("RescaleIntercept", 0.0))
        if not min(float(ps[0]), float(ps[1])) > 0:
            return _bad_spacing(f"{path} [frame {i}]", (float(ps[0]), float(ps[1])))
        frames.append(Frame(path, i, series, rows, cols, np.asarray([float(v) for v in iop]), np.asarray([float(v) for v in ipp]),
                            (float(ps[0]), float(ps[1])), slope, intercept, ds))
    return frames


def _decode_file(path: str, ds=None) -> tuple[np.ndarray, "pydicom.Dataset"]:
    """Pixel array of one file (``[rows, cols]`` or ``[frames, rows, cols]``), raw stored values."""
    ds = ds if ds is not None else pydicom.dcmread(path)
    ts = ds.file_meta.get("TransferSyntaxUID") or UID("1.2.840.10008.1.2")
    if not isinstance(ts, UID):
        ts = UID(str(ts))
    if ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except Exception:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise ImageRejected(path, "no_decoder", f"transfer syntax {ts.name} ({ts}) is compressed and no decoder is installed; {_DECODER_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        raise ImageRejected(path, "decode_error", f"{ts.name}: {type(exc).__name__}: {exc}") from None
    return arr, ds


def _padding_mask(raw: np.ndarray, ds) -> np.ndarray | None:
    """Voxels equal to PixelPaddingValue (or inside [PixelPaddingValue, PixelPaddingRangeLimit]), in stored units.

    The padding value is compared in the stored (raw) domain; when its VR disagrees with PixelRepresentation
    (e.g. -2000 stored as US) it is reinterpreted with the data's bit width.
    """
    if "PixelPaddingValue" not in ds:
        return None
    pad = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    bits = raw.dtype.itemsize * 8
    if np.issubdtype(raw.dtype, np.unsignedinteger) and pad < 0:
        pad += 1 << bits
    elif np.issubdtype(raw.dtype, np.signedinteger) and pad >= 1 << (bits - 1):
        pad -= 1 << bits
    if limit is None:
        return raw == pad
    lim = int(limit)
    lo, hi = min(pad, lim), max(pad, lim)
    return (raw >= lo) & (raw <= hi)


def _to_hu(raw: np.ndarray, frame: Frame, ds, fill_hu: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Stored values -> (HU, its (min, max) when already known, else None). The usual CT case (integer pixels, slope
    1, integral intercept, every value within int16 before and after the shift) stays int16 with no intermediate
    copy, and its range is the stored range shifted (no second pass for the HU check); otherwise int32, or float64
    when the slope or intercept is not integral."""
    bounds = None
    if frame.slope == 1.0 and float(frame.intercept).is_integer() and np.issubdtype(raw.dtype, np.integer):
        shift = int(frame.intercept)
        lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if -32768 <= min(lo, lo + shift, shift) and max(hi, hi + shift, shift) <= 32767:
            hu = raw.astype(np.int16)
            hu += np.int16(shift)
        else:
            hu = raw.astype(np.int32) + shift
        bounds = (float(lo + shift), float(hi + shift))
    else:
        hu = raw.astype(np.float64) * frame.slope + frame.intercept
    mask = _padding_mask(raw, ds)
    if mask is not None and mask.any():
        np.copyto(hu, fill_hu, where=mask, casting="unsafe")
        bounds = None
    return hu, bounds


def _decode_frames(frames: list[Frame], policy: DicomPolicy) -> None:
    """Decode the pixels of one file's frames into ``Frame.hu`` (HU-checked when the policy checks), or set
    ``Frame.error``.

    Runs right after the file's header is read, so the encoded bytes are decoded while still in the CPU cache,
    and the dataset (with its encoded pixel bytes) is released at once."""
    fill = policy.padding_fill_hu
    try:
        arr, ds = _decode_file(frames[0].path, frames[0].dataset)
    except ImageRejected as err:
        for f in frames:
            f.error, f.dataset = err.rejection, None
        return
    for f in frames:
        where = f.path if f.frame is None else f"{f.path} [frame {f.frame}]"
        try:
            raw = arr[f.frame] if f.frame is not None and arr.ndim == 3 else arr
            if raw.shape != (f.rows, f.cols):
                raise ImageRejected(f.path, "decode_error", f"decoded shape {raw.shape} != Rows x Columns {(f.rows, f.cols)}")
            hu, bounds = _to_hu(raw, f, ds, fill)
            if policy.hu_sanity is not None:
                check = HuCheck(*policy.hu_sanity)
                check.update(hu, bounds)
                check.verify(where)
            f.hu = to_int16_hu(hu, fill)[0] if policy.as_int16 else hu.astype(np.float32)
        except ImageRejected as err:
            f.error = err.rejection
        f.dataset = None  # release the encoded pixel bytes as soon as the slice is decoded


def _series_id(uid: str) -> str:
    """Short one-way tag of a SeriesInstanceUID (the UID itself never leaves the reader)."""
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def read_dicom_series(paths: list[str], policy: DicomPolicy) -> tuple[list[RawVolume], list[Rejection]]:
    """Every series among ``paths`` the policy accepts -> :class:`RawVolume` (``volume_suffix`` = series tag when
    several series are accepted), plus one :class:`Rejection` per rejected file or series."""
    rejections: list[Rejection] = []
    frames: list[Frame] = []
    for path in sorted(map(str, paths)):
        got = _headers(path, policy)
        if isinstance(got, Rejection):
            rejections.append(got)
            continue
        if _slice_normal(got[0].iop, policy)[1] is not None:  # else its series will be rejected: no decoding
            _decode_frames(got, policy)
        frames.extend(got)
    groups: dict[tuple, list[Frame]] = {}
    for f in frames:
        key = (f.series_key, f.rows, f.cols, tuple(np.round(f.iop, 3)))
        groups.setdefault(key, []).append(f)
    volumes: list[RawVolume] = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3])):
        try:
            vol = _assemble(groups[key], policy, rejections)
        except ImageRejected as err:
            rejections.append(err.rejection)
            continue
        if vol is not None:
            vol.volume_suffix = _series_id(f"{key[0]}|{key[1]}|{key[2]}|{key[3]}")
            volumes.append(vol)
    if len(volumes) == 1:
        volumes[0].volume_suffix = ""
    return volumes, rejections


def read_dicom_folder(folder: str | Path, policy: DicomPolicy = PREDICTION) -> RawVolume:
    """The largest accepted series (most slices) among the files below ``folder``; a warning names the others.

    Raises :class:`ImageRejected` (a one-line ``ValueError`` naming the folder) when no series is accepted, with
    the most frequent reasons the files were refused."""
    folder = Path(folder)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    volumes, rejections = read_dicom_series(files, policy)
    if not volumes:
        counts: dict[str, int] = {}
        for r in rejections:
            counts[r.reason] = counts.get(r.reason, 0) + 1
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "no files"
        first = next((r for r in rejections if not r.filtered), rejections[0] if rejections else None)
        detail = f"{why}" + (f"; e.g. {Path(first.path).name}: {first.detail}" if first is not None else "")
        raise ImageRejected(str(folder), "no_image_series", f"no DICOM image series could be read ({detail})")
    best = max(volumes, key=lambda v: v.data.shape[2])
    if len(volumes) > 1:
        warnings.warn(f"{folder}: {len(volumes)} image series found; using the one with {best.data.shape[2]} slices")
    return best


def _slice_normal(iop: np.ndarray, policy: DicomPolicy) -> tuple[str, np.ndarray | None, float]:
    """(problem, unit slice normal or None, tilt from the patient z axis in degrees) of an ImageOrientationPatient;
    ``problem`` is a rejection reason (``no_geometry`` / ``not_axial``) or "" when the series can be axial CT."""
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return "no_geometry", None, 0.0
    normal = normal / norm
    tilt_deg = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt_deg > policy.max_tilt_deg:
        return "not_axial", None, tilt_deg
    return "", normal, tilt_deg


def _assemble(frames: list[Frame], policy: DicomPolicy, rejections: list[Rejection]) -> RawVolume | None:
    first = frames[0]
    row_dir, col_dir = first.iop[:3], first.iop[3:]
    where = first.path if len(frames) == 1 else f"{Path(first.path).parent} ({len(frames)} images)"
    problem, normal, tilt_deg = _slice_normal(first.iop, policy)
    if problem == "no_geometry":
        raise ImageRejected(where, "no_geometry", "ImageOrientationPatient rows and columns are parallel")
    if problem == "not_axial":
        raise ImageRejected(where, "not_axial", f"slice normal is {tilt_deg:.1f} deg from the patient z axis (sagittal/coronal/oblique series)")

    # pixels were decoded, rescaled, padding-masked and HU-checked per file (a corrupt file is dropped, the series
    # survives); a frame whose own orientation was just past max_tilt_deg but rounded into this group is decoded now
    fill = policy.padding_fill_hu
    decoded: list[tuple[Frame, np.ndarray]] = []
    for f in sorted(frames, key=lambda f: (f.path, f.frame or 0)):
        if f.hu is None and f.error is None:
            _decode_frames([f], policy)
        if f.error is not None:
            rejections.append(f.error)
        else:
            decoded.append((f, f.hu))
        f.hu = None
    if not decoded:
        return None

    # sort along the normal, drop or reject duplicate positions
    decoded.sort(key=lambda item: float(item[0].ipp @ normal))
    tol = policy.duplicate_tol_mm
    kept: list[tuple[Frame, np.ndarray]] = []
    for f, img in decoded:
        if kept and abs(float(f.ipp @ normal) - float(kept[-1][0].ipp @ normal)) < tol:
            if np.array_equal(img, kept[-1][1]):
                rejections.append(Rejection(f.path, "duplicate_slice", f"same position and pixels as {Path(kept[-1][0].path).name}"))
                continue
            raise ImageRejected(where, "duplicate_position_conflict",
                                f"{Path(f.path).name} and {Path(kept[-1][0].path).name} share a slice position but differ in pixels")
        kept.append((f, img))
    if len(kept) < policy.min_slices:
        raise ImageRejected(where, "too_few_slices", f"{len(kept)} slice(s) left, min_slices={policy.min_slices}")

    positions = np.asarray([float(f.ipp @ normal) for f, _ in kept])
    offsets = positions - positions[0]
    info: dict = {"format": "dicom", "n_files": len({f.path for f, _ in kept}), "gantry_tilt_deg": round(tilt_deg, 3)}
    gaps = np.diff(offsets)
    spacing_k = float(np.median(gaps)) if len(gaps) else 1.0
    irregular = None
    if len(gaps):
        rel = policy.spacing_rel_tol
        if np.max(np.abs(gaps - spacing_k)) > rel * spacing_k:
            irregular = offsets
            info["variable_spacing"] = True
            info["slice_gaps_mm"] = sorted({round(float(g), 3) for g in gaps})
            missing = _missing_slices(gaps, rel)
            if missing:
                info["missing_slices"] = missing
                if policy.on_missing_slices == "reject":
                    raise ImageRejected(where, "missing_slices", f"{missing} slice(s) missing (gaps {info['slice_gaps_mm']} mm)")
            if policy.on_variable_spacing == "reject":
                raise ImageRejected(where, "variable_spacing", f"slice gaps {info['slice_gaps_mm']} mm")

    stack = np.stack([img for _, img in kept])  # [K, rows, cols]
    # shear (gantry tilt): in-plane drift of each slice origin relative to slice 0
    drift = np.asarray([f.ipp - kept[0][0].ipp for f, _ in kept])
    shift_cols = drift @ row_dir / first.pixel_spacing[1]
    shift_rows = drift @ col_dir / first.pixel_spacing[0]
    slice_step = normal * (spacing_k if spacing_k > 0 else 1.0)  # LPS mm from one slice to the next
    if len(kept) > 1 and max(np.abs(shift_cols).max(), np.abs(shift_rows).max()) > policy.shear_tol_px:
        if policy.gantry_tilt == "reject":
            raise ImageRejected(where, "gantry_tilt", f"stack sheared by gantry tilt {tilt_deg:.1f} deg (policy: reject)")
        info["max_shear_px"] = round(float(max(np.abs(shift_cols).max(), np.abs(shift_rows).max())), 2)
        if policy.gantry_tilt == "resample":
            stack = _deshear(stack, shift_rows, shift_cols, fill)
            info["resampled"] = "gantry_tilt_deshear"
        elif irregular is not None:  # "affine": one slice vector must take every slice to its place
            raise ImageRejected(where, "gantry_tilt", "a sheared stack with variable spacing has no single affine")
        else:
            slice_step = (kept[-1][0].ipp - kept[0][0].ipp) / (len(kept) - 1)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * first.pixel_spacing[1]
    affine_lps[:3, 1] = col_dir * first.pixel_spacing[0]
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = kept[0][0].ipp
    affine_ras = LPS_TO_RAS @ affine_lps
    return RawVolume(stack.transpose(2, 1, 0), affine_ras, irregular, info)  # view: slices stay contiguous


def _missing_slices(gaps: np.ndarray, rel: float) -> int:
    """Gaps that are a whole multiple (>=2) of the typical gap around them: slices lost from the series."""
    typical = float(np.median(gaps))
    n = 0
    for g in gaps:
        ratio = g / typical
        if ratio > 1.5 and abs(ratio - round(ratio)) < rel * round(ratio):
            n += int(round(ratio)) - 1
    return n


def _deshear(stack: np.ndarray, shift_rows: np.ndarray, shift_cols: np.ndarray, fill: int) -> np.ndarray:
    """Move slice ``k``'s content by ``(+shift_rows[k], +shift_cols[k])`` pixels (bilinear) so the stack is orthogonal.

    Raw pixel ``(v, u)`` of slice ``k`` lies at ``IPP_k + v*c*dr + u*r*dc``; writing ``IPP_k - IPP_0 = d*n +
    shift_cols*dc*r + shift_rows*dr*c`` shows it belongs at ``(v + shift_rows, u + shift_cols)`` of the grid
    anchored at slice 0. Pixels shifted in from outside the field of view are ``fill`` (air).
    """
    out = np.empty_like(stack)
    for k in range(stack.shape[0]):
        out[k] = shift_bilinear(stack[k], float(shift_rows[k]), float(shift_cols[k]), fill)
    return out


def shift_bilinear(img: np.ndarray, dy: float, dx: float, fill: int) -> np.ndarray:
    """``out[y + dy, x + dx] = img[y, x]`` with bilinear weights for the fractional part (int16 in, int16 out); pixels
    shifted in from outside are ``fill``. The four integer shifts are views of one fill-padded copy."""
    if abs(dy) < 1e-6 and abs(dx) < 1e-6:
        return img.copy()
    h, w = img.shape
    iy, ix = int(np.floor(dy)), int(np.floor(dx))
    fy, fx = dy - iy, dx - ix
    m = max(abs(iy), abs(ix)) + 1
    if m > max(h, w) + 1:  # moved entirely out of the field of view
        return np.full(img.shape, fill, dtype=np.int16)
    padded = np.full((h + 2 * m, w + 2 * m), fill, dtype=np.float32)
    padded[m:m + h, m:m + w] = img
    acc = np.zeros(img.shape, dtype=np.float32)
    term = np.empty(img.shape, dtype=np.float32)
    for oy, wy in ((iy, 1 - fy), (iy + 1, fy)):
        for ox, wx in ((ix, 1 - fx), (ix + 1, fx)):
            if wy * wx > 1e-6:
                np.multiply(padded[m - oy:m - oy + h, m - ox:m - ox + w], np.float32(wy * wx), out=term)
                acc += term
    return np.rint(acc).astype(np.int16)
