"""Shard bytes: lossless image fields, sample blobs that plain tar and stock webdataset read, byte-range copies
(kernel and fallback paths alike), atomic completion."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from data_curation import shards
from data_curation.shards import ShardWriter, decode_image, encode_image, sample_blob, sample_json


@pytest.fixture(scope="module")
def dicom_slice(real_data, ct3m_cfg) -> np.ndarray:
    from meddino_datasets.readers.dicom import DicomPolicy, read_dicom_series

    vols, _ = read_dicom_series([str(real_data / "pydicom_data_ct/693_UNCR.dcm")], DicomPolicy.from_config(ct3m_cfg["dicom"], ct3m_cfg["reading"]))
    return np.ascontiguousarray(vols[0].data[:, :, 0].T)


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_image_encodings_are_lossless(dicom_slice, fmt):
    ext, data = encode_image(dicom_slice, fmt)
    back = decode_image(ext, data)
    assert back.dtype == np.int16 and np.array_equal(back, dicom_slice)
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, dicom_slice, allow_pickle=False)
        assert data == buf.getvalue()  # exactly np.save's bytes: plain np.load reads it
        assert np.array_equal(np.load(io.BytesIO(data)), dicom_slice)


def _staged(tmp_path, dicom_slice, n: int = 5) -> tuple[object, list[tuple[str, int, int]]]:
    """A staging file of ``n`` sample blobs -> (path, [(key, offset, size)])."""
    path = tmp_path / "vol.samples"
    ranges, offset = [], 0
    with open(path, "wb") as fh:
        for i in range(n):
            key = f"folder-case_a-{i:05d}"
            blob = sample_blob(key, {"npy": encode_image(np.roll(dicom_slice, i), "npy")[1], "json": sample_json({"slice_index": i})})
            fh.write(blob)
            ranges.append((key, offset, len(blob)))
            offset += len(blob)
    return path, ranges


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_shard_from_staged_blobs_reads_back(tmp_path, dicom_slice, monkeypatch, kernel_copy):
    if not kernel_copy:  # filesystems / kernels without copy_file_range take the pread + write path
        def refuse(*args):
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    import webdataset as wds

    staged, ranges = _staged(tmp_path, dicom_slice)
    order = [3, 0, 4, 1, 2]
    shard = tmp_path / "ct3m-000000.tar"
    fd = os.open(staged, os.O_RDONLY)
    try:
        with ShardWriter(shard) as writer:
            for i in order:
                writer.copy_blob(fd, ranges[i][1], ranges[i][2])
            assert not shard.exists() and writer.tmp.exists()  # complete only at close (rename)
    finally:
        os.close(fd)
    assert shard.stat().st_size % tarfile.RECORDSIZE == 0 and not (tmp_path / "ct3m-000000.tar.tmp").exists()
    with tarfile.open(shard) as tf:
        names = tf.getnames()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf.getmembers())
    assert names == [f"folder-case_a-{i:05d}.{ext}" for i in order for ext in ("json", "npy")]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"folder-case_a-{i:05d}" for i in order]
    for s, i in zip(samples, order):
        assert np.array_equal(decode_image("npy", s["npy"]), np.roll(dicom_slice, i))


def test_tarfile_reference_bytes(tmp_path, dicom_slice):
    """The blob writer produces the same archive bytes as the standard library's tarfile with the same headers."""
    fields = {"npy": encode_image(dicom_slice, "npy")[1], "json": b'{"a":1}'}
    ours = tmp_path / "ours.tar"
    with ShardWriter(ours) as writer:
        writer.add("k-00001", fields)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for ext in sorted(fields):
            info = tarfile.TarInfo(f"k-00001.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(fields[ext]), 0, 0o444, "", ""
            tf.addfile(info, io.BytesIO(fields[ext]))
    assert ours.read_bytes() == ref.getvalue()
    for name, size in (("x" * 100, 131200), ("lits-volume-7-00003.npy", 0), ("a", 8**11 - 1)):  # headers alone
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "", ""
        assert shards._header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="100 bytes"):
        shards._header("y" * 101, 1)


def test_short_staging_file_is_an_error(tmp_path, dicom_slice):
    staged, ranges = _staged(tmp_path, dicom_slice, n=2)
    fd = os.open(staged, os.O_RDONLY)
    try:
        writer = ShardWriter(tmp_path / "ct3m-000001.tar")
        with pytest.raises(OSError, match="short"):
            writer.copy_blob(fd, ranges[1][1], ranges[1][2] + 512)
        writer.abort()
    finally:
        os.close(fd)
    assert not list(tmp_path.glob("ct3m-*"))


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="dot"):
        sample_blob("folder-a.b-00001", {"json": b"{}"})
    assert shards.sample_key("lits", "volume-7", 3) == "lits-volume-7-00003"


def test_write_sample_equals_blob_even_after_a_short_write(tmp_path, dicom_slice, monkeypatch):
    """The workers' zero-copy writer (one writev from the slice's memory) writes exactly the blob bytes, also when
    the kernel accepts only part of the vector."""
    from data_curation.shards import encode_image_pieces, write_sample

    ext, pieces = encode_image_pieces(dicom_slice, "npy")
    blob = sample_blob("k-00002", {ext: encode_image(dicom_slice, "npy")[1], "json": b'{"b":2}'})
    real_writev = os.writev
    for cut in (None, 700):  # whole vector, or only 700 bytes (inside the npy member's header) on the first call
        if cut:
            monkeypatch.setattr(os, "writev", lambda fd, bufs: os.write(fd, b"".join(bufs)[:cut]))
        path = tmp_path / f"w{cut}.bin"
        with open(path, "wb", buffering=0) as fh:
            assert write_sample(fh.fileno(), "k-00002", {ext: pieces, "json": b'{"b":2}'}) == len(blob)
        assert path.read_bytes() == blob
        monkeypatch.setattr(os, "writev", real_writev)
