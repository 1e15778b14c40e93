"""The training loop of all three pretraining stages (``python -m pretrain.train``).

One code path for one CPU process, torchrun and SLURM. :func:`train` sets a run up (:func:`setup`: distributed
environment, batch plan, output folder, meta-architecture, its wrapping for the hardware, optimizer, schedules,
resume), then each iteration is :func:`train_step` (schedules, gradient-accumulated SSL forward/backward,
per-module clipping, non-finite checks, optimizer step, teacher EMA), followed by logging, teacher snapshots,
periodic atomic checkpoints and preemption handling; a finished stage exports the EMA teacher backbone and writes
its completion record (:func:`finish`).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

from meddino_common.atomic import remove_stale_temporaries
from meddino_common.config import ConfigError
from meddino_common.precision import configure_tf32
from meddino_common.seeding import derive_seed, seed_everything
from pretrain.data.plan import BatchPlan, plan_from_config
from pretrain.train import checkpointing as ckpt_io
from pretrain.train import distributed as D
from pretrain.train.flops import FlopCounter, peak_flops
from pretrain.train.meta_arch import SSLMetaArch
from pretrain.train.metrics_log import MetricsLogger
from pretrain.train.optim import apply_schedules, build_optimizer, clip_student_gradients
from pretrain.train.parallel import wrap_model
from pretrain.train.preemption import PreemptionHandler, in_slurm_job, requeue_slurm_job
from pretrain.train.schedules import Schedules, build_schedules
from pretrain.train.stage_init import GramRefresh, gram_snapshot_path, initialise_gram_teacher, initialise_weights

_TAG_RANK_STREAM = 1  # seeding key of each rank's training stream (drop path, RoPE jitter)


class NonFiniteLossError(RuntimeError):
    """A loss, gradient or weight became NaN/Inf; training stopped before it reached a checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    finished: bool
    preempted: bool = False
    requeued: bool = False
    teacher_backbone: Path | None = None
    last_checkpoint: Path | None = None
    plan: BatchPlan | None = None
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class LoopSettings:
    """The loop's own config values, read once (``train.*``, ``checkpointing.*``, ``optim.clip_grad``)."""

    stage: str
    iterations: int
    checkpoint_every: int
    keep_last: int
    teacher_snapshots: frozenset[int]
    clip_grad: float | None
    precision: str
    requeue_on_preemption: bool

    @classmethod
    def from_config(cls, cfg) -> "LoopSettings":
        clip = cfg.optim.clip_grad
        return cls(stage=str(cfg.stage), iterations=int(cfg.train.iterations),
                   checkpoint_every=int(cfg.checkpointing.period), keep_last=int(cfg.checkpointing.keep_last),
                   teacher_snapshots=frozenset(int(i) for i in (cfg.checkpointing.teacher_snapshots or [])),
                   clip_grad=float(clip) if clip is not None and float(clip) > 0 else None,
                   precision=str(cfg.compute.precision),
                   requeue_on_preemption=bool(cfg.train.requeue_on_preemption))


@dataclass
class Run:
    """Everything a step needs, built once by :func:`setup`."""

    cfg: Any
    settings: LoopSettings
    dist: D.DistEnv
    device: torch.device
    comm: D.Comm
    plan: BatchPlan
    output_dir: Path
    meta: SSLMetaArch
    mode: str  # none | ddp | fsdp
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    gram_refresh: GramRefresh
    flop_counter: FlopCounter | None
    peak_flops: float | None
    start_iter: int = 0
    last_good: Path | None = None  # newest checkpoint with finite weights (named in a non-finite error)

    @property
    def ckpt_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def non_finite(self, what: str, iteration: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{what} at iteration {iteration} (rank {self.dist.rank}). Training stopped before it reached a "
            f"checkpoint; the last good checkpoint (finite weights and losses) is {self.last_good or 'none yet'}. "
            "Lower optim.lr or check the input data, then resume with --resume auto.")


# ---------------------------------------------------------------------------------------------- main entry
def train(cfg, *, output_dir: str | Path | None = None, init_from: str | None = None, resume: str | None = None,
          batches=None, preempt: PreemptionHandler | None = None) -> TrainResult:
    """Run one stage. ``batches`` (an iterator of batch dicts) replaces ``pretrain.data.build_ssl_loader`` in
    benchmarks; normal runs leave it None.

    SIGUSR1/SIGTERM are caught from the very start (``train.handle_preemption``): ``python -m pretrain.train``
    installs the handler before its heavy imports and passes it in (``preempt``); called as a function, the
    handler is installed here and removed on return. A signal during set-up (process group, model, checkpoint,
    loader workers: minutes on a large run) stops the run after its first iteration, with a checkpoint."""
    owned = preempt is None and bool(cfg.train.handle_preemption)
    if owned:
        preempt = PreemptionHandler().install()
    try:
        return _train(cfg, preempt if cfg.train.handle_preemption else None, output_dir=output_dir,
                      init_from=init_from, resume=resume, batches=batches)
    finally:
        if owned:
            preempt.uninstall()


