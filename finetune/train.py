"""The common training loop for every head (nnU-Net-style epochs of fixed length).

``epochs x iters_per_epoch`` iterations (paper: 1000 x 250) of: batch from `finetune.data` -> recipe training step
under autocast (bf16/fp16 on GPU, fp32 on CPU) -> backward (GradScaler for fp16) -> grad-norm clipping
(``optim.grad_clip`` = 12) -> AdamW step -> lr of every group set to ``base_lr x factor`` where the factor decays
linearly to 0 at the last iteration (after an optional linear warm-up). After each epoch: pseudo-Dice on
``train.val_iters`` un-augmented validation batches (nnU-Net's online estimate: hard tp/fp/fn summed over the
batches, Dice per class), one line in ``metrics.jsonl`` and an atomic checkpoint ``checkpoints/latest.pt``
(model, optimizer, scaler, iteration), from which ``train.resume=auto`` continues bit-for-bit on CPU (batches are
a function of the iteration). DDP: launched with torchrun (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel and ``data.batch_size`` is the GLOBAL batch, split over the ranks with nnU-Net's per-rank
foreground-oversampling correction (`finetune.data.rank_batch_plan`, printed at the start); the batch-Dice terms
are summed over ranks (`finetune.losses`), so N GPUs train the paper's recipe, not an N-times larger batch.
Pseudo-Dice counts stay on the device (no per-iteration copy of the logits to the host).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from finetune.data import (PatchSampler, PreprocessedCase, RankBatch, batch_stream, format_batch_plan,
                           load_preprocessed, rank_batch_plan)
from finetune.losses import pseudo_dice_stats
from finetune.preprocess import Plans
from finetune.progress import FoldProgress
from meddino_common.atomic import atomic_write
from meddino_common.precision import autocast
from meddino_common.seeding import derive_seed


def setup_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)`` from the torchrun environment; a single CPU/GPU process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def lr_factor(iteration: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up over ``warmup`` iterations, then linear decay reaching 0 at ``total``."""
    if warmup > 0 and iteration < warmup:
        return (iteration + 1) / warmup
    return max(0.0, (total - iteration) / max(total - warmup, 1))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename: an interrupted save leaves the previous file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def build_optimizer(model: nn.Module, recipe, cfg) -> torch.optim.AdamW:
    """AdamW over the recipe's parameter groups (each with its ``lr`` and ``base_lr``), betas/eps/wd from ``optim``."""
    return torch.optim.AdamW(recipe.param_groups(model, cfg), betas=tuple(cfg.optim.betas), eps=float(cfg.optim.eps),
                             weight_decay=float(cfg.optim.weight_decay))


def train_step(model: nn.Module, recipe, batch: dict, loss_fn: Callable, cfg, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: str, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step on ``batch``: the recipe's forward + loss under autocast, backward (loss-scaled for
    fp16), unscale, clip the norm of every optimised parameter's gradient to ``optim.grad_clip``, AdamW step.

    Returns ``(loss, logits, label, grad_norm)``, loss and logits detached, label the int64 target on ``device``.
    Under DDP (``model`` wrapped) the gradients are those of the global batch: DDP averages the ranks' gradients and
    the batch-Dice terms span every rank (`finetune.losses`). A non-finite loss stops before any update."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True).long()
    with autocast(precision, device):
        loss, logits = recipe.training_step(model, {**batch, "image": image, "label": label}, loss_fn, cfg)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)} (cases {batch['case_ids']})")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(cfg.optim.grad_clip))
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach(), label, grad_norm


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dice_from_stats(stats: torch.Tensor) -> list[float]:
    tp, fp, fn = stats.double().cpu()
    return [float(2 * t / (2 * t + p + n)) if (2 * t + p + n) > 0 else float("nan") for t, p, n in zip(tp, fp, fn)]


@torch.no_grad()
def pseudo_dice(model: nn.Module, recipe, sampler: PatchSampler, cfg, loss_fn, device: torch.device, epoch: int,
                n_batches: int) -> tuple[float, list[float]]:
    """Validation loss and per-class pseudo-Dice on ``n_batches`` un-augmented validation batches."""
    model.eval()
    stats, losses = None, []
    for i, batch in enumerate(batch_stream(sampler, epoch * n_batches, (epoch + 1) * n_batches, 0, stream=1, augment=False)):
        image, label = batch["image"].to(device), batch["label"].to(device).long()
        with autocast(str(cfg.train.precision), device):
            loss, logits = recipe.training_step(model, {**batch, "image": image, "label": label}, loss_fn, cfg)
        losses.append(float(loss))
        s = pseudo_dice_stats(logits.detach(), label)
        stats = s if stats is None else stats + s
    if dist.is_initialized():
        dist.all_reduce(stats)
    model.train()
    return float(sum(losses) / max(len(losses), 1)), _dice_from_stats(stats)


def rank_share(cfg, rank: int, world: int) -> RankBatch:
    """This rank's share of the global ``data.batch_size``; rank 0 prints the whole plan."""
    plan = rank_batch_plan(int(cfg.data.batch_size), world, float(cfg.data.oversample_foreground))
    if rank == 0:
        print(format_batch_plan(plan, int(cfg.data.batch_size)), flush=True)
    return plan[rank]


def _as_cases(cases: Sequence[PreprocessedCase | str | Path]) -> list[PreprocessedCase]:
    return [c if isinstance(c, PreprocessedCase) else load_preprocessed(c) for c in cases]


