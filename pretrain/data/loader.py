"""``build_ssl_loader``: CT-3M shards -> deterministic, resumable multi-crop SSL batches (stages 1-3).

Each DataLoader worker builds whole batches, so one batch has one crop resolution (stage 3 mixes them across
batches). Rank-level batch ``i`` is built by logical worker ``i % W`` from its reader slot
(rank * W + worker); the DataLoader's round-robin order over workers then yields batches 0, 1, 2, ... and a
loader started at ``start_iter`` rotates worker roles so that it yields ``start_iter, start_iter + 1, ...``,
each bit-identical to the uninterrupted run. Crop and mask randomness of batch ``i`` is seeded by
(seed, rank, i); the crop resolution by (seed, i) only, so all ranks use the same one.
The per-rank batch comes from :func:`pretrain.data.plan.plan_from_config` (global batch, world size, memory cap).
Resuming needs the same world size, ``data.num_workers``, batch plan and shard list.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from meddino_common.config import ConfigError
from meddino_common.seeding import seeded_rng
from pretrain.data.augment import MultiCropParams, multi_crop
from pretrain.data.collate import collate_ssl_batch
from pretrain.data.plan import plan_from_config
from pretrain.data.shards import decode_hu, expand_shards, slot_stream
from pretrain.data.transforms import HUTransform

_TAG_RESOLUTION, _TAG_AUGMENT = 11, 12


def _as_list(value) -> list:
    if value is None:
        return []
    if OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@dataclass(frozen=True)
class CropSizeSampler:
    """Per-batch crop sizes: fixed ints, or lists drawn with ``*_probs`` (stage 3 mixed resolution)."""

    global_sizes: tuple[int, ...]
    global_probs: tuple[float, ...]
    local_sizes: tuple[int, ...]
    local_probs: tuple[float, ...]
    gram_sizes: tuple[int, ...]  # empty: no Gram view; else aligned with global_sizes
    paired: bool  # local size index follows the global one

    @classmethod
    def from_config(cls, crops) -> "CropSizeSampler":
        def sizes_and_probs(name: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
            sizes = tuple(int(s) for s in _as_list(crops[name]))
            probs = _as_list(crops[f"{name}_probs"])
            if not sizes:
                raise ConfigError(f"crops.{name} must be an int or a non-empty list")
            probs = tuple(float(p) for p in probs) if probs else tuple([1.0 / len(sizes)] * len(sizes))
            if len(probs) != len(sizes) or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
                raise ConfigError(f"crops.{name}_probs must be {len(sizes)} non-negative numbers summing to 1")
            return sizes, probs

        g, gp = sizes_and_probs("global_crops_size")
        l, lp = sizes_and_probs("local_crops_size")
        gram = tuple(int(s) for s in _as_list(crops.gram_teacher_crops_size))
        if len(gram) == 1 and len(g) > 1:
            gram = gram * len(g)
        if gram and len(gram) != len(g):
            raise ConfigError("crops.gram_teacher_crops_size must be one size or one per crops.global_crops_size")
        paired = bool(crops.paired_crop_sizes)
        if paired and len(l) != len(g):
            raise ConfigError("crops.paired_crop_sizes needs as many local_crops_size as global_crops_size entries")
        if paired and _as_list(crops.local_crops_size_probs) and lp != gp:
            raise ConfigError("with crops.paired_crop_sizes the pair is drawn with global_crops_size_probs; "
                             "local_crops_size_probs must be null or equal to it")
        return cls(g, gp, l, lp, gram, paired)

    def __call__(self, rng: np.random.Generator) -> tuple[int, int, int | None]:
        gi = int(rng.choice(len(self.global_sizes), p=self.global_probs))
        li = gi if self.paired else int(rng.choice(len(self.local_sizes), p=self.local_probs))
        return self.global_sizes[gi], self.local_sizes[li], (self.gram_sizes[gi] if self.gram_sizes else None)


@dataclass(frozen=True)
class SSLBatchSettings:
    """Everything a worker needs to build batches, parsed once from the config."""

    shards: tuple[Path, ...]
    batch_size: int
    seed: int
    interleave: int
    shuffle_block: int
    transform: HUTransform
    crop_params: MultiCropParams
    sizes: CropSizeSampler
    patch_size: int
    mask_ratio_min_max: tuple[float, float]
    mask_sample_probability: float
    masking: dict

    @classmethod
    def from_config(cls, cfg, world_size: int = 1) -> "SSLBatchSettings":
        """``world_size`` decides the per-rank micro-batch through the batch plan."""
        data, crops, augment, masking = cfg.data, cfg.crops, cfg.augment, cfg.masking
        if data.shards is None:
            raise ConfigError("data.shards is not set: give a shard directory, file, brace pattern or list")
        shards = OmegaConf.to_container(data.shards) if OmegaConf.is_list(data.shards) else data.shards
        return cls(
            shards=tuple(expand_shards(shards)),
            batch_size=plan_from_config(cfg, world_size).batch_size_per_rank,
            seed=int(data.seed),
            interleave=int(data.interleave_shards),
            shuffle_block=int(data.shuffle_block),
            transform=HUTransform.from_config(data.transform),
            crop_params=MultiCropParams.from_config(crops, augment),
            sizes=CropSizeSampler.from_config(crops),
            patch_size=int(crops.patch_size),
            mask_ratio_min_max=(float(masking.mask_ratio_min_max[0]), float(masking.mask_ratio_min_max[1])),
            mask_sample_probability=float(masking.mask_sample_probability),
            masking=dict(
                min_num_patches=int(masking.min_num_patches),
                min_aspect=float(masking.min_aspect),
                max_aspect=None if masking.max_aspect is None else float(masking.max_aspect),
                max_block_ratio=None if masking.max_block_ratio is None else float(masking.max_block_ratio),
            ),
        )


def build_batch(settings: SSLBatchSettings, hu_slices: list[np.ndarray], rank: int, iteration: int) -> dict:
    """Rank-level batch ``iteration`` from B int16 HU slices (a pure function of its arguments)."""
    global_size, local_size, gram_size = settings.sizes(seeded_rng(settings.seed, _TAG_RESOLUTION, iteration))
    rng = seeded_rng(settings.seed, _TAG_AUGMENT, rank, iteration)
    samples = [
        multi_crop(
            settings.transform.prepare_slice(hu),
            global_size, local_size, gram_size, settings.crop_params, settings.transform, rng,
        )
        for hu in hu_slices
    ]
    return collate_ssl_batch(
        samples, settings.transform, settings.patch_size, settings.mask_ratio_min_max,
        settings.mask_sample_probability, settings.masking, rng,
    )


class SSLBatchStream(IterableDataset):
    """Endless stream of rank-level batches; see the module docstring for the ordering contract."""

    def __init__(self, settings: SSLBatchSettings, rank: int, world_size: int, start_iter: int, num_workers: int):
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.start_iter, self.num_workers = start_iter, num_workers

    def logical_worker(self) -> tuple[int, int]:
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        worker_id = info.id if info is not None else 0
        if n_workers != max(1, self.num_workers):
            raise RuntimeError(f"expected {self.num_workers} workers, DataLoader runs {n_workers}")
        return (worker_id + self.start_iter) % n_workers, n_workers

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = self.logical_worker()
        s = self.settings
        first = self.start_iter + (worker - self.start_iter) % n_workers  # first batch index of this worker
        stream = slot_stream(
            s.shards, slot=self.rank * n_workers + worker, n_slots=self.world_size * n_workers, seed=s.seed,
            start=(first - worker) // n_workers * s.batch_size, interleave=s.interleave,
            shuffle_block=s.shuffle_block,
        )
        iteration = first
        while True:
            raw = [next(stream)[1] for _ in range(s.batch_size)]
            yield build_batch(s, [decode_hu(r) for r in raw], self.rank, iteration)
            iteration += n_workers


def build_ssl_loader(cfg, rank: int = 0, world_size: int = 1, start_iter: int = 0) -> Iterator[dict]:
    """Iterator of SSL batch dicts for this rank, from batch ``start_iter`` on (see the module docstring).

    ``cfg`` is the whole pretraining config; only its ``data``, ``crops``, ``augment`` and ``masking`` blocks
    are read.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    settings = SSLBatchSettings.from_config(cfg, world_size)
    num_workers = int(cfg.data.num_workers)
    stream = SSLBatchStream(settings, rank, world_size, start_iter, num_workers)
    if num_workers == 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=bool(cfg.data.pin_memory) and torch.cuda.is_available(),
        prefetch_factor=int(cfg.data.prefetch_factor),
        persistent_workers=True,
    )
    return iter(loader)
