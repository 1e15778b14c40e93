"""Deterministic, resumable reading of CT-3M webdataset shards.

A shard is a plain tar in the webdataset layout: consecutive members ``<key>.<ext>`` form one sample
(``npy``: int16 HU [H, W] from ``np.save``; or ``png``: 16-bit PNG of HU + 32768; plus ``json`` metadata).

Ordering. Shards are split into *units* (a whole shard, or every k-th sample of it when there are fewer shards
than reader slots). A *slot* is one (rank, worker) pair; slot ``s`` of ``n_slots`` reads, in epoch ``e``, the
units ``perm_e[s::n_slots]`` of a seeded per-epoch permutation, so within an epoch no sample is read twice
across ranks and workers. A slot interleaves ``interleave`` units at a time in a seeded random order (mixing
volumes) and shuffles blocks of ``shuffle_block`` consecutive samples. Every draw is a pure function of
(seed, epoch, slot, group, block), so the stream from any position equals the uninterrupted stream, and a
resume skips shards by their sample counts and tar members by their headers, without reading image bytes.

The files are read with :mod:`tarfile` rather than ``webdataset.WebDataset`` because resuming needs to seek
past tar members unread; the grouping rule (key = path up to the first dot of the basename) is webdataset's.
"""
from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from webdataset.shardlists import expand_urls

from meddino_common.seeding import seeded_rng  # every deterministic draw of the loader is keyed through it

HU_PNG_OFFSET = 32768  # png samples store HU + 32768 as uint16


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample: its key, the shard it came from, and its fields by extension."""

    key: str
    shard: str
    fields: dict[str, bytes]


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from a directory (its ``*.tar``), a file, a brace pattern ``ct3m-{000000..000009}.tar``,
    a ``::``-separated string, or a list of any of these. Sorted within each directory; order kept otherwise."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        for expanded in expand_urls(str(item)):
            path = Path(expanded)
            if path.is_dir():
                found = sorted(path.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards in directory {path}")
                paths.extend(found)
            elif path.is_file():
                paths.append(path)
            else:
                raise FileNotFoundError(f"shard not found: {path} (from data.shards={item!r})")
    if not paths:
        raise FileNotFoundError(f"data.shards={spec!r} matched no shard files")
    if len(set(paths)) != len(paths):
        raise ValueError(f"data.shards={spec!r} lists some shards twice; samples would be duplicated")
    return paths


def _split_key(name: str) -> tuple[str, str] | None:
    """webdataset's rule: ``dir/abc.def.npy`` -> (``dir/abc``, ``def.npy``); None for names without a dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1 :]


def _corrupt(path: Path, err: Exception) -> ValueError:
    return ValueError(f"corrupt shard {path}: {err}; rebuild it with data_curation/build_ct3m.py")


@contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:")
        except tarfile.TarError as err:
            raise _corrupt(path, err) from err
        with tar:
            yield tar


def _members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            info = tar.next()
        except tarfile.TarError as err:
            raise _corrupt(path, err) from err
        if info is None:
            return
        if info.isfile() and _split_key(info.name) is not None:
            yield info


SHARD_INDEX = "shards.csv"  # written by the curation next to the shards: shard,n_samples,bytes,sha256


class CorruptShardError(ValueError):
    """A shard differs from what the curation recorded (size or SHA-256): named, with the fix, in one line."""


@dataclass(frozen=True)
class ShardRecord:
    n_samples: int
    n_bytes: int
    sha256: str


@lru_cache(maxsize=None)
def _shard_index(folder: Path) -> dict[str, ShardRecord] | None:
    """``shards.csv`` of a shard folder, or None for builds made before it existed."""
    index = folder / SHARD_INDEX
    if not index.is_file():
        return None
    with open(index, newline="") as f:
        return {row["shard"]: ShardRecord(int(row["n_samples"]), int(row["bytes"]), row["sha256"]) for row in csv.DictReader(f)}


_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed by this process
_warned: set[str] = set()  # shard folders without shards.csv already warned about


def forget_verified_shards() -> None:
    """Make this process hash every shard again on its next read (a benchmark timing the verification)."""
    _verified.clear()