def _train(cfg, preempt: PreemptionHandler | None, *, output_dir, init_from, resume, batches) -> TrainResult:
    run = setup(cfg, output_dir=output_dir, init_from=init_from, resume=resume)
    s, comm = run.settings, run.comm
    batch_iter = open_batches(run, batches)
    logger = MetricsLogger(run.output_dir, cfg, s.iterations, run.start_iter, run.dist.is_main)
    result = TrainResult(output_dir=run.output_dir, iteration=run.start_iter, finished=False, plan=run.plan)
    try:
        for it in range(run.start_iter, s.iterations):
            record = train_step(run, it, batch_iter)
            logger.log(record)
            result.history.append(record)
            done = result.iteration = it + 1
            if done in s.teacher_snapshots:
                teacher = ckpt_io.teacher_backbone_state(ckpt_io.model_state(run.meta, run.mode))
                if run.dist.is_main:
                    ckpt_io.export_backbone(teacher, gram_snapshot_path(run.output_dir, done))
            stop = preempt is not None and comm.any(preempt.requested)
            if done % s.checkpoint_every == 0 or done == s.iterations or stop:
                result.last_checkpoint = run.last_good = save(run, done)
            if stop:
                result.preempted = True
                if run.dist.is_main:
                    print(f"[pretrain] {preempt.signal_name or 'signal'} received: checkpointed at iteration "
                          f"{done}", flush=True)
                    if in_slurm_job() and s.requeue_on_preemption:
                        result.requeued = requeue_slurm_job()
                break
        else:
            result.finished = True
            finish(run, result)
    finally:
        logger.close()
    return result


# ---------------------------------------------------------------------------------------------- set-up
def setup(cfg, *, output_dir, init_from: str | None, resume: str | None) -> Run:
    """Distributed environment, plan, output folder, model (initialised, wrapped), optimizer, schedules, resume."""
    dist_env = D.init_distributed(D.read_dist_env())
    device = D.default_device(dist_env)
    comm = D.communicator(device)
    plan = plan_from_config(cfg, dist_env.world_size)  # BatchPlanError: the global batch is out of reach
    settings = LoopSettings.from_config(cfg)
    output_dir = Path(output_dir or cfg.train.output_dir)
    cfg.train.output_dir = str(output_dir)
    if cfg.compute.num_threads:
        torch.set_num_threads(int(cfg.compute.num_threads))
    configure_tf32(bool(cfg.compute.tf32), device)
    prepare_output_dir(output_dir, cfg, dist_env.is_main)
    comm.barrier()

    seed = int(cfg.train.seed)
    seed_everything(seed)  # identical initial weights on every rank
    meta = SSLMetaArch.from_config(cfg)
    if int(cfg.crops.patch_size) != meta.patch_size:
        raise ConfigError(f"crops.patch_size={cfg.crops.patch_size} differs from the backbone patch size "
                         f"{meta.patch_size}: the iBOT mask grid would not match the patch tokens")
    initialise_weights(meta, cfg, init_from)
    initialise_gram_teacher(meta, cfg)
    meta.to(device)
    meta.train()
    mode = wrap_model(meta, cfg.compute, device, comm)
    optimizer = build_optimizer(meta.student, meta.n_blocks, cfg.optim)
    seed_everything(derive_seed(seed, _TAG_RANK_STREAM, dist_env.rank))  # per-rank stream (drop path etc.)
    flops = FlopCounter(meta.student["backbone"], meta.losses.n_global, meta.use_gram, device) \
        if cfg.logging.flops else None
    run = Run(cfg=cfg, settings=settings, dist=dist_env, device=device, comm=comm, plan=plan, output_dir=output_dir,
              meta=meta, mode=mode, optimizer=optimizer, schedules=build_schedules(cfg, plan.global_batch),
              gram_refresh=GramRefresh.from_config(cfg), flop_counter=flops,
              peak_flops=peak_flops(cfg.compute.peak_tflops, device))
    if cfg.init.checkpoint and bool(cfg.init.load_optimizer):
        ckpt_io.load_optimizer_state(meta, optimizer, ckpt_io.load_checkpoint(cfg.init.checkpoint)["optimizer"], mode)
    # rank 0 decides: ranks reading a shared folder at slightly different moments could see different "newest"
    resume_path = comm.broadcast_object(ckpt_io.find_resume_checkpoint(output_dir, resume) if dist_env.is_main
                                        else None)
    if resume_path is not None:
        run.start_iter = ckpt_io.restore_training_state(resume_path, meta, optimizer, mode, dist_env.rank,
                                                        dist_env.world_size)
        if dist_env.is_main:
            print(f"[pretrain] resumed from {resume_path} at iteration {run.start_iter}", flush=True)
    run.last_good = ckpt_io.latest_checkpoint(run.ckpt_dir)
    if dist_env.is_main:
        print(f"[pretrain] {settings.stage}: {settings.iterations} iterations, world {dist_env.world_size} "
              f"({dist_env.launcher}, {mode}), batch plan {plan.batch_size_per_rank}/rank x {dist_env.world_size} "
              f"ranks x {plan.grad_accum_steps} accumulation step(s) = global {plan.global_batch} "
              f"(cap {plan.max_batch_size_per_rank}/rank), device {device}, output {output_dir}", flush=True)
    return run


