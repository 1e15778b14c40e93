"""The training loop of all three pretraining stages (``python -m pretrain.train``).

One code path for one CPU process, torchrun and SLURM: :func:`train` reads the distributed environment, plans the
batch (global batch over ranks and accumulation steps), builds the meta-architecture, wraps it for the hardware
(:mod:`pretrain.train.parallel`), restores a checkpoint (rank 0 chooses it, every rank loads the same one), then
runs ``train.iterations`` iterations of gradient-accumulated SSL steps with per-module clipping, schedules,
teacher EMA, logging, periodic atomic checkpoints and preemption handling, and finally exports the EMA teacher
backbone and writes the stage's completion record.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from pretrain.data.plan import BatchPlan, plan_from_config
from pretrain.train import checkpointing as ckpt_io
from pretrain.train import distributed as D
from pretrain.train.flops import FlopCounter, peak_flops
from pretrain.train.meta_arch import SSLMetaArch, backbone_kwargs
from pretrain.train.metrics_log import MetricsLogger
from pretrain.train.optim import apply_schedules, build_optimizer
from pretrain.train.parallel import autocast_dtype_for, configure_matmul_precision, wrap_model
from pretrain.train.preemption import PreemptionHandler, in_slurm_job, requeue_slurm_job
from pretrain.train.schedules import build_schedules


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


# ---------------------------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_backbone_state(path: str | Path, cfg) -> dict[str, torch.Tensor]:
    """Flat backbone state dict from any file ``pretrain.models.load_backbone`` reads, or one of our checkpoints."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"initial weights not found: {path}")
    if path.is_file() and path.suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - not a torch file we can read directly: let load_backbone decide
            state = None
        if isinstance(state, dict) and state.get("format") == ckpt_io.FORMAT:
            return ckpt_io.teacher_backbone_state(state)
    from pretrain.models import load_backbone  # noqa: PLC0415 - backbone I/O owned by pretrain.models

    overrides = {k: v for k, v in backbone_kwargs(cfg.student).items() if k != "drop_path_rate"}
    model = load_backbone(str(path), arch=cfg.student.arch, **overrides)
    return model.state_dict()


# ---------------------------------------------------------------------------------------------- initialisation
def initialise_weights(meta: SSLMetaArch, cfg, init_from: str | None) -> None:
    """Stage start: random (seeded), a backbone file (``init.backbone`` / ``--init-from``), or an earlier stage's
    checkpoint (``init.checkpoint`` with ``init.mode`` = ``continue`` | ``from_teacher``)."""
    init = cfg.init
    backbone_path = init_from or init.backbone
    stage_ckpt = init.checkpoint
    if backbone_path and stage_ckpt:
        raise ValueError("give either init.backbone (--init-from) or init.checkpoint, not both")
    if backbone_path:
        meta.load_backbone_weights(load_backbone_state(backbone_path, cfg), str(backbone_path))
        meta.sync_teacher_from_student()
    elif stage_ckpt:
        state = ckpt_io.load_checkpoint(stage_ckpt)
        mode = str(init.mode)
        if mode == "continue":
            meta.student.load_state_dict(state["student"])
            meta.teacher.load_state_dict(state["teacher"])
        elif mode == "from_teacher":
            meta.student.load_state_dict(state["teacher"])
            meta.teacher.load_state_dict(state["teacher"])
        else:
            raise ValueError(f"init.mode must be 'continue' or 'from_teacher', got {mode!r}")
    else:
        meta.sync_teacher_from_student()


def gram_snapshot_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "teacher_snapshots" / f"teacher_backbone_{iteration:08d}.pth"


