"""Pretraining configuration: ``configs/pretrain/base.yaml`` + stage/experiment file(s) + command-line dot-list.

Every hyperparameter lives in the YAML files; this module merges them (OmegaConf) strictly: ``base.yaml`` declares
every key, so a key that base does not know (``optim.lrr=1``) is an error naming the nearest valid key, and a value
whose type contradicts base's (``optim.lr=abc``, ``compute.compile=3``) is an error naming the key. The only open
blocks are ``student.overrides`` (``build_backbone`` keyword arguments) and schedule blocks that base leaves null.

:func:`tiny_overrides` shrinks a shipped stage config to CPU size for tests and ``pretrain.preflight --tiny``:
it touches sizes only (width, depth, crop sizes, prototypes, batch, iterations and the iteration counts derived
from them), never a recipe switch, so the tiny run takes the same code path as the full one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from meddino_common.config import ConfigError, load_config as load_strict, shipped_config

__all__ = ["ConfigError", "default_config_dir", "load_config", "tiny_overrides"]

BASE_NAME = "base.yaml"
OPEN_BLOCKS = ("student.overrides",)  # free-form: any build_backbone keyword
# one size or a list of sizes drawn per batch (stage 3 mixes resolutions)
SIZE_LISTS = {f"crops.{k}": ("list",) for k in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size")}


def default_config_dir() -> Path:
    """``configs/pretrain`` of the checkout (or installed ``configs`` package) next to this package."""
    return shipped_config("pretrain")


def load_config(
    config_files: str | Path | Sequence[str | Path],
    overrides: Sequence[str] = (),
    base: str | Path | None = None,
) -> DictConfig:
    """``base.yaml`` (next to the first file unless ``base`` is given) <- each file in order <- ``key=value``
    overrides, through the project's one strict loader (:mod:`meddino_common.config`). A file that is the base
    itself is not merged twice."""
    files = [Path(config_files)] if isinstance(config_files, (str, Path)) else [Path(f) for f in config_files]
    if not files:
        raise ConfigError("at least one config file is needed (e.g. configs/pretrain/stage1.yaml)")
    for f in files:
        if not f.is_file():
            raise ConfigError(f"config file not found: {f}")
    base_path = Path(base) if base is not None else files[0].parent / BASE_NAME
    if not base_path.is_file():
        raise ConfigError(f"base config not found: {base_path} (expected next to {files[0]})")
    layers = [f for f in files if f.resolve() != base_path.resolve()]
    return load_strict([base_path], layers, overrides, open_blocks=OPEN_BLOCKS, alternatives=SIZE_LISTS)


# ---------------------------------------------------------------------------------------------- tiny sizes
TINY_WIDTH = {"embed_dim": 64, "num_heads": 4, "depth": 2}
TINY_HEAD = {"head_n_prototypes": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32}
REFERENCE_WORLD = 8  # GPUs the shipped per-rank caps are sized for
TINY_CROP_DIVISOR = 8  # 224 -> 32, 96 -> 16, 768 -> 96, 1152 -> 144 (multiples of the patch size)


def _tiny_px(size: int, patch: int) -> int:
    return max(patch, int(round(size / TINY_CROP_DIVISOR / patch)) * patch)


def tiny_overrides(cfg: DictConfig, iterations: int = 8, global_batch: int = 4,
                   gram_teacher_iteration: int | None = None) -> list[str]:
    """Dot-list that shrinks ``cfg`` (a merged shipped stage config) to a CPU-sized run of the same recipe.

    Sizes only: backbone width/depth (the arch's other settings stay), head widths, crop sizes (each divided by
    8, rounded to the patch), global batch and per-rank memory cap (scaled together so that a stage which
    accumulates gradients at full size still does), loader buffers, iterations, and every count measured in
    iterations (epoch length, checkpoint period, teacher snapshots, the Gram teacher's iteration) scaled by the
    same factor so that schedules keep their shape. A stage whose Gram teacher is a stage-1 snapshot needs
    ``gram_teacher_iteration``: the tiny stage-1 run's snapshot (:func:`tiny_overrides` of stage 1 lists it).
    """
    patch = int(cfg.crops.patch_size)
    out = [f"student.overrides.{k}={v}" for k, v in TINY_WIDTH.items()]
    out += [f"{head}.{k}={v}" for head in ("dino", "ibot") for k, v in TINY_HEAD.items()]
    for key in ("global_crops_size", "local_crops_size", "gram_teacher_crops_size"):
        value = cfg.crops[key]
        if value is None:
            continue
        sizes = [int(v) for v in value] if OmegaConf.is_list(value) else [int(value)]
        tiny = [_tiny_px(s, patch) for s in sizes]
        out.append(f"crops.{key}=" + (f"[{','.join(map(str, tiny))}]" if OmegaConf.is_list(value) else str(tiny[0])))
    # the per-GPU caps are written for one 8-GPU node: a tiny single-rank run keeps each stage's ratio of cap to
    # that node's share of the batch, so stage 1 needs no accumulation, stage 2 accumulates 2 and stage 3 more
    full_batch, full_cap = int(cfg.train.global_batch_size), int(cfg.data.max_batch_size_per_rank)
    cap = min(global_batch, max(2, round(global_batch * full_cap * REFERENCE_WORLD / full_batch)))  # KoLeo: >= 2
    out += [f"train.global_batch_size={global_batch}", f"data.max_batch_size_per_rank={cap}",
            f"data.num_workers={min(int(cfg.data.num_workers), 1)}", "data.interleave_shards=2",
            "data.shuffle_block=16"]
    full_its = int(cfg.train.iterations)
    scale = iterations / full_its

    def its(n: int) -> int:
        return max(1, int(round(n * scale)))

    out += [f"train.iterations={iterations}",
            f"train.official_epoch_length={max(1, int(round(int(cfg.train.official_epoch_length) * scale)))}",
            f"checkpointing.period={its(int(cfg.checkpointing.period))}"]
    snaps = [its(int(s)) for s in (cfg.checkpointing.teacher_snapshots or [])]
    out.append(f"checkpointing.teacher_snapshots=[{','.join(map(str, snaps))}]")
    if cfg.gram.use_loss and cfg.gram.teacher.source == "stage1_iteration":
        if gram_teacher_iteration is None:
            raise ConfigError("tiny_overrides: this stage reads stage 1's EMA-teacher snapshot; pass the tiny stage-1 "
                              "snapshot iteration as gram_teacher_iteration")
        out.append(f"gram.teacher.iteration={int(gram_teacher_iteration)}")
    return out
