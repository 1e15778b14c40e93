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

import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

BASE_NAME = "base.yaml"
OPEN_BLOCKS = ("student.overrides",)  # free-form: any build_backbone keyword


class ConfigError(ValueError):
    """A config file or override that cannot be used (one line naming the key or file)."""


def default_config_dir() -> Path:
    """``configs/pretrain`` of the checkout this package lives in."""
    return Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a plain container (open blocks, empty dicts and lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in OPEN_BLOCKS:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _kind(value: Any) -> str | None:
    """``bool`` / ``number`` / ``str`` / ``list`` / ``dict``; None for null and ``${...}`` interpolations."""
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "str", list: "list", dict: "dict"}.get(type(value))


def _check_against(base: DictConfig, overlay: DictConfig, origin: str) -> None:
    """Refuse keys of ``overlay`` that ``base`` does not declare and values whose type contradicts base's."""
    known = _flatten(OmegaConf.to_container(base, resolve=False))
    blocks = {p for k in known for p in _parents(k)}
    for key, value in _flatten(OmegaConf.to_container(overlay, resolve=False)).items():
        if any(key == b or key.startswith(b + ".") for b in OPEN_BLOCKS):
            continue
        if key not in known:
            # a whole block given where base has null (e.g. schedules.gram_weight: {start: ...}) is fine
            if any(p in known and known[p] is None for p in _parents(key)) or key in blocks:
                continue
            near = difflib.get_close_matches(key, [*known, *blocks], n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{origin}: unknown config key {key}{hint}")
        want, got = _kind(known[key]), _kind(value)
        if want is None or got is None or want == got:
            continue
        if got == "list" and want == "number" and all(_kind(v) == "number" for v in value):
            continue  # one size or a list of sizes (crops.*_size of stage 3)
        if want == "str" and known[key] == "auto" and got == "bool":
            continue  # tri-state switches: auto | true | false (compute.compile)
        if got == "dict" and want == "dict":
            continue
        raise ConfigError(f"{origin}: {key}={value!r} is a {got}, but {key} takes a {want} (default {known[key]!r})")


def _parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the file
        raise ConfigError(f"{path}: not a readable YAML config: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(cfg).__name__}")
    return cfg


def load_config(
    config_files: str | Path | Sequence[str | Path],
    overrides: Sequence[str] = (),
    base: str | Path | None = None,
) -> DictConfig:
    """Merge ``base.yaml`` (next to the first file unless ``base`` is given), then each file in order, then the
    ``key=value`` overrides, refusing unknown keys and wrong types (module docstring). A file that is the base
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
    base_cfg = _load_yaml(base_path)
    merged = base_cfg
    for f in files:
        if f.resolve() == base_path.resolve():
            continue
        layer = _load_yaml(f)
        _check_against(base_cfg, layer, str(f))
        merged = OmegaConf.merge(merged, layer)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        try:
            layer = OmegaConf.from_dotlist(list(overrides))
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"cannot parse overrides {list(overrides)}: {str(err).splitlines()[0]}") from err
        _check_against(base_cfg, layer, "command line")
        merged = OmegaConf.merge(merged, layer)
    return merged


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