def initialise_gram_teacher(meta: SSLMetaArch, cfg) -> None:
    """Load the frozen Gram teacher chosen by ``gram.teacher`` (see ``configs/pretrain/base.yaml``)."""
    if not meta.use_gram:
        return
    gt = cfg.gram.teacher
    source = gt.source
    if source == "checkpoint":
        if not gt.checkpoint:
            raise ValueError("gram.teacher.source=checkpoint needs gram.teacher.checkpoint=PATH")
        meta.load_gram_teacher(load_backbone_state(gt.checkpoint, cfg), str(gt.checkpoint))
    elif source == "stage1_iteration":
        if not gt.run_dir:
            raise ValueError("gram.teacher.source=stage1_iteration needs gram.teacher.run_dir (the stage-1 output dir)")
        n = int(gt.iteration)
        snap = gram_snapshot_path(gt.run_dir, n)
        full = ckpt_io.checkpoint_path(Path(gt.run_dir) / "checkpoints", n)
        if snap.is_file():
            meta.load_gram_teacher(torch.load(snap, map_location="cpu", weights_only=True), str(snap))
        elif full.is_file():
            meta.load_gram_teacher(ckpt_io.teacher_backbone_state(ckpt_io.load_checkpoint(full)), str(full))
        else:
            raise FileNotFoundError(
                f"no EMA teacher of iteration {n} in {gt.run_dir}: expected {snap} (written when the stage-1 "
                f"config lists {n} in checkpointing.teacher_snapshots) or {full}"
            )
    elif source == "ema":
        meta.refresh_gram_teacher_from_ema()
    else:
        raise ValueError(
            f"gram.use_loss=true needs gram.teacher.source in (checkpoint, stage1_iteration, ema), got {source!r}"
        )


def gram_refresh_due(cfg, iteration: int, refreshes_done: int) -> bool:
    """DINOv3's repeated Gram-teacher update: every ``refresh_every`` iterations from ``refresh_start``, at most
    ``max_refreshes`` times."""
    gt = cfg.gram.teacher
    every = int(gt.refresh_every)
    if every <= 0 or refreshes_done >= int(gt.max_refreshes):
        return False
    start = int(gt.refresh_start)
    return iteration > start and (iteration - start) % every == 0



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


