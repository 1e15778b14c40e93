"""Training batches from the preprocessed cache: nnU-Net foreground oversampling + augmentation.

A batch is a pure function of ``(seed, rank, iteration, stream)``: resuming at iteration i reproduces the batches
of an uninterrupted run, and DDP ranks draw different batches. Batches are built in background threads
(``data.num_workers``; numpy/scipy/torch release the GIL for the heavy parts) and handed out in order.

Sampling (nnU-Net ``DataLoader2D``/``3D``): per sample a random case; the last ``B - round(B * (1 - oversample))``
samples of each batch are centred on a random voxel of a random foreground class present in the case (random if
the case has none); windows follow nnU-Net's ``get_bbox`` (a window may stick out of the image and is zero-padded).
See `finetune.heads` for the batch layout of ``slice2d`` and ``slab3d`` recipes.
"""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from finetune.augment import augment_sample
from meddino_common.seeding import seeded_rng


@dataclass
class PreprocessedCase:
    case_id: str
    image: np.ndarray                    # [Z, Y, X] float32 (memory-mapped)
    label: np.ndarray                    # [Z, Y, X] uint8 (memory-mapped)
    locations: dict[int, np.ndarray]     # class -> [n, 3] (z, y, x)
    props: dict


def load_preprocessed(case_dir: str | Path) -> PreprocessedCase:
    case_dir = Path(case_dir)
    props = json.loads((case_dir / "props.json").read_text())
    with np.load(case_dir / "locations.npz") as locs:
        locations = {int(k): locs[k] for k in locs.files}
    return PreprocessedCase(props["case_id"], np.load(case_dir / "image.npy", mmap_mode="r"),
                            np.load(case_dir / "label.npy", mmap_mode="r"), locations, props)


@dataclass(frozen=True)
class RankBatch:
    """One DDP rank's share of the configured global batch (nnU-Net ``_set_batch_size_and_oversample``)."""

    rank: int
    batch_size: int
    oversample: float          # this rank's foreground-oversampling fraction
    n_forced: int              # samples of this rank's batch forced to contain foreground


