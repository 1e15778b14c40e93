"""The curation config, read once: ``configs/data/ct3m.yaml`` <- ``--config`` <- ``key=value`` <- ``--root NAME=PATH``,
merged strictly by :func:`meddino_common.config.load_config` and parsed into typed settings at the CLI edge.

The stages get the block they need (``GeometrySettings`` for resampling, ``OutputSettings`` for encoding and
packing...), never the raw config: every number has its home in the YAML and no ``.get(key, default)`` in code can
disagree with it. ``reading``, ``dicom`` and each source's options stay plain mappings: they are the readers' and
the source adapters' own configuration (``meddino_datasets.readers``, ``data_curation.sources``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from data_curation.sources import REGISTRY
from meddino_common.config import ConfigError, load_config, shipped_config

DEFAULT_CONFIG = shipped_config("data", "ct3m.yaml")


@dataclass(frozen=True)
class GeometrySettings:
    """Block ``geometry``: in-plane spacing/size of the output slices and how they are interpolated
    (:mod:`data_curation.geometry`)."""

    inplane_spacing_mm: float | None
    output_size: tuple[int, int] | None  # [H, W]
    fit: str  # resize | pad_crop
    keep_aspect: bool
    interpolation: str  # linear | cubic | nearest | area
    downsample: str  # area | antialias
    antialias: bool
    pad_value_hu: int

    @classmethod
    def from_config(cls, g: dict) -> "GeometrySettings":
        size = g["output_size"]
        return cls(None if g["inplane_spacing_mm"] is None else float(g["inplane_spacing_mm"]),
                   None if size is None else (int(size[0]), int(size[1])), str(g["fit"]), bool(g["keep_aspect"]),
                   str(g["interpolation"]), str(g["downsample"]), bool(g["antialias"]), int(g["pad_value_hu"]))


@dataclass(frozen=True)
class SliceSettings:
    """Block ``slices``: which native slices become samples."""

    skip_empty: bool
    body_threshold_hu: float
    min_body_fraction: float
    min_slice_step_mm: float | None

    @classmethod
    def from_config(cls, s: dict) -> "SliceSettings":
        step = s["min_slice_step_mm"]
        return cls(bool(s["skip_empty"]), float(s["body_threshold_hu"]), float(s["min_body_fraction"]),
                   None if step is None else float(step))


@dataclass(frozen=True)
class DedupSettings:
    """Block ``dedup``: cross-source duplicate detection (:mod:`data_curation.dedup`)."""

    enabled: bool
    grid: tuple[int, int, int]  # (z, y, x) fingerprint grid
    max_mean_abs_diff_hu: float
    extent_rel_tol: float

    @classmethod
    def from_config(cls, d: dict) -> "DedupSettings":
        return cls(bool(d["enabled"]), tuple(int(x) for x in d["grid"]), float(d["max_mean_abs_diff_hu"]),
                   float(d["extent_rel_tol"]))


@dataclass(frozen=True)
class OutputSettings:
    """Block ``output``: the image field's encoding and how samples are cut into shards."""

    image_format: str  # npy | png
    png_compress_level: int
    samples_per_shard: int
    volumes_per_group: int

    @classmethod
    def from_config(cls, o: dict) -> "OutputSettings":
        return cls(str(o["image_format"]), int(o["png_compress_level"]), int(o["samples_per_shard"]),
                   int(o["volumes_per_group"]))


@dataclass(frozen=True)
class HistogramSettings:
    """Block ``stats.hu_histogram``: HU bins ``[min, max)`` of width ``bin``, counted on every ``pixel_step``-th pixel."""

    min: int
    max: int
    bin: int
    pixel_step: int

    @classmethod
    def from_config(cls, h: dict) -> "HistogramSettings":
        out = cls(int(h["min"]), int(h["max"]), int(h["bin"]), int(h["pixel_step"]))
        if (out.max - out.min) % out.bin:
            raise ConfigError(f"stats.hu_histogram: max - min ({out.max} - {out.min}) must be a multiple of bin ({out.bin})")
        return out

    @property
    def n_bins(self) -> int:
        return (self.max - self.min) // self.bin


