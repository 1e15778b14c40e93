"""Atomic file writes: a temporary file in the target folder, flushed and fsynced, then renamed over the target.

A reader never sees half a file, and an interrupted or failed write (full disk, killed job) leaves the previous
file untouched and no temporary file behind. The temporary name starts with ``.`` and contains ``.tmp-`` so that
:func:`remove_stale_temporaries` can clear leftovers of a process that was killed mid-write.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

TMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_to_path(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` with the name of a temporary file next to ``path``, then rename it onto ``path``.

    For writers that want a file name (``safetensors.save_file``, ``nibabel.save``, ``fig.savefig``): the temporary
    name keeps ``path``'s suffixes, so writers that pick a format from the name pick the right one. The file gets
    the usual ``0666 & ~umask`` mode (``mkstemp`` alone would make it 0600). Any exception from ``write`` or the OS
    propagates unchanged after the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".part"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """:func:`atomic_write_to_path` for writers that take a binary file object; the data is flushed and (by
    default) fsynced before the rename, so after a crash the target is the old file or the whole new one."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:  # by name: the one place where tests put a full disk
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    return atomic_write_to_path(path, to_file)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``path`` first, like ``Path.write_text`` (the one argument order of every writer here)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder`` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARK in p.name and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
