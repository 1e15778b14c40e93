"""The source adapter type, plus the file-discovery helpers the adapters share.

An adapter is curation's view of one dataset: every image of the owners' release (labels, masks and other
modalities skipped) as a sorted list of :class:`meddino_datasets.case.Case`, named for sample keys. What the owners'
layout means for finetuning (labelled cases, canonical ids, the AMOS CT/MRI boundary) lives in
:mod:`meddino_datasets.layouts`, which the adapters of those datasets build on. An adapter never opens image data:
reading happens in :mod:`meddino_datasets.readers`.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from meddino_datasets.case import Case
from meddino_datasets.readers.nifti import NIFTI_SUFFIXES

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class SourceAdapter:
    """A dataset adapter: ``find(root, options) -> list[Case]`` plus a one-line description of the layout."""

    name: str
    layout: str
    find: Callable[[Path, dict], list[Case]]
    url: str = ""
    default_subdirs: tuple[str, ...] = field(default_factory=tuple)
    #: for sources that are also finetune tasks (``--holdout-finetune``): the canonical case id the finetune task
    #: gives this case (``meddino_datasets.layouts.<name>.training_case_id``), or None when it does not use it
    finetune_case_id: Callable[[Case], str | None] | None = None


def safe_id(text: str) -> str:
    """Case ids go into sample keys: keep ``[A-Za-z0-9_-]``, map everything else (dots, slashes) to ``_``."""
    out = _UNSAFE.sub("_", text).strip("_")
    if not out:
        raise ValueError(f"cannot make a case id from {text!r}")
    return out


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


def nifti_case(source: str, path: Path, case_id: str, split: str = "") -> Case:
    """One NIfTI image file as a case of ``source`` (``case_id`` made safe for sample keys)."""
    return Case(safe_id(case_id), path, source=source, kind="nifti", split=split)


def nifti_cases(source: str, files: Iterable[Path], case_id: Callable[[Path], str], split: Callable[[Path], str] | None = None) -> list[Case]:
    cases = [nifti_case(source, p, case_id(p), split(p) if split else "") for p in files]
    return sorted(cases, key=lambda c: c.case_id)


def dicom_case(source: str, case_id: str, folder_files: list[Path], split: str = "", source_path: str = "") -> Case:
    """The DICOM files of one case (one folder, or several below one patient folder); ``image`` is the deepest
    folder holding them all."""
    files = tuple(str(p) for p in sorted(folder_files))
    folder = Path(os.path.commonpath([os.path.dirname(p) for p in files]))
    return Case(safe_id(case_id), folder, source=source, kind="dicom", dicom_files=files, split=split,
                source_path=source_path)


def with_source_path(case: Case, root: Path) -> Case:
    """``case`` with ``source_path`` set (when the adapter did not): its file, or the deepest folder holding all its
    files, relative to ``root``."""
    if case.source_path:
        return case
    return replace(case, source_path=os.path.relpath(case.image, root))