def rank_batch_plan(global_batch: int, world: int, oversample: float) -> list[RankBatch]:
    """Split ``global_batch`` over ``world`` ranks as nnU-Net does under DDP.

    The first ``global_batch % world`` ranks take one sample more. The global batch's last
    ``global_batch - round(global_batch * (1 - oversample))`` samples are the forced-foreground ones; each rank gets
    the fraction of those falling in its slice, so the whole step still forces the number a single process would
    (global 12, oversample 0.33, 4 ranks: 3/3/3/3 samples, 0/0/1/3 forced).
    """
    if world < 1 or global_batch < world:
        raise ValueError(f"data.batch_size={global_batch} is the global batch: it cannot be split over {world} "
                         "processes (each needs at least one sample); raise the batch or use fewer GPUs")
    sizes = [global_batch // world + (1 if r < global_batch % world else 0) for r in range(world)]
    n_random = round(global_batch * (1 - oversample))
    plan, low = [], 0
    for rank, size in enumerate(sizes):
        high = low + size
        if high / global_batch < 1 - oversample:
            frac = 0.0
        elif low / global_batch > 1 - oversample:
            frac = 1.0
        else:
            frac = sum(i >= n_random for i in range(low, high)) / size
        plan.append(RankBatch(rank, size, frac, size - int(round(size * (1 - frac)))))
        low = high
    return plan


def format_batch_plan(plan: Sequence[RankBatch], global_batch: int) -> str:
    """The ``--plan``-style lines printed at the start of training (one per rank)."""
    lines = [f"batch plan: global batch {global_batch} over {len(plan)} process(es)"]
    lines += [f"  rank {r.rank}: {r.batch_size} samples, oversample {r.oversample:.3f} ({r.n_forced} forced foreground)"
              for r in plan]
    return "\n".join(lines)


def _window_start(rng: np.random.Generator, size: int, patch: int, voxel: Optional[int]) -> int:
    """A window start along one axis as nnU-Net's ``get_bbox`` (negative / beyond the image = zero padding).

    Random windows start in ``[lb, ub]``. A foreground-forced window is centred on ``voxel`` and only clamped from
    below (``max(lb, voxel - patch // 2)``): nnU-Net does not pull it back inside at the far end, so a structure at
    the image border stays at the patch centre with padding beyond it."""
    need = max(patch - size, 0)
    lb = -(need // 2)
    ub = size + need // 2 + need % 2 - patch
    if voxel is None:
        return int(rng.integers(lb, ub + 1))
    return int(max(voxel - patch // 2, lb))


class PatchSampler:
    """Builds ``slice2d`` / ``slab3d`` batches from preprocessed cases (see module docstring)."""

    def __init__(self, cases: Sequence[PreprocessedCase], cfg, sampling: str, patch_size: Sequence[int], seed: int,
                 rank: int = 0, share: Optional[RankBatch] = None) -> None:
        """``patch_size``: the in-plane window ``[Y, X]`` (the plans' ``patch_size``). ``share``: this rank's batch
        size and oversampling (`rank_batch_plan`); None = the whole configured batch (one process)."""
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.cfg = cfg
        self.sampling = sampling
        self.seed = int(seed)
        self.rank = int(rank)
        self.patch = [int(p) for p in patch_size]
        self.context = int(cfg.data.context_slices)
        self.slab_depth = int(cfg.data.slab_depth)
        self.batch_size = int(share.batch_size) if share is not None else int(cfg.data.batch_size)
        self.oversample = float(share.oversample) if share is not None else float(cfg.data.oversample_foreground)

    def _slice_indices(self, rng: np.random.Generator, n_slices: int, z_voxel: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image slice indices and label slice indices (``-1`` = padding) for one sample."""
        if self.sampling == "slice2d":
            z = int(rng.integers(n_slices)) if z_voxel is None else int(z_voxel)
            image_z = np.clip(np.arange(z - self.context, z + self.context + 1), 0, n_slices - 1)
            return image_z, np.array([z])
        z0 = _window_start(rng, n_slices, self.slab_depth, z_voxel)
        zs = np.arange(z0, z0 + self.slab_depth)
        zs = np.where((zs >= 0) & (zs < n_slices), zs, -1)
        return zs, zs

    @staticmethod
    def _take(volume: np.ndarray, zs: np.ndarray) -> torch.Tensor:
        out = np.zeros((len(zs), *volume.shape[1:]), dtype=volume.dtype)
        valid = zs >= 0
        if valid.any():
            out[valid] = volume[zs[valid]]
        return torch.from_numpy(out)

    def sample(self, rng: np.random.Generator, force_foreground: bool, augment: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, str]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        voxel = None
        if force_foreground and case.locations:
            cls = sorted(case.locations)[int(rng.integers(len(case.locations)))]
            locs = case.locations[cls]
            voxel = locs[int(rng.integers(len(locs)))]
        image_z, label_z = self._slice_indices(rng, case.image.shape[0], None if voxel is None else voxel[0])
        image = self._take(case.image, image_z)
        label = self._take(case.label, label_z)
        top_left = [_window_start(rng, case.image.shape[1 + a], self.patch[a], None if voxel is None else int(voxel[1 + a]))
                    for a in range(2)]
        image, label = augment_sample(image, label, top_left, self.patch, rng, self.cfg.augment, augment)
        return image, label, case.case_id

    def batch(self, iteration: int, batch_size: Optional[int] = None, stream: int = 0, augment: bool = True) -> dict:
        """Batch number ``iteration`` of ``stream`` (0 = training, 1 = validation)."""
        batch_size = int(batch_size or self.batch_size)
        rng = seeded_rng(self.seed, self.rank, stream, int(iteration))
        n_random = int(round(batch_size * (1 - self.oversample)))
        images, labels, ids = [], [], []
        for i in range(batch_size):
            img, lab, cid = self.sample(rng, force_foreground=i >= n_random, augment=augment)
            images.append(img)
            labels.append(lab)
            ids.append(cid)
        image = torch.stack(images).float()
        label = torch.stack(labels)              # uint8 as stored: widened to int64 on the device (8x less to copy)
        if self.sampling == "slice2d":
            label = label[:, 0]
        else:
            image = image[:, None]
        return {"image": image, "label": label, "case_ids": ids}


def batch_stream(sampler: PatchSampler, start: int, stop: int, num_workers: int = 0, stream: int = 0,
                 augment: bool = True, batch_size: Optional[int] = None) -> Iterator[dict]:
    """Batches ``start..stop-1`` in order, prefetched by ``num_workers`` threads (0 = in the caller's thread)."""
    if num_workers <= 0:
        for it in range(start, stop):
            yield sampler.batch(it, batch_size, stream, augment)
        return
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending: deque = deque()
        nxt = start
        while nxt < stop and len(pending) < 2 * num_workers:
            pending.append(pool.submit(sampler.batch, nxt, batch_size, stream, augment))
            nxt += 1
        while pending:
            batch = pending.popleft().result()
            if nxt < stop:
                pending.append(pool.submit(sampler.batch, nxt, batch_size, stream, augment))
                nxt += 1
            yield batch
