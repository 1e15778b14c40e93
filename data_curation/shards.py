"""Webdataset shards (plain POSIX tar, readable by ``webdataset.WebDataset(url)`` and ``tar``), built from pre-encoded
sample blobs.

A *sample blob* is the exact tar bytes of one sample: for each field, in sorted extension order, a 512-byte USTAR
header (``<key>.<ext>``, deterministic: mtime 0, uid/gid 0, no user names) followed by the payload padded to 512
bytes. Tar headers hold no offsets, so a blob is position-independent: workers encode each slice once, straight
into a staging file, and the packer concatenates blobs in shuffled order into shards with ``os.copy_file_range``
(an in-kernel copy: the parent never touches pixel data). Reruns produce byte-identical shards.

Crash safety: a shard is written to ``<name>.tmp``, fsynced once when complete and renamed to ``ct3m-%06d.tar``, so a
kill leaves either a complete shard or a temp file that the next run deletes.

Image field: ``npy`` (int16 HU ``[H, W]``, exactly ``np.save``'s bytes) or ``png`` (16-bit PNG of HU + 32768).
Measured on the real CT in ``shared/data`` (see ``configs/data/ct3m.yaml``): npy is ~2.5x larger but ~9x faster to
decode and ~50x faster to encode, so it is the default.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np

SHARD_PATTERN = "ct3m-%06d.tar"
SHARD_INDEX = "shards.csv"  # next to the shards: shard,n_samples,bytes,sha256 (read by pretrain.data.shards)
PNG_OFFSET = 32768
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile (and GNU tar) pad the archive end to a multiple of this


MAX_VOLUME_ID = 84  # bytes: "<volume id>-<slice:05d>.json" must fit the 100 bytes of a USTAR member name


def volume_id(source: str, case: str) -> str:
    """``<source>-<case>``, or when that exceeds :data:`MAX_VOLUME_ID` bytes (a DICOM tree named by its folders, e.g.
    the NBIA download layout) a prefix of it plus 12 hex digits of the case id's SHA-1: short, stable, unique."""
    full = f"{source}-{case}"
    if len(full.encode()) <= MAX_VOLUME_ID:
        return full
    digest = hashlib.sha1(case.encode()).hexdigest()[:12]
    return f"{full.encode()[:MAX_VOLUME_ID - 13].decode(errors='ignore')}-{digest}"


def sample_key(source: str, case: str, slice_index: int) -> str:
    """Stable sample key ``<volume id>-<slice_index:05d>`` (:func:`volume_id`; no dots: webdataset splits keys at the
    first dot). The case id and its source path are in the sample's json and in manifest.csv."""
    return f"{volume_id(source, case)}-{slice_index:05d}"


@lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The ``.npy`` v1.0 header ``np.save`` writes for a C-contiguous array of this shape and dtype."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def encode_image(img: np.ndarray, fmt: str, png_compress_level: int = 1) -> tuple[str, bytes]:
    """int16 HU ``[H, W]`` -> (field extension, bytes). Both encodings are lossless; npy bytes equal ``np.save``'s."""
    ext, pieces = encode_image_pieces(img, fmt, png_compress_level)
    return ext, b"".join(pieces)


def encode_image_pieces(img: np.ndarray, fmt: str, png_compress_level: int = 1) -> tuple[str, list]:
    """Like :func:`encode_image`, as buffers to write one after the other: for npy the header and the slice's own
    memory (no copy of the pixels until the kernel copies them into the file, see :func:`write_sample`)."""
    if img.dtype != np.int16 or img.ndim != 2:
        raise ValueError(f"expected int16 [H, W], got {img.dtype} {img.shape}")
    if fmt == "npy":
        return "npy", [_npy_header(tuple(img.shape), img.dtype.str), memoryview(np.ascontiguousarray(img)).cast("B")]
    if fmt == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((img.astype(np.int32) + PNG_OFFSET).astype(np.uint16)).save(buf, format="PNG", compress_level=png_compress_level)
        return "png", [buf.getvalue()]
    raise ValueError(f"image_format must be 'npy' or 'png', got {fmt!r}")