def verify_shard(path: Path) -> None:
    """Check a shard against ``shards.csv`` before reading it: its size (free), then its SHA-256 once per process
    (``benchmarks/shard_verify.py``, same run: hashing costs 0.67x reading + decoding the shard's samples, 0.03x of
    reading them and building their multi-crop batches; later epochs reuse the result). A cut shard (even at a member boundary), overwritten bytes or
    another file under the shard's name fail here, naming the shard and the fix, instead of training on them.

    Builds without ``shards.csv`` (made before digests were recorded) are read unverified after one warning; their
    sample counts are still checked against ``manifest.csv`` as the shard is read."""
    index = _shard_index(path.parent)
    if index is None:
        if str(path.parent) not in _warned:
            _warned.add(str(path.parent))
            warnings.warn(f"{path.parent} has no {SHARD_INDEX}: shards are read without verification (built before "
                          "digests were recorded; re-run data_curation/build_ct3m.py into a new --out to get them)")
        return
    fix = ("delete it and re-run the data_curation/build_ct3m.py command that made it (it builds missing shards "
           "again), or restore it from a good copy")
    record = index.get(path.name)
    if record is None:
        raise CorruptShardError(f"shard {path}: not listed in {path.parent / SHARD_INDEX}; it is not part of this build")
    st = path.stat()
    if st.st_size != record.n_bytes:
        raise CorruptShardError(f"shard {path}: {st.st_size} bytes, {SHARD_INDEX} says {record.n_bytes} (cut short or "
                                f"replaced); {fix}")
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != record.sha256:
        raise CorruptShardError(f"shard {path}: SHA-256 differs from {SHARD_INDEX} (bytes overwritten); {fix}")
    _verified.add(key)


def iter_shard(path: Path, part: int = 0, n_parts: int = 1, skip: int = 0) -> Iterator[RawSample]:
    """Samples ``part, part + n_parts, ...`` of the shard at ``path``, after skipping the first ``skip`` of them.

    The shard is verified first (:func:`verify_shard`); skipped samples are passed over by their tar headers only.
    """
    verify_shard(path)
    with _open_tar(path) as tar:
        index, current_key, fields = -1, None, {}

        def wanted(i: int) -> bool:
            return i >= 0 and i % n_parts == part and i // n_parts >= skip

        for info in _members(tar, path):
            key, ext = _split_key(info.name)
            if key != current_key:
                if current_key is not None and wanted(index):
                    yield RawSample(current_key, str(path), fields)
                index, current_key, fields = index + 1, key, {}
            if wanted(index):
                fields[ext] = tar.extractfile(info).read()
        if current_key is not None and wanted(index):
            yield RawSample(current_key, str(path), fields)