def _train(cfg, preempt, *, output_dir, init_from, resume, batches) -> TrainResult:
    dist_env = D.init_distributed(D.read_dist_env())
    device = D.default_device(dist_env)
    comm = D.communicator(device)
    plan = plan_from_config(cfg, dist_env.world_size)  # BatchPlanError: the global batch is out of reach
    accum = plan.grad_accum_steps
    output_dir = Path(output_dir or cfg.train.output_dir)
    cfg.train.output_dir = str(output_dir)
    if cfg.compute.num_threads:
        torch.set_num_threads(int(cfg.compute.num_threads))
    configure_matmul_precision(bool(cfg.compute.tf32), device)
    total = int(cfg.train.iterations)
    is_main = dist_env.is_main
    ckpt_dir = output_dir / "checkpoints"
    if output_dir.exists() and not output_dir.is_dir():  # every rank: none may wait at a barrier for rank 0
        raise NotADirectoryError(f"--output-dir {output_dir} is a file, not a folder")
    if is_main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ckpt_io.CheckpointWriteError(err.errno or 13, f"cannot create {ckpt_dir}: {err.strerror}") from err
        for stale in ckpt_io.remove_stale_temporaries(ckpt_dir) + ckpt_io.remove_stale_temporaries(output_dir):
            print(f"[pretrain] removed {stale.name}, left by an interrupted write", flush=True)
        ckpt_io.atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), output_dir / "config.yaml")
    comm.barrier()

    seed = int(cfg.train.seed)
    seed_everything(seed)  # identical initial weights on every rank
    meta = SSLMetaArch(cfg)
    if int(cfg.crops.patch_size) != meta.patch_size:
        raise ValueError(
            f"crops.patch_size={cfg.crops.patch_size} differs from the backbone patch size {meta.patch_size}: "
            "the iBOT mask grid would not match the patch tokens"
        )
    initialise_weights(meta, cfg, init_from)
    initialise_gram_teacher(meta, cfg)
    meta.to(device)
    meta.train()
    mode = wrap_model(meta, cfg.compute, device, comm)
    optimizer = build_optimizer(meta.student, meta.n_blocks, cfg.optim)
    schedules = build_schedules(cfg, plan.global_batch)
    autocast_dtype = autocast_dtype_for(str(cfg.compute.precision), device)
    seed_everything(seed + 1000 * dist_env.rank + 1)  # per-rank stream for drop-path etc.

    start_iter = 0
    # rank 0 decides: ranks reading a shared folder at slightly different moments could see different "newest"
    resume_path = comm.broadcast_object(ckpt_io.find_resume_checkpoint(output_dir, resume) if is_main else None)
    if resume_path is None and cfg.init.checkpoint and bool(cfg.init.load_optimizer):
        ckpt_io.load_optimizer_state(meta, optimizer, ckpt_io.load_checkpoint(cfg.init.checkpoint)["optimizer"], mode)
    if resume_path is not None:
        state = ckpt_io.load_checkpoint(resume_path)
        ckpt_io.load_model_state(meta, state, mode, str(resume_path))
        ckpt_io.load_optimizer_state(meta, optimizer, state["optimizer"], mode)
        meta.gram_teacher_initialized = bool(state.get("gram", {}).get("initialized", meta.gram_teacher_initialized))
        meta.gram_refreshes_done = int(state.get("gram", {}).get("refreshes_done", 0))
        start_iter = int(state["iteration"])
        rngs = state.get("rng") or []
        if len(rngs) == dist_env.world_size:
            ckpt_io.set_rng_state(rngs[dist_env.rank])
        elif is_main:
            print(f"[pretrain] world size changed ({len(rngs)} -> {dist_env.world_size}): RNG streams re-seeded")
        if is_main:
            print(f"[pretrain] resumed from {resume_path} at iteration {start_iter}", flush=True)
        del state

    if batches is None:
        from pretrain.data import build_ssl_loader  # noqa: PLC0415 - loader workers start only when needed

        # DataLoader draws its workers' base seed from the global torch RNG when iterated: fork it, so that the
        # training stream (drop path, RoPE jitter) is the same in a run resumed here as in the uninterrupted run
        with torch.random.fork_rng(devices=[]):
            batches = build_ssl_loader(cfg, rank=dist_env.rank, world_size=dist_env.world_size,
                                       start_iter=start_iter * accum)
    with torch.random.fork_rng(devices=[]):
        batch_iter = iter(batches)
    logger = MetricsLogger(output_dir, cfg, total, start_iter, is_main)
    if is_main:
        print(
            f"[pretrain] {cfg.stage}: {total} iterations, world {dist_env.world_size} ({dist_env.launcher}, {mode}), "
            f"batch plan {plan.batch_size_per_rank}/rank x {dist_env.world_size} ranks x {accum} accumulation "
            f"step(s) = global {plan.global_batch} (cap {plan.max_batch_size_per_rank}/rank), device {device}, "
            f"output {output_dir}",
            flush=True,
        )

    snapshots = {int(i) for i in (cfg.checkpointing.teacher_snapshots or [])}
    save_every = int(cfg.checkpointing.period)
    keep_last = int(cfg.checkpointing.keep_last)
    clip = cfg.optim.clip_grad
    n_global = int(cfg.crops.global_crops_number)
    flop_counter = FlopCounter(meta.student["backbone"], n_global, meta.use_gram, device) if cfg.logging.flops else None
    peak = peak_flops(cfg.compute.peak_tflops, device)
    last_good = ckpt_io.latest_checkpoint(ckpt_dir)
    history: list[dict] = []
    result = TrainResult(output_dir=output_dir, iteration=start_iter, finished=False, plan=plan)

    def stop_non_finite(what: str, iteration: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{what} at iteration {iteration} (rank {dist_env.rank}). Training stopped before it reached a checkpoint; "
            f"the last good checkpoint (finite weights and losses) is {last_good or 'none yet'}. Lower optim.lr or "
            "check the input data, then resume with --resume auto."
        )

    def save(iteration: int) -> Path:
        # a checkpoint is only written when every weight is finite: an earlier step's overflow must not be saved
        # as "the last good checkpoint"
        finite = all(bool(torch.isfinite(p).all()) for p in meta.student.parameters())
        if comm.any(not finite):
            raise stop_non_finite("non-finite student weights", iteration)
        states = ckpt_io.model_state(meta, mode)
        opt_state = ckpt_io.optimizer_state(meta, optimizer, mode)
        rngs = comm.gather_objects(ckpt_io.rng_state())
        path = ckpt_io.checkpoint_path(ckpt_dir, iteration)
        if is_main:
            ckpt_io.atomic_save(
                {
                    "format": ckpt_io.FORMAT,
                    "iteration": iteration,
                    **states,
                    "optimizer": opt_state,
                    "loader": {"batches_consumed": iteration * accum, "world_size": dist_env.world_size},
                    "plan": plan.to_dict(),
                    "rng": rngs,
                    "gram": {"initialized": meta.gram_teacher_initialized, "refreshes_done": meta.gram_refreshes_done},
                    "config": OmegaConf.to_yaml(cfg, resolve=True),
                },
                path,
            )
            ckpt_io.prune_checkpoints(ckpt_dir, keep_last)
        comm.barrier()
        return path

    try:
        for it in range(start_iter, total):
            t_it = time.perf_counter()
            sched = schedules.at(it)
            apply_schedules(optimizer, lr=sched["lr"], wd=sched["wd"], last_layer_lr=sched["last_layer_lr"])
            if meta.use_gram and gram_refresh_due(cfg, it, meta.gram_refreshes_done):
                meta.refresh_gram_teacher_from_ema()
                meta.gram_refreshes_done += 1
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            n_images, flops_per_iter = 0, 0.0 if flop_counter is not None else None
            for micro in range(accum):
                try:
                    batch = next(batch_iter)
                except StopIteration as err:
                    raise RuntimeError(
                        f"the SSL loader ran out of batches at iteration {it}: it must be infinite"
                    ) from err
                if flop_counter is not None:
                    f = flop_counter.per_micro_batch(batch)
                    flops_per_iter = None if f is None or flops_per_iter is None else flops_per_iter + f
                sync = student_no_sync(meta) if (mode == "ddp" and micro < accum - 1) else nullcontext()
                with sync:
                    out = meta.forward_backward(
                        batch,
                        teacher_temp=sched["teacher_temp"],
                        gram_weight=sched.get("gram_weight"),
                        dino_local_weight=sched.get("dino_local_weight"),
                        loss_scale=1.0 / accum,
                        device=device,
                        autocast_dtype=autocast_dtype,
                        process_group=comm.group,
                    )
                for k, v in out.logs.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
                n_images += batch["collated_global_crops"].shape[0] // n_global
                res = batch["collated_global_crops"].shape[-1]
            grad_norms = None
            if clip is not None and float(clip) > 0:
                grad_norms = clip_student_gradients(meta.student, float(clip))
            bad_loss = not all(math.isfinite(v) for v in sums.values())
            bad_grad = grad_norms is not None and not all(math.isfinite(v) for v in grad_norms.values())
            if comm.any(bad_loss or bad_grad):  # one collective per iteration for both checks
                if bad_loss:
                    what = "non-finite loss (" + ", ".join(f"{k}={sums[k]:.4g}" for k in sums) + ")"
                else:
                    what = f"non-finite gradient norm ({grad_norms})" if bad_grad else "non-finite loss on another rank"
                raise stop_non_finite(what, it)
            optimizer.step()
            if mode == "fsdp":  # FSDP2 keeps root parameters unsharded after forward: back to shards for the EMA
                for fwd in (meta.student_forward, meta._teacher_forward):
                    fwd.reshard()
            meta.update_teacher(sched["mom"])

            metrics = comm.mean(sums)
            record = {"iteration": it, **metrics, **sched, "global_crops_size": int(res)}
            if "local_crops_size" not in record and batch.get("collated_local_crops") is not None:
                lc = batch["collated_local_crops"]
                if lc.numel():
                    record["local_crops_size"] = int(lc.shape[-1])
            if grad_norms is not None:
                record.update({("grad_norm" if k == "total" else f"grad_norm_{k}"): v for k, v in grad_norms.items()})
            # the training modules' state, as the step ran (drop path, RoPE jitter, checkpointing need train mode)
            record["student_training"] = int(all(m.training for m in meta.student.modules()))
            dt = time.perf_counter() - t_it
            record["iter_time_s"] = dt
            record["samples_per_s"] = n_images * dist_env.world_size / max(dt, 1e-9)
            if flops_per_iter:
                achieved = flops_per_iter * dist_env.world_size / max(dt, 1e-9)
                record["tflops"] = achieved / 1e12
                if peak:
                    record["mfu"] = achieved / (peak * dist_env.world_size)
            logger.log(record)
            history.append(record)
            done = it + 1
            result.iteration = done

            if done in snapshots:
                teacher_bb = ckpt_io.strip_prefix(ckpt_io.model_state(meta, mode)["teacher"], "backbone.")
                if is_main:
                    ckpt_io.export_backbone(teacher_bb, gram_snapshot_path(output_dir, done))
            stop = preempt is not None and comm.any(preempt.requested)
            if done % save_every == 0 or done == total or stop:
                result.last_checkpoint = save(done)
                last_good = result.last_checkpoint
            if stop:
                result.preempted = True
                if is_main:
                    print(f"[pretrain] {preempt.signal_name or 'signal'} received: checkpointed at iteration "
                          f"{done}", flush=True)
                    if in_slurm_job() and bool(cfg.train.requeue_on_preemption):
                        result.requeued = requeue_slurm_job()
                break
        else:
            result.finished = True
        if result.finished:
            teacher_bb = ckpt_io.strip_prefix(ckpt_io.model_state(meta, mode)["teacher"], "backbone.")
            result.last_checkpoint = ckpt_io.checkpoint_path(ckpt_dir, total)
            if is_main:
                result.teacher_backbone = ckpt_io.export_backbone(teacher_bb, output_dir / "teacher_backbone.pth")
                if not result.last_checkpoint.is_file():  # resumed from the final checkpoint: nothing to redo
                    result.last_checkpoint = ckpt_io.latest_checkpoint(ckpt_dir)
                ckpt_io.write_completion(output_dir, stage=str(cfg.stage), iteration=total,
                                         final_checkpoint=result.last_checkpoint,
                                         teacher_backbone=result.teacher_backbone)
                print(f"[pretrain] done: teacher backbone exported to {result.teacher_backbone}", flush=True)
            comm.barrier()
    finally:
        logger.close()
    result.history = history
    return result


def clip_student_gradients(student: nn.ModuleDict, max_norm: float) -> dict[str, float]:
    """Clip the gradient norm of each part of the student (``backbone``, ``dino_head``, ``ibot_head``) to
    ``max_norm`` separately, as the official DINOv2/v3 loops do (one ``clip_grad_norm_`` per student module): a
    large head gradient (e.g. iBOT on near-zero masked tokens at random init) must not shrink the backbone's step.

    Returns the pre-clip norms per part and their root-sum-square (``total``, the norm of the whole student).
    """
    norms: dict[str, float] = {}
    for name, module in student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
            norm = norm.full_tensor()
        norms[name] = float(norm)
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def student_no_sync(meta: SSLMetaArch):
    fwd = meta.student_forward
    return fwd.no_sync() if hasattr(fwd, "no_sync") else nullcontext()