def decode_image(ext: str, data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_image` -> int16 HU ``[H, W]`` (for tests and tools; loaders may use their own)."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image

    return (np.asarray(Image.open(io.BytesIO(data))).astype(np.int32) - PNG_OFFSET).astype(np.int16)


# USTAR header of a regular file, mode 0444, uid/gid 0, mtime 0, no user/group names -- the bytes tarfile writes for
# such a TarInfo (tested), built directly: tarfile's generic header code costs more than encoding a slice.
_HEADER_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 155 + 12)  # typeflag, linkname, magic .. end
_MODE_IDS = b"0000444\0" + b"0000000\0" * 2
_CONSTANT_SUM = sum(_MODE_IDS) + sum(b"00000000000\0") + 8 * 32 + sum(_HEADER_TAIL)  # the checksum field counts as spaces


def _header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"sample name {name!r} is longer than the 100 bytes a tar header holds; shorten the case id")
    if size >= 8**11:
        raise ValueError(f"{name}: {size} bytes do not fit a USTAR size field")
    size_field = b"%011o\0" % size
    checksum = sum(raw) + sum(size_field) + _CONSTANT_SUM
    return raw + b"\0" * (100 - len(raw)) + _MODE_IDS + size_field + b"00000000000\0" + b"%06o\0 " % checksum + _HEADER_TAIL


_ZEROS = bytes(_BLOCK)


def sample_pieces(key: str, fields: dict[str, bytes | list]) -> list:
    """The tar bytes of one sample as a list of buffers (``{ext: payload}``; a payload is bytes or a list of
    buffers; fields in sorted extension order): each member's header, payload and zero padding to 512 bytes."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot (webdataset splits keys at the first dot)")
    pieces: list = []
    for ext in sorted(fields):
        payload = fields[ext] if isinstance(fields[ext], list) else [fields[ext]]
        size = sum(memoryview(b).nbytes for b in payload)
        pieces += [_header(f"{key}.{ext}", size), *payload, _ZEROS[:(-size) % _BLOCK]]
    return pieces


def sample_blob(key: str, fields: dict[str, bytes | list]) -> bytes:
    """The tar bytes of one sample (see :func:`sample_pieces`) as one bytes object."""
    return b"".join(sample_pieces(key, fields))


def write_sample(fd: int, key: str, fields: dict[str, bytes | list]) -> int:
    """Write one sample's tar bytes at ``fd``'s position with one ``os.writev`` (the pixels are copied once, by the
    kernel, from the slice's memory into the file); returns the number of bytes written."""
    pieces = sample_pieces(key, fields)
    total = sum(memoryview(b).nbytes for b in pieces)
    done = os.writev(fd, pieces) if hasattr(os, "writev") else 0
    if done < total:  # a short write (full disk gives an error instead; a signal may interrupt): finish it plainly
        rest = memoryview(b"".join(pieces))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Append ``size`` bytes of ``src_fd`` from ``offset`` at ``dst_fd``'s position: ``os.copy_file_range`` (in-kernel)
    where the OS and filesystem allow it, else ``pread`` + ``write``."""
    end = offset + size
    kernel = hasattr(os, "copy_file_range")
    while offset < end:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, end - offset, offset)
            except OSError:  # EXDEV / ENOSYS / EINVAL on some kernels and filesystems
                kernel = False
                continue
        else:
            chunk = os.pread(src_fd, min(end - offset, 1 << 22), offset)
            if chunk:
                n = os.write(dst_fd, chunk)
        if n <= 0:
            raise OSError(f"source ends at offset {offset}, {end - offset} bytes short of the recorded sample")
        offset += n


def write_all(fh, data: bytes) -> None:
    """``fh.write`` until every byte is written (an unbuffered file may accept fewer)."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


class ShardWriter:
    """Write one shard: ``add(key, {ext: bytes})`` / ``add_blob(bytes)`` / ``copy_blob(fd, offset, size)``, then
    ``close()`` (end-of-archive, one fsync, atomic rename). Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = open(self.tmp, "wb", buffering=0)  # unbuffered: blobs are large and copy_blob writes at the fd
        self.count = 0

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        self.add_blob(sample_blob(key, fields))

    def add_blob(self, blob: bytes) -> None:
        write_all(self._fh, blob)
        self.count += 1

    def copy_blob(self, src_fd: int, offset: int, size: int) -> None:
        """Append a sample blob stored at ``offset`` in an open staging file."""
        copy_range(src_fd, self._fh.fileno(), offset, size)
        self.count += 1

    def close(self) -> dict:
        """End the archive, make it durable, rename it; returns ``{"shard", "n_samples", "bytes", "sha256"}`` for the
        manifest (the loader checks a shard against it when it opens it). The digest reads the file back once
        (in-kernel copies never pass through this process), from the page cache right after the fsync."""
        size = os.fstat(self._fh.fileno()).st_size + 2 * _BLOCK  # end of archive: two zero blocks...
        write_all(self._fh, b"\0" * (2 * _BLOCK + (-size % _RECORD)))  # ...then padding to a whole record, as tarfile does
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.path)
        return {"shard": self.path.name, "n_samples": self.count, "bytes": self.path.stat().st_size, "sha256": digest}

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (hashlib releases the GIL on them: packer threads overlap)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sample_json(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()