@lru_cache(maxsize=None)
def _manifest_counts(manifest: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "shard" not in reader.fieldnames:
            raise ValueError(f"{manifest}: expected a 'shard' column (CT-3M manifest.csv)")
        for row in reader:
            name = Path(row["shard"]).name
            counts[name] = counts.get(name, 0) + 1
    return counts


@lru_cache(maxsize=None)
def count_samples(path: Path) -> int:
    """Samples in a shard: from ``shards.csv`` or ``manifest.csv`` next to it when they list the shard, else from the
    tar headers."""
    index = _shard_index(path.parent)
    if index is not None and path.name in index:
        return index[path.name].n_samples
    manifest = path.parent / "manifest.csv"
    if manifest.is_file():
        counts = _manifest_counts(manifest)
        if path.name in counts:
            return counts[path.name]
    n, last = 0, None
    with _open_tar(path) as tar:
        for info in _members(tar, path):
            key = _split_key(info.name)[0]
            if key != last:
                n, last = n + 1, key
    return n


@dataclass(frozen=True)
class Unit:
    """Samples ``part::n_parts`` of one shard."""

    shard: Path
    part: int
    n_parts: int

    @property
    def n_samples(self) -> int:
        """Counted lazily (cached per shard): a worker only ever counts the shards it is dealt."""
        return len(range(self.part, count_samples(self.shard), self.n_parts))


def make_units(shards: Sequence[Path], n_slots: int) -> list[Unit]:
    """Whole shards, or every shard split in k = ceil(n_slots / n_shards) parts when shards are scarce."""
    n_parts = max(1, -(-n_slots // len(shards)))
    units = [Unit(shard, p, n_parts) for shard in shards for p in range(n_parts)]
    if n_parts > 1:  # few shards: cheap to check that every slot can get data
        total = sum(u.n_samples for u in units)
        if total < n_slots:
            raise ValueError(
                f"{total} samples in {len(shards)} shard(s) cannot feed {n_slots} reader slots (ranks x workers)"
            )
    return units



_TAG_EPOCH, _TAG_GROUP, _TAG_BLOCK = 1, 2, 3


def slot_units(units: Sequence[Unit], slot: int, n_slots: int, seed: int, epoch: int) -> list[Unit]:
    """The units read by ``slot`` in ``epoch``: a seeded permutation of all units, dealt round-robin."""
    order = seeded_rng(seed, _TAG_EPOCH, epoch).permutation(len(units))
    return [units[i] for i in order[slot::n_slots]]


def _group_stream(
    group: Sequence[Unit], seed: int, epoch: int, slot: int, group_index: int, shuffle_block: int, start: int
) -> Iterator[RawSample]:
    """Random interleave of the units of one group, shuffled by blocks, from position ``start``."""
    counts = np.array([u.n_samples for u in group])
    labels = seeded_rng(seed, _TAG_GROUP, epoch, slot, group_index).permutation(
        np.repeat(np.arange(len(group)), counts)
    )
    first_block = start // shuffle_block
    consumed = np.bincount(labels[: first_block * shuffle_block], minlength=len(group))
    readers = [
        iter_shard(u.shard, u.part, u.n_parts, skip=int(c)) for u, c in zip(group, consumed)
    ]
    drop = start - first_block * shuffle_block
    for b in range(first_block, -(-len(labels) // shuffle_block)):
        block_labels = labels[b * shuffle_block : (b + 1) * shuffle_block]
        block = []
        for label in block_labels:
            sample = next(readers[label], None)
            if sample is None:
                raise ValueError(
                    f"shard {group[label].shard} ended early: its sample count changed while reading "
                    "(manifest.csv out of date?)"
                )
            block.append(sample)
        order = seeded_rng(seed, _TAG_BLOCK, epoch, slot, group_index, b).permutation(len(block))
        for j in order[drop:]:
            yield block[j]
        drop = 0


def slot_stream(
    shards: Sequence[Path],
    slot: int,
    n_slots: int,
    seed: int,
    start: int = 0,
    interleave: int = 16,
    shuffle_block: int = 256,
) -> Iterator[tuple[int, RawSample]]:
    """Endless (epoch, sample) stream of one reader slot, from position ``start`` (samples already consumed)."""
    if not 0 <= slot < n_slots:
        raise ValueError(f"slot {slot} outside [0, {n_slots})")
    units = make_units(shards, n_slots)
    epoch, skip, empty_epochs = 0, start, 0
    while True:
        mine = slot_units(units, slot, n_slots, seed, epoch)
        total = sum(u.n_samples for u in mine)
        empty_epochs = empty_epochs + 1 if total == 0 else 0
        if empty_epochs > 100:
            raise ValueError(f"reader slot {slot} got no samples for 100 epochs: too few samples per shard")
        if skip >= total:
            skip -= total
            epoch += 1
            continue
        for g in range(0, len(mine), interleave):
            group = mine[g : g + interleave]
            size = sum(u.n_samples for u in group)
            if skip >= size:
                skip -= size
                continue
            for sample in _group_stream(group, seed, epoch, slot, g // interleave, shuffle_block, skip):
                yield epoch, sample
            skip = 0
        epoch += 1


def decode_hu(sample: RawSample) -> np.ndarray:
    """int16 HU [H, W] of a sample (``npy`` preferred, else 16-bit ``png``); clear errors name shard and key."""
    where = f"sample {sample.key!r} in shard {sample.shard}"
    if "npy" in sample.fields:
        try:
            array = np.load(io.BytesIO(sample.fields["npy"]), allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{where}: unreadable npy field ({err})") from err
        if array.dtype != np.int16 or array.ndim != 2:
            raise ValueError(f"{where}: npy must be an int16 [H, W] HU array, got {array.dtype} {array.shape}")
        return array
    if "png" in sample.fields:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(sample.fields["png"])) as image:
                if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise ValueError(f"{where}: png must be 16-bit grey (HU + 32768), got mode {image.mode}")
                array = np.asarray(image).astype(np.int32)
        except OSError as err:
            raise ValueError(f"{where}: unreadable png field ({err})") from err
        if array.ndim != 2 or array.min() < 0 or array.max() > 65535:
            raise ValueError(f"{where}: png must hold uint16 HU + 32768 in [H, W]")
        return (array - HU_PNG_OFFSET).astype(np.int16)
    raise ValueError(f"{where}: no 'npy' or 'png' image field (fields: {sorted(sample.fields)})")