def prepare_output_dir(output_dir: Path, cfg, is_main: bool) -> None:
    """Create ``checkpoints/``, clear a killed write's temporaries and write the resolved ``config.yaml``
    (rank 0 only; the output folder being a file is refused on every rank, so none waits at a barrier)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, not a folder")
    if not is_main:
        return
    ckpt_dir = output_dir / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ckpt_io.CheckpointWriteError(err.errno or 13, f"cannot create {ckpt_dir}: {err.strerror}") from err
    for stale in remove_stale_temporaries(ckpt_dir) + remove_stale_temporaries(output_dir):
        print(f"[pretrain] removed {stale.name}, left by an interrupted write", flush=True)
    ckpt_io.write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def open_batches(run: Run, batches) -> Iterator[dict]:
    """The SSL loader positioned at the run's first micro-batch (or the given ``batches``), as an iterator.

    DataLoader draws its workers' base seed from the global torch RNG: creating and iterating it under
    ``fork_rng`` keeps the training stream (drop path, RoPE jitter) of a resumed run equal to the uninterrupted
    run's."""
    with torch.random.fork_rng(devices=[]):
        if batches is None:
            from pretrain.data import build_ssl_loader  # noqa: PLC0415 - loader workers start only when needed

            batches = build_ssl_loader(run.cfg, rank=run.dist.rank, world_size=run.dist.world_size,
                                       start_iter=run.start_iter * run.plan.grad_accum_steps)
        return iter(batches)


# ---------------------------------------------------------------------------------------------- one iteration
def train_step(run: Run, it: int, batch_iter: Iterator[dict]) -> dict[str, Any]:
    """One optimizer step over ``plan.grad_accum_steps`` micro-batches; returns the iteration's metrics record."""
    meta, comm, accum = run.meta, run.comm, run.plan.grad_accum_steps
    t0 = time.perf_counter()
    sched = run.schedules.at(it)
    apply_schedules(run.optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched["last_layer_lr"])
    if meta.use_gram and run.gram_refresh.due(it, meta.gram_refreshes_done):
        meta.refresh_gram_teacher_from_ema()
        meta.gram_refreshes_done += 1
    run.optimizer.zero_grad(set_to_none=True)

    losses: dict[str, float] = {}
    n_images, flops = 0, 0.0 if run.flop_counter is not None else None
    for micro in range(accum):
        batch = next(batch_iter, None)
        if batch is None:
            raise RuntimeError(f"the SSL loader ran out of batches at iteration {it}: it must be infinite")
        if run.flop_counter is not None:
            f = run.flop_counter.per_micro_batch(batch)
            flops = None if f is None or flops is None else flops + f
        last_micro = micro == accum - 1
        with nullcontext() if last_micro or run.mode != "ddp" else meta.forwards.student.no_sync():
            out = meta.forward_backward(
                batch, teacher_temp=sched["teacher_temp"], gram_weight=sched.get("gram_weight"),
                dino_local_weight=sched.get("dino_local_weight"), loss_scale=1.0 / accum, device=run.device,
                precision=run.settings.precision, process_group=comm.group)
        for k, v in out.logs.items():
            losses[k] = losses.get(k, 0.0) + v / accum
        n_images += batch["collated_global_crops"].shape[0] // meta.losses.n_global

    grad_norms = clip_student_gradients(meta.student, run.settings.clip_grad) if run.settings.clip_grad else None
    bad_loss = not all(math.isfinite(v) for v in losses.values())
    bad_grad = grad_norms is not None and not all(math.isfinite(v) for v in grad_norms.values())
    if comm.any(bad_loss or bad_grad):  # one collective per iteration for both checks
        if bad_loss:
            what = "non-finite loss (" + ", ".join(f"{k}={v:.4g}" for k, v in losses.items()) + ")"
        else:
            what = f"non-finite gradient norm ({grad_norms})" if bad_grad else "non-finite loss on another rank"
        raise run.non_finite(what, it)
    run.optimizer.step()
    if run.mode == "fsdp":  # FSDP2 keeps root parameters unsharded after forward: back to shards for the EMA
        meta.forwards.student.reshard()
        meta.forwards.teacher.reshard()
    meta.update_teacher(sched["mom"])
    return metrics_record(run, it, comm.mean(losses), sched, batch, grad_norms, n_images, flops,
                          time.perf_counter() - t0)