@dataclass(frozen=True)
class HoldoutSettings:
    """Block ``holdout`` (``--holdout-finetune``): finetune task -> curation source, and the fold held out."""

    tasks: dict[str, str]
    fold: int

    @classmethod
    def from_config(cls, h: dict) -> "HoldoutSettings":
        return cls({str(k): str(v) for k, v in h["tasks"].items()}, int(h["fold"]))


@dataclass(frozen=True)
class RunSettings:
    """Block ``run``: processes, batching and memory of the build (outputs do not depend on them)."""

    workers: int
    slice_batch: int
    maxtasksperchild: int
    orphan_poll_seconds: float
    malloc_mmap_threshold_mb: float | None
    malloc_trim_threshold_mb: float | None
    pack_threads: int  # ``run.pack_threads: null`` resolves to ``workers`` (at least 1)
    fsync_staging: bool

    @classmethod
    def from_config(cls, r: dict) -> "RunSettings":
        workers = int(r["workers"])
        return cls(workers, int(r["slice_batch"]), int(r["maxtasksperchild"]), float(r["orphan_poll_seconds"]),
                   r["malloc_mmap_threshold_mb"], r["malloc_trim_threshold_mb"],
                   int(r["pack_threads"] or max(1, workers)), bool(r["fsync_staging"]))


@dataclass(frozen=True)
class CurationSettings:
    """The whole curation config, typed. ``config`` is the merged config as plain data: the plan hash of a build
    fingerprints it (``data_curation.journal.plan_hash``), so a resumed build refuses another config."""

    seed: int
    sources: dict[str, dict]  # name -> the adapter's options (``root``: str or None, and the source's own keys)
    reading: dict  # the readers' block (meddino_datasets.readers)
    dicom: dict  # the DICOM reader's block
    geometry: GeometrySettings
    slices: SliceSettings
    dedup: DedupSettings
    output: OutputSettings
    hu_histogram: HistogramSettings
    holdout: HoldoutSettings
    run: RunSettings
    config: dict

    @classmethod
    def from_config(cls, cfg: dict) -> "CurationSettings":
        return cls(int(cfg["seed"]), cfg["sources"], cfg["reading"], cfg["dicom"],
                   GeometrySettings.from_config(cfg["geometry"]), SliceSettings.from_config(cfg["slices"]),
                   DedupSettings.from_config(cfg["dedup"]), OutputSettings.from_config(cfg["output"]),
                   HistogramSettings.from_config(cfg["stats"]["hu_histogram"]), HoldoutSettings.from_config(cfg["holdout"]),
                   RunSettings.from_config(cfg["run"]), cfg)

    def source_root(self, name: str) -> Path | None:
        """The root folder of source ``name`` (``~`` expanded), None when it is not set."""
        root = self.sources[name]["root"]
        return Path(root).expanduser() if root else None


def load_settings(config: str | Path = DEFAULT_CONFIG, roots: Sequence[str] = (), overrides: Sequence[str] = (),
                  workers: int | None = None) -> CurationSettings:
    """Shipped defaults <- ``config`` (when it is another file) <- ``key=value`` ``overrides`` <- ``roots``
    (``NAME=PATH``, the ``--root`` flags) <- ``workers`` (``--workers``) -> typed settings. An unknown key, a value of
    the wrong type or a malformed ``--root`` is a :class:`ConfigError` of one line naming it."""
    layers = [] if Path(config).resolve() == DEFAULT_CONFIG.resolve() else [config]
    cfg: dict[str, Any] = OmegaConf.to_container(load_config([DEFAULT_CONFIG], layers, overrides), resolve=True)
    for item in roots:
        if "=" not in item:
            raise ConfigError(f"--root expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if name not in REGISTRY:
            near = difflib.get_close_matches(name, list(REGISTRY), n=1)
            raise ConfigError(f"--root {item}: unknown source {name!r}" + (f"; did you mean {near[0]}?" if near else "")
                              + f" (known: {', '.join(REGISTRY)})")
        cfg["sources"][name]["root"] = path
    if workers is not None:
        cfg["run"]["workers"] = workers
    return CurationSettings.from_config(cfg)
