"""What every source adapter returns, plus the file-discovery helpers they share.

An adapter knows how one dataset's owners lay out their release (folders, file names, which files are images and
which are labels, modality filters) and turns a root folder into a sorted list of :class:`Case` objects. It never
opens image data: reading happens in :mod:`data_curation.readers`.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Case:
    """One volume to curate.

    ``kind`` is ``"nifti"`` (``paths`` holds one file) or ``"dicom"`` (``paths`` holds every candidate file of one
    folder; the DICOM reader groups them into series and may emit several volumes, one per accepted series).
    ``case_id`` is the dataset's own case name, made safe for webdataset keys (no dots, no slashes).
    """

    source: str
    case_id: str
    kind: str
    paths: tuple[str, ...]
    split: str = ""  # "train"/"val"/"test" where the owners say so (used by the finetune holdout)
    #: where the case lives, relative to the source root (the file, or the folder holding the case's files); kept in
    #: every sample's json and in manifest.csv, since a long case id is shortened in the sample key. Filled in by
    #: :func:`with_source_path` unless the adapter sets a shorter one (dated TCIA study folders stay out).
    source_path: str = ""

    @property
    def uid(self) -> str:
        return f"{self.source}/{self.case_id}"


@dataclass(frozen=True)
class SourceAdapter:
    """A dataset adapter: ``find(root, options) -> list[Case]`` plus a one-line description of the layout."""

    name: str
    layout: str
    find: Callable[[Path, dict], list[Case]]
    url: str = ""
    default_subdirs: tuple[str, ...] = field(default_factory=tuple)
    #: for sources that are also finetune tasks (``--holdout-finetune``): the case id the finetune task
    #: (``finetune/tasks/layouts.py``) gives this case, or None when the finetune task does not train/validate on it
    finetune_case_id: Callable[[Case], str | None] | None = None


def safe_id(text: str) -> str:
    """Case ids go into sample keys: keep ``[A-Za-z0-9_-]``, map everything else (dots, slashes) to ``_``."""
    out = _UNSAFE.sub("_", text).strip("_")
    if not out:
        raise ValueError(f"cannot make a case id from {text!r}")
    return out


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_hidden(path: Path) -> bool:
    """macOS resource forks (``._liver_0.nii.gz``, shipped inside the MSD tarballs) and dot-files are not data."""
    return any(part.startswith(".") for part in path.parts)


#: where :func:`walk_files` and :func:`looks_like_dicom` report what they could not read (see :func:`collect_problems`)
_problems: list[dict] | None = None


@contextlib.contextmanager
def collect_problems() -> Iterator[list[dict]]:
    """Collect, while discovering cases, every folder or file that was seen but could not be read (a failure record
    ``{"file", "reason": "unreadable", "detail", "filtered": False}`` each): adapters never open image data, so
    without this an unreadable sub-folder would silently contribute no case."""
    global _problems
    previous, _problems = _problems, []
    try:
        yield _problems
    finally:
        _problems = previous


def _report(path: str, detail: str) -> None:
    """Record an unreadable path once (an adapter may walk a root more than once)."""
    if _problems is not None and all(p["file"] != str(path) for p in _problems):
        _problems.append({"file": str(path), "reason": "unreadable", "detail": detail, "filtered": False})


def walk_files(root: Path) -> Iterable[Path]:
    """Every regular file under ``root`` (following symlinks), in sorted order, hidden files skipped. A folder is
    walked once however many links lead to it (a symlink loop ends there); unreadable folders are reported."""
    seen: set[tuple[int, int]] = set()

    def first_visit(path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError as err:
            _report(path, f"cannot open folder ({err.strerror})")
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    if not first_visit(str(root)):
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True,
                                                onerror=lambda err: _report(err.filename, f"cannot list folder ({err.strerror})")):
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and first_visit(os.path.join(dirpath, d))]
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_nifti(root: Path, pattern: str) -> list[Path]:
    """NIfTI files under ``root`` whose file name fully matches the regex ``pattern`` (sorted, hidden skipped)."""
    rx = re.compile(pattern)
    return [p for p in walk_files(root) if p.name.endswith(NIFTI_SUFFIXES) and rx.fullmatch(p.name)]


def looks_like_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128; many releases have no ``.dcm`` extension."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError as err:
        _report(str(path), f"cannot read the file to tell whether it is DICOM ({err.strerror})")
        return False


def dicom_dirs(root: Path) -> dict[Path, list[Path]]:
    """Folders under ``root`` that directly contain DICOM files -> those files (sorted). DICOMDIR is skipped."""
    out: dict[Path, list[Path]] = {}
    for path in walk_files(root):
        if path.name.upper() == "DICOMDIR" or path.name.endswith(NIFTI_SUFFIXES):
            continue
        if path.suffix.lower() in (".dcm", ".ima") or looks_like_dicom(path):
            out.setdefault(path.parent, []).append(path)
    return out


def nifti_cases(source: str, files: Iterable[Path], case_id: Callable[[Path], str], split: Callable[[Path], str] | None = None) -> list[Case]:
    cases = [Case(source, safe_id(case_id(p)), "nifti", (str(p),), split(p) if split else "") for p in files]
    return sorted(cases, key=lambda c: c.case_id)


def split_from_path(path: Path) -> str:
    """Owners' split folder names (nnU-Net/MSD ``imagesTr``/``imagesVa``/``imagesTs``, BTCV ``Training``/``Testing``)."""
    for part in reversed(path.parts):
        low = part.lower()
        if low in ("imagestr", "training", "train", "train_sets"):
            return "train"
        if low in ("imagesva", "imagesval", "validation", "val"):
            return "val"
        if low in ("imagests", "testing", "test", "test_sets"):
            return "test"
    return ""


def dicom_case(source: str, case_id: str, folder_files: list[Path], split: str = "", source_path: str = "") -> Case:
    return Case(source, safe_id(case_id), "dicom", tuple(str(p) for p in sorted(folder_files)), split, source_path)


def with_source_path(case: Case, root: Path) -> Case:
    """``case`` with ``source_path`` set (when the adapter did not): its file, or the deepest folder holding all its
    files, relative to ``root``."""
    if case.source_path or not case.paths:
        return case
    where = case.paths[0] if len(case.paths) == 1 and case.kind == "nifti" else os.path.commonpath([os.path.dirname(p) for p in case.paths])
    return replace(case, source_path=os.path.relpath(where, root))