def metrics_record(run: Run, it: int, losses: dict[str, float], sched: dict[str, float], batch: dict,
                   grad_norms: dict[str, float] | None, n_images: int, flops: float | None, dt: float) -> dict:
    """The iteration's ``metrics.jsonl`` record: losses (mean over ranks), schedule values, crop sizes, gradient
    norms, the training modules' mode, speed and (GPU) MFU."""
    world = run.dist.world_size
    record: dict[str, Any] = {"iteration": it, **losses, **sched,
                              "global_crops_size": int(batch["collated_global_crops"].shape[-1])}
    local = batch.get("collated_local_crops")
    if local is not None and local.numel():
        record["local_crops_size"] = int(local.shape[-1])
    if grad_norms is not None:
        record.update({("grad_norm" if k == "total" else f"grad_norm_{k}"): v for k, v in grad_norms.items()})
    # drop path, RoPE jitter and activation checkpointing act only in train mode: the record shows it held
    record["student_training"] = int(all(m.training for m in run.meta.student.modules()))
    record["iter_time_s"] = dt
    record["samples_per_s"] = n_images * world / max(dt, 1e-9)
    if flops:
        achieved = flops * world / max(dt, 1e-9)
        record["tflops"] = achieved / 1e12
        if run.peak_flops:
            record["mfu"] = achieved / (run.peak_flops * world)
    return record


# ---------------------------------------------------------------------------------------------- checkpoints
def save(run: Run, iteration: int) -> Path:
    """A full training checkpoint (collective: every rank calls it, rank 0 writes). Refused when a weight is
    non-finite, so "the last good checkpoint" always is."""
    finite = all(bool(torch.isfinite(p).all()) for p in run.meta.student.parameters())
    if run.comm.any(not finite):
        raise run.non_finite("non-finite student weights", iteration)
    path = ckpt_io.save_training_state(
        ckpt_io.checkpoint_path(run.ckpt_dir, iteration), run.meta, run.optimizer, run.mode, run.comm,
        iteration=iteration, batches_consumed=iteration * run.plan.grad_accum_steps, plan=run.plan.to_dict(),
        world_size=run.dist.world_size, config_yaml=OmegaConf.to_yaml(run.cfg, resolve=True),
        is_main=run.dist.is_main)
    if run.dist.is_main:
        ckpt_io.prune_checkpoints(run.ckpt_dir, run.settings.keep_last)
    run.comm.barrier()
    return path


def finish(run: Run, result: TrainResult) -> None:
    """Export the EMA teacher backbone and write ``stage_complete.json`` (last, so it means "done")."""
    total = run.settings.iterations
    teacher = ckpt_io.teacher_backbone_state(ckpt_io.model_state(run.meta, run.mode))
    result.last_checkpoint = ckpt_io.checkpoint_path(run.ckpt_dir, total)
    if run.dist.is_main:
        result.teacher_backbone = ckpt_io.export_backbone(teacher, run.output_dir / "teacher_backbone.pth")
        if not result.last_checkpoint.is_file():  # resumed from the final checkpoint: nothing to redo
            result.last_checkpoint = ckpt_io.latest_checkpoint(run.ckpt_dir)
        ckpt_io.write_completion(run.output_dir, stage=run.settings.stage, iteration=total,
                                 final_checkpoint=result.last_checkpoint, teacher_backbone=result.teacher_backbone)
        print(f"[pretrain] done: teacher backbone exported to {result.teacher_backbone}", flush=True)
    run.comm.barrier()