def fit(cfg, recipe, train_cases: Sequence[PreprocessedCase | str | Path], val_cases: Sequence[PreprocessedCase | str | Path],
        output_dir: Path, plans: Plans, model: Optional[nn.Module] = None,
        on_epoch_end: Optional[Callable[[dict, nn.Module], None]] = None) -> nn.Module:
    """Train ``recipe``'s model on preprocessed cases (objects with ``.case_id`` or their cache folders); returns the
    trained model (unwrapped, eval mode, on its device).

    The classes are ``plans.labels`` and the training patch is ``plans.patch_size`` (the objects prediction reads
    too). ``model`` may be passed in (multi-stage recipes); otherwise ``recipe.build_model(cfg, n_classes)``. Writes
    ``metrics.jsonl``, ``checkpoints/latest.pt`` and ``model_final.pt`` (a plain state dict) in ``output_dir``.
    ``on_epoch_end(record, model)`` is called on rank 0 after each epoch's validation with the ``metrics.jsonl``
    record and the unwrapped model (multi-stage recipes keep their best checkpoint with it).
    """
    n_classes = len(plans.labels)
    output_dir = Path(output_dir)
    rank, world, device = setup_distributed()
    torch.manual_seed(int(cfg.seed))
    if model is None:
        model = recipe.build_model(cfg, n_classes)
    model = model.to(device)
    optimizer = build_optimizer(model, recipe, cfg)
    precision = str(cfg.train.precision) if device.type == "cuda" else "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    loss_fn = recipe.build_loss(cfg)
    iters_per_epoch, epochs = int(cfg.train.iters_per_epoch), int(cfg.train.epochs)
    total = iters_per_epoch * epochs
    warmup = int(cfg.optim.warmup_iters)

    ckpt_path = output_dir / "checkpoints" / "latest.pt"
    start = 0
    resume = str(cfg.train.resume)
    resume_path = ckpt_path if resume == "auto" else (Path(resume) if resume not in ("none", "") else None)
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        if rank == 0:
            print(f"resumed from {resume_path} at iteration {start}/{total}", flush=True)
    elif resume not in ("auto", "none", "") and resume_path is not None:
        raise FileNotFoundError(f"train.resume={resume}: checkpoint not found")

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if bool(cfg.train.compile):
        train_model = torch.compile(train_model)

    train_cases = _as_cases(train_cases)
    val_cases = _as_cases(val_cases) or train_cases
    share = rank_share(cfg, rank, world)
    sampler = PatchSampler(train_cases, cfg, recipe.sampling, plans.patch_size, int(cfg.seed), rank, share)
    val_sampler = PatchSampler(val_cases, cfg, recipe.sampling, plans.patch_size, int(cfg.seed) + 1, rank, share)

    progress = None
    if rank == 0 and bool(cfg.train.progress):
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc=f"train {recipe.name}", unit="it", dynamic_ncols=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    fold_progress = FoldProgress(output_dir, cfg, start, total) if rank == 0 else None
    train_model.train()
    train_stats = torch.zeros(3, n_classes - 1, dtype=torch.int64, device=device)
    epoch_losses: list[float] = []
    t_epoch = time.time()
    stream = batch_stream(sampler, start, total, int(cfg.data.num_workers), stream=0, augment=True)
    for iteration, batch in zip(range(start, total), stream):
        torch.manual_seed(derive_seed(int(cfg.seed), rank, iteration))  # drop path etc.: resumable
        factor = lr_factor(iteration, total, warmup)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        try:
            loss, logits, label, grad_norm = train_step(train_model, recipe, batch, loss_fn, cfg, optimizer, scaler,
                                                        precision, device)
        except FloatingPointError as err:
            raise FloatingPointError(f"iteration {iteration}: {err}") from None
        epoch_losses.append(float(loss))
        train_stats += pseudo_dice_stats(logits, label)
        if progress is not None:
            dices = [d for d in _dice_from_stats(train_stats) if not math.isnan(d)]
            progress.set_postfix(loss=f"{epoch_losses[-1]:.4f}", pseudo_dice=f"{(sum(dices) / len(dices)) if dices else float('nan'):.3f}",
                                 lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
            progress.update(1)
        if (iteration + 1) % iters_per_epoch == 0 or iteration + 1 == total:
            epoch = iteration // iters_per_epoch
            val_loss, val_dice = pseudo_dice(train_model, recipe, val_sampler, cfg, loss_fn, device, epoch,
                                             int(cfg.train.val_iters))
            record = {"epoch": epoch, "iteration": iteration + 1, "train_loss": sum(epoch_losses) / len(epoch_losses),
                      "val_loss": val_loss, "pseudo_dice": val_dice,
                      "mean_pseudo_dice": _nanmean_list(val_dice), "train_pseudo_dice": _dice_from_stats(train_stats),
                      "grad_norm": float(grad_norm), "lr": [g["lr"] for g in optimizer.param_groups],
                      "epoch_seconds": time.time() - t_epoch}
            if rank == 0:
                with open(output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if on_epoch_end is not None:
                    on_epoch_end(record, model)
                if progress is not None:
                    progress.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}, "
                                   f"pseudo-Dice {[round(d, 3) for d in val_dice]}")
                every = max(int(cfg.train.checkpoint_every_epochs), 1)
                if (epoch + 1) % every == 0 or iteration + 1 == total:
                    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "iteration": iteration + 1}, ckpt_path)
                fold_progress.end_epoch(record, model)  # training_log.txt, progress.png, checkpoint_best.pth
            epoch_losses, t_epoch = [], time.time()
            train_stats.zero_()
    if progress is not None:
        progress.close()
    if rank == 0:
        atomic_torch_save(model.state_dict(), output_dir / "model_final.pt")
        fold_progress.finish(ckpt_path)
    if dist.is_initialized():
        dist.barrier()
    model.eval()
    return model


def _nanmean_list(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
