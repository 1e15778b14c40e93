"""What an nnU-Net user opens first in a fold folder, written while ``finetune.train.fit`` runs (rank 0 only).

- ``training_log.txt``: one timestamped line per event (start/resume, each epoch, new best, end), appended
  across resumes;
- ``progress.png``: redrawn after every epoch, as nnU-Net's: train/val loss with the mean pseudo-Dice and its
  moving average, epoch duration, learning rate;
- ``checkpoint_best.pth``: model + iteration whenever the moving average of the mean pseudo-Dice improves
  (nnU-Net's criterion: ``ema = 0.9 * ema + 0.1 * mean``, the first epoch's mean as the start);
- ``checkpoint_final.pth``: the last training checkpoint (a hard link to ``checkpoints/latest.pt``: no copy);
- TensorBoard scalars in ``tensorboard/`` when ``train.tensorboard`` is true (needs the ``tensorboard`` package).

The epoch records are the ones ``fit`` appends to ``metrics.jsonl`` (``epoch, iteration, train_loss, val_loss,
pseudo_dice, mean_pseudo_dice, lr, epoch_seconds``); on resume the earlier ones are read back from there so
the curves and the best score continue.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from meddino_common.atomic import atomic_write, atomic_write_to_path

EMA_MOMENTUM = 0.9  # nnU-Net's moving average of the pseudo-Dice


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_epoch_records(metrics_path: Path, up_to_iteration: int) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl`` up to ``up_to_iteration`` (a resumed run redoes later ones)."""
    if not metrics_path.exists():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if isinstance(record, dict) and "epoch" in record and int(record.get("iteration", 0)) <= up_to_iteration:
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def ema_pseudo_dice(records: list[dict[str, Any]]) -> list[float]:
    """nnU-Net's moving average of ``mean_pseudo_dice``, one value per record (NaN epochs keep the average)."""
    out: list[float] = []
    for record in records:
        value = float(record.get("mean_pseudo_dice", float("nan")))
        previous = out[-1] if out else float("nan")
        if math.isnan(previous):
            out.append(value)
        elif math.isnan(value):
            out.append(previous)
        else:
            out.append(EMA_MOMENTUM * previous + (1 - EMA_MOMENTUM) * value)
    return out


def plot_progress(records: list[dict[str, Any]], path: Path, dpi: int = 100) -> Path:
    """nnU-Net's ``progress.png`` from the epoch records (three panels sharing the epoch axis)."""
    import matplotlib.pyplot as plt

    from meddino_common.figures import save_png  # selects the Agg backend

    epochs = [int(r["epoch"]) for r in records]
    fig, (ax_loss, ax_time, ax_lr) = plt.subplots(3, 1, figsize=(10, 12), sharex=True)
    ax_loss.plot(epochs, [r["train_loss"] for r in records], color="b", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], color="r", label="val loss")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, [r["mean_pseudo_dice"] for r in records], color="g", ls="dotted", label="pseudo-Dice")
    ax_dice.plot(epochs, ema_pseudo_dice(records), color="g", label="pseudo-Dice (moving average)")
    ax_dice.set_ylabel("pseudo-Dice (mean over foreground classes)")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
    ax_loss.legend(handles, [h.get_label() for h in handles], loc="center right")
    ax_time.plot(epochs, [r["epoch_seconds"] for r in records], color="b")
    ax_time.set_ylabel("epoch duration (s)")
    ax_lr.plot(epochs, [max(r["lr"]) for r in records], color="b")
    ax_lr.set_ylabel("learning rate (largest group)")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (hard link; a copy where links are impossible), atomically."""
    def link(tmp: str) -> None:
        os.unlink(tmp)  # the placeholder: os.link needs a free name
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write_to_path(dst, link)


class FoldProgress:
    """The fold folder's log, curves, best/final checkpoints and TensorBoard (create on rank 0 only)."""

    def __init__(self, output_dir: Path, cfg, start_iteration: int, total_iterations: int) -> None:
        self.output_dir = Path(output_dir)
        self.records = read_epoch_records(self.output_dir / "metrics.jsonl", start_iteration)
        emas = ema_pseudo_dice(self.records)
        self.best = max((e for e in emas if not math.isnan(e)), default=float("-inf"))
        self.log_path = self.output_dir / "training_log.txt"
        self.tb = None
        if bool(cfg.train.tensorboard):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("train.tensorboard=true needs the tensorboard package "
                                  "(pip install tensorboard, or the project's [tensorboard] extra)") from err
            self.tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        what = f"resumed at iteration {start_iteration}" if start_iteration else "started"
        self.log(f"training {what} of {total_iterations} ({int(cfg.train.epochs)} epochs x "
                 f"{int(cfg.train.iters_per_epoch)} iterations), task {cfg.task.name}, head {cfg.head.name}")

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{_now()}: {text}\n")

    def end_epoch(self, record: dict[str, Any], model: nn.Module) -> bool:
        """Log, plot and (if the moving-average pseudo-Dice improved) save ``checkpoint_best.pth``; True if it did."""
        self.records = [r for r in self.records if int(r["epoch"]) < int(record["epoch"])] + [record]
        ema = ema_pseudo_dice(self.records)[-1]
        dice = ", ".join(f"{d:.4f}" for d in record["pseudo_dice"])
        self.log(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}, "
                 f"pseudo-Dice [{dice}] (mean {record['mean_pseudo_dice']:.4f}, moving average {ema:.4f}), "
                 f"lr {max(record['lr']):.3e}, {record['epoch_seconds']:.1f} s")
        plot_progress(self.records, self.output_dir / "progress.png")
        if self.tb is not None:
            step = int(record["iteration"])
            for key in ("train_loss", "val_loss", "mean_pseudo_dice"):
                self.tb.add_scalar(f"finetune/{key}", float(record[key]), step)
            self.tb.add_scalar("finetune/ema_pseudo_dice", ema, step)
            self.tb.add_scalar("finetune/lr", max(record["lr"]), step)
            for i, d in enumerate(record["pseudo_dice"], start=1):
                self.tb.add_scalar(f"finetune/pseudo_dice_class_{i}", d, step)
            self.tb.flush()
        improved = not math.isnan(ema) and ema > self.best
        if improved:
            self.best = ema
            path = self.output_dir / "checkpoint_best.pth"
            state = {"model": model.state_dict(), "iteration": int(record["iteration"]),
                     "epoch": int(record["epoch"]), "ema_pseudo_dice": ema}
            atomic_write(path, lambda f: torch.save(state, f))
            self.log(f"new best moving-average pseudo-Dice {ema:.4f}: wrote {path.name}")
        return improved

    def finish(self, last_checkpoint: Optional[Path]) -> None:
        """``checkpoint_final.pth`` = the last training checkpoint; closes TensorBoard."""
        if last_checkpoint is not None and last_checkpoint.exists():
            link_or_copy(last_checkpoint, self.output_dir / "checkpoint_final.pth")
            self.log(f"training done: checkpoint_final.pth (best moving-average pseudo-Dice {self.best:.4f})")
        if self.tb is not None:
            self.tb.close()
