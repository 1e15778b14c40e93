"""Training schedules precomputed as arrays indexed by iteration.

Every schedule is a linear warm-up from ``start`` to ``peak`` followed by a half-cosine from ``peak`` to ``end``
that reaches ``end`` on its last step (then constant at ``end``), as DINOv3's ``linear_warmup_cosine_decay``;
``end: null`` keeps the value constant at ``peak`` after the warm-up (DINOv3's Gram-anchoring and high-resolution
learning rates). Durations are given in "epochs" of ``train.official_epoch_length``
iterations so that recipes written in epochs (teacher-temperature warm-up over 30 epochs, last layer frozen for
the first epoch) keep their meaning whatever the iteration budget. The config block looks like::

    schedules:
      lr:            {start: 0, peak: ${optim.lr}, end: 1e-6, warmup_epochs: 10, freeze_last_layer_epochs: 1}
      weight_decay:  {start: 0.04, peak: 0.04, end: 0.2, warmup_epochs: 0}
      momentum:      {start: 0.992, peak: 0.992, end: 1.0, warmup_epochs: 0}
      teacher_temp:  {start: 0.04, peak: 0.07, end: 0.07, warmup_epochs: 30, cosine_epochs: 0}
      gram_weight:   null | {start: 0, peak: 2, end: 2, warmup_epochs: ...}
      dino_local_weight: null | {start: 1, peak: 1, end: 0.5, warmup_epochs: 0, cosine_epochs: 0.8}
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meddino_common.config import ConfigError


def warmup_cosine(
    start: float,
    peak: float,
    end: float,
    total_iterations: int,
    warmup_iterations: int = 0,
    cosine_iterations: int | None = None,
) -> np.ndarray:
    """float64 array ``[total_iterations]``: linear ``start -> peak`` over the warm-up, then cosine ``peak -> end``.

    The cosine spans ``cosine_iterations`` (default: everything after the warm-up) and the value stays at ``end``
    afterwards. Warm-up and cosine are truncated when the budget is shorter than they are.
    """
    if total_iterations <= 0:
        raise ValueError(f"schedule needs a positive number of iterations, got {total_iterations}")
    warmup_iterations = max(0, int(warmup_iterations))
    n_warm = min(warmup_iterations, total_iterations)  # a truncated warm-up keeps its slope
    warmup = start + (peak - start) * np.arange(n_warm, dtype=np.float64) / max(warmup_iterations, 1)
    remaining = total_iterations - n_warm
    n_cos = remaining if cosine_iterations is None else max(0, min(int(cosine_iterations), remaining))
    steps = np.arange(n_cos, dtype=np.float64)
    cosine = end + 0.5 * (peak - end) * (1.0 + np.cos(math.pi * steps / max(n_cos - 1, 1)))
    tail = np.full(remaining - n_cos, end, dtype=np.float64)
    out = np.concatenate([warmup, cosine, tail])
    assert out.shape == (total_iterations,)
    return out


def scaled_lr(base_lr: float, global_batch_size: int, scaling_rule: str | None) -> float:
    """Peak learning rate after the batch-size rule.

    ``none``: ``base_lr`` as is (the paper's 2e-4 is the lr used at batch 512). ``sqrt_wrt_1024``: DINOv3's rule
    ``base_lr * 4 * sqrt(global_batch_size / 1024)``.
    """
    if scaling_rule in (None, "none", ""):
        return float(base_lr)
    if scaling_rule == "sqrt_wrt_1024":
        return float(base_lr) * 4.0 * math.sqrt(global_batch_size / 1024.0)
    raise ConfigError(f"unknown optim.scaling_rule {scaling_rule!r}; use 'none' or 'sqrt_wrt_1024'")


@dataclass
class Schedules:
    """Per-iteration values: ``lr``, ``last_layer_lr`` (0 while the prototypes are frozen), ``weight_decay``,
    ``momentum`` (teacher EMA), ``teacher_temp`` and, when configured, ``gram_weight`` and ``dino_local_weight``.
    All arrays ``[iterations]``."""

    lr: np.ndarray
    last_layer_lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    gram_weight: np.ndarray | None = None
    dino_local_weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, iteration: int) -> dict[str, float]:
        """Values for ``iteration`` (clamped to the last one so a final extra step never goes out of range)."""
        i = min(max(int(iteration), 0), len(self.lr) - 1)
        out = {
            "lr": float(self.lr[i]),
            "last_layer_lr": float(self.last_layer_lr[i]),
            "wd": float(self.weight_decay[i]),
            "mom": float(self.momentum[i]),
            "teacher_temp": float(self.teacher_temp[i]),
        }
        if self.gram_weight is not None:
            out["gram_weight"] = float(self.gram_weight[i])
        if self.dino_local_weight is not None:
            out["dino_local_weight"] = float(self.dino_local_weight[i])
        return out


SCHEDULE_KEYS = ("start", "peak", "end", "warmup_epochs", "cosine_epochs")
LR_KEYS = ("start", "end", "warmup_epochs", "freeze_last_layer_epochs", "cosine_epochs")  # peak: optim.lr


def _keys(name: str, block, keys: tuple[str, ...]) -> dict:
    """The block's values; a block that a config file gives whole (``gram_weight`` and ``dino_local_weight`` are
    null in base.yaml, so their keys are not checked at merge) must name every key."""
    missing = [k for k in keys if k not in block]
    if missing:
        raise ConfigError(f"schedules.{name} lacks {', '.join(missing)} (a schedule block names {', '.join(keys)})")
    return {k: block[k] for k in keys}


def _iterations(epochs, epoch_length: int) -> int | None:
    return None if epochs is None else int(round(float(epochs) * epoch_length))


def _from_block(name: str, block, total: int, epoch_length: int) -> np.ndarray:
    b = _keys(name, block, SCHEDULE_KEYS)
    return warmup_cosine(
        start=float(b["start"]),
        peak=float(b["peak"]),
        end=float(b["peak"] if b["end"] is None else b["end"]),
        total_iterations=total,
        warmup_iterations=_iterations(b["warmup_epochs"], epoch_length),
        cosine_iterations=_iterations(b["cosine_epochs"], epoch_length),
    )


def build_schedules(cfg, global_batch_size: int) -> Schedules:
    """Schedules of a whole stage from the config (``train.iterations``, ``train.official_epoch_length``,
    ``optim.lr``/``scaling_rule`` and the ``schedules`` block described in the module docstring)."""
    total = int(cfg.train.iterations)
    epoch_length = int(cfg.train.official_epoch_length)
    sch = cfg.schedules
    peak_lr = scaled_lr(float(cfg.optim.lr), global_batch_size, str(cfg.optim.scaling_rule))
    scale = peak_lr / float(cfg.optim.lr) if float(cfg.optim.lr) != 0 else 1.0
    lr_block = _keys("lr", sch.lr, LR_KEYS)
    lr = warmup_cosine(
        start=float(lr_block["start"]) * scale,
        peak=peak_lr,
        end=peak_lr if lr_block["end"] is None else float(lr_block["end"]),
        total_iterations=total,
        warmup_iterations=_iterations(lr_block["warmup_epochs"], epoch_length),
        cosine_iterations=_iterations(lr_block["cosine_epochs"], epoch_length),
    )
    last_layer_lr = lr.copy()
    last_layer_lr[: min(_iterations(lr_block["freeze_last_layer_epochs"], epoch_length), total)] = 0.0
    optional = {name: None if sch[name] is None else _from_block(name, sch[name], total, epoch_length)
                for name in ("gram_weight", "dino_local_weight")}
    return Schedules(
        lr=lr,
        last_layer_lr=last_layer_lr,
        weight_decay=_from_block("weight_decay", sch.weight_decay, total, epoch_length),
        momentum=_from_block("momentum", sch.momentum, total, epoch_length),
        teacher_temp=_from_block("teacher_temp", sch.teacher_temp, total, epoch_length),
        **optional,
    )
