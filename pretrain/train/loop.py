"""The training loop of all three pretraining stages (``python -m pretrain.train``).

One code path for one CPU process, torchrun and SLURM: :func:`train` reads the distributed environment, builds the
meta-architecture, optionally wraps the student for DDP or FSDP2, restores a checkpoint (``resume``), then runs
``train.iterations`` iterations of (gradient-accumulated) SSL steps with clipping, schedules, teacher EMA, logging,
periodic atomic checkpoints and preemption handling, and finally exports the EMA teacher backbone.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from pretrain.train import checkpointing as ckpt_io
from pretrain.train import distributed as D
from pretrain.train.meta_arch import SSLMetaArch, StudentForward, TeacherForward, backbone_kwargs
from pretrain.train.optim import apply_schedules, build_optimizer
from pretrain.train.schedules import build_schedules


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    finished: bool
    preempted: bool = False
    teacher_backbone: Path | None = None
    last_checkpoint: Path | None = None
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_batch_geometry(cfg, world_size: int) -> tuple[int, int, int]:
    """``(batch_size_per_rank, grad_accum_steps, global_batch_size)``.

    ``data.batch_size_per_rank`` is what the loader yields per micro-batch. ``train.global_batch_size`` (when set)
    must be a multiple of ``batch_size_per_rank * world_size``: the quotient is the number of
    gradient-accumulation micro-steps per iteration. Otherwise ``train.grad_accum_steps`` (default 1) is used.
    """
    per_gpu = int(cfg.data.batch_size_per_rank)
    target = cfg.train.get("global_batch_size", None)
    if target is None:
        accum = int(cfg.train.get("grad_accum_steps", 1) or 1)
        return per_gpu, accum, per_gpu * world_size * accum
    target = int(target)
    if target % (per_gpu * world_size):
        raise ValueError(
            f"train.global_batch_size={target} is not a multiple of data.batch_size_per_rank={per_gpu} x "
            f"world_size={world_size}; change one of them"
        )
    return per_gpu, target // (per_gpu * world_size), target


def autocast_dtype_for(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (``compute.precision: bf16``), none (fp32) on CPU."""
    precision = str(cfg.compute.get("precision", "bf16"))
    if device.type != "cuda" or precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


class GramTeacherForward(nn.Module):
    """Gram teacher patch tokens as one ``forward`` (so FSDP2 can wrap it)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)["x_norm_patchtokens"]


def wrap_model(meta: SSLMetaArch, cfg, device: torch.device, dist_env: D.DistEnv) -> str:
    """Activation checkpointing, torch.compile and DDP / FSDP2 according to ``compute``; returns the mode used."""
    comp = cfg.compute
    if bool(comp.get("activation_checkpointing", False)):
        meta.student["backbone"].set_grad_checkpointing(True)
    mode = str(comp.get("distributed", "ddp")) if dist_env.distributed else "none"
    student_fwd: nn.Module = StudentForward(meta.student)
    teacher_fwd: nn.Module = TeacherForward(meta.teacher)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        student_fwd = DDP(
            student_fwd,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=False,
        )
        with torch.no_grad():  # identical teachers everywhere (student params were broadcast by DDP)
            for p in meta.teacher.parameters():
                dist.broadcast(p.data, src=0)
            if meta.gram_teacher is not None:
                for p in meta.gram_teacher.parameters():
                    dist.broadcast(p.data, src=0)
    elif mode == "fsdp":
        from torch.distributed.fsdp import (  # noqa: PLC0415
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        def shard_blocks(backbone: nn.Module) -> None:
            # the backbone runs its blocks through ``forward_list`` (several crop groups at once): hook that too
            for blk in backbone.blocks:
                fully_shard(blk, **kw)
                if hasattr(blk, "forward_list"):
                    register_fsdp_forward_method(blk, "forward_list")

        mp = None
        if device.type == "cuda" and autocast_dtype_for(cfg, device) is not None:
            mp = MixedPrecisionPolicy(param_dtype=autocast_dtype_for(cfg, device), reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if mp is not None else {}
        for tree in (meta.student, meta.teacher):
            shard_blocks(tree["backbone"])
            fully_shard(tree["dino_head"], **kw)
            fully_shard(tree["ibot_head"], **kw)
        student_fwd = fully_shard(student_fwd, **kw)
        teacher_fwd = fully_shard(teacher_fwd, **kw)
        if meta.gram_teacher is not None:
            shard_blocks(meta.gram_teacher)
    elif mode != "none":
        raise ValueError(f"compute.distributed must be 'ddp' or 'fsdp', got {mode!r}")
    if bool(comp.get("compile", False)):
        for tree in (meta.student, meta.teacher):
            for blk in tree["backbone"].blocks:
                blk.compile()
    meta.set_forward_modules(student_fwd, teacher_fwd)
    if meta.gram_teacher is not None and mode == "fsdp":
        gram_fwd = GramTeacherForward(meta.gram_teacher)
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        object.__setattr__(meta, "_gram_forward", fully_shard(gram_fwd))
    return mode


# ---------------------------------------------------------------------------------------------- state I/O
def model_state(meta: SSLMetaArch, mode: str) -> dict[str, dict | None]:
    """Full (unsharded, CPU) state dicts of student, teacher and Gram teacher; collective under FSDP."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "student": get_model_state_dict(meta.student, options=opts),
            "teacher": get_model_state_dict(meta.teacher, options=opts),
            "gram_teacher": None if meta.gram_teacher is None else get_model_state_dict(meta.gram_teacher, options=opts),
        }
    cpu = lambda sd: {k: v.detach().to("cpu").clone() for k, v in sd.items()}  # noqa: E731
    return {
        "student": cpu(meta.student.state_dict()),
        "teacher": cpu(meta.teacher.state_dict()),
        "gram_teacher": None if meta.gram_teacher is None else cpu(meta.gram_teacher.state_dict()),
    }


def load_model_state(meta: SSLMetaArch, states: dict, mode: str, source: str) -> None:
    try:
        if mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: PLC0415

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(meta.student, states["student"], options=opts)
            set_model_state_dict(meta.teacher, states["teacher"], options=opts)
            if meta.gram_teacher is not None and states.get("gram_teacher") is not None:
                set_model_state_dict(meta.gram_teacher, states["gram_teacher"], options=opts)
            return
        meta.student.load_state_dict(states["student"])
        meta.teacher.load_state_dict(states["teacher"])
        if meta.gram_teacher is not None and states.get("gram_teacher") is not None:
            meta.gram_teacher.load_state_dict(states["gram_teacher"])
    except RuntimeError as err:
        raise RuntimeError(f"{source}: weights do not fit the configured model: {err}") from err


def optimizer_state(meta: SSLMetaArch, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415

        return get_optimizer_state_dict(
            meta.student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(meta: SSLMetaArch, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415

        set_optimizer_state_dict(meta.student, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def gather_rng_states() -> list[dict]:
    state = ckpt_io.rng_state()
    if not D.is_dist():
        return [state]
    out: list = [None] * D.get_world_size()
    dist.all_gather_object(out, state)
    return out


# ---------------------------------------------------------------------------------------------- logging
class MetricsLogger:
    """Console progress (rank 0), ``metrics.jsonl`` and optional TensorBoard."""

    def __init__(self, output_dir: Path, cfg, total_iterations: int, start_iteration: int, is_main: bool) -> None:
        self.is_main = is_main
        self.total = total_iterations
        self.start_iteration = start_iteration
        self.every = max(1, int(cfg.logging.get("console_every", 10)))
        self.stage = str(cfg.get("stage", "pretrain"))
        self.path = output_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.last_t, self.last_it = self.t0, start_iteration
        self.tb = None
        if is_main:
            self._truncate_from(start_iteration)
            if bool(cfg.logging.get("tensorboard", False)):
                try:
                    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
                except ImportError as err:
                    raise ImportError(
                        "logging.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                    ) from err
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def _truncate_from(self, iteration: int) -> None:
        """Drop records of iterations >= ``iteration`` left by an interrupted run (they are recomputed)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", -1) < iteration:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        ckpt_io.atomic_write_text("".join(l + "\n" for l in keep), self.path)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        it = record["iteration"]
        now = time.perf_counter()
        done = it + 1 - self.start_iteration
        its = done / max(now - self.t0, 1e-9)
        record["it_per_s"] = its
        eta = (self.total - it - 1) / max(its, 1e-9)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, it)
        if (it + 1) % self.every == 0 or it + 1 == self.total or it == self.start_iteration:
            losses = " ".join(
                f"{k.replace('_loss', '')} {record[k]:.4f}" for k in sorted(record) if k.endswith("_loss")
            )
            extra = ""
            if "samples_per_s" in record:
                extra += f" | {record['samples_per_s']:.1f} img/s"
            if "mfu" in record:
                extra += f" MFU {100 * record['mfu']:.1f}%"
            elif "tflops" in record:
                extra += f" {record['tflops']:.3f} TFLOP/s"
            print(
                f"[{self.stage}] it {it + 1}/{self.total} | {its:.2f} it/s | ETA {_fmt_time(eta)} | {losses} | "
                f"lr {record['lr']:.3e} wd {record['wd']:.4f} mom {record['mom']:.5f} "
                f"T {record['teacher_temp']:.4f}{extra}",
                flush=True,
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- FLOPs / MFU
_PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _sdpa_flop_handle(inputs, outputs):  # fvcore op handle: 2 matmuls of [B,H,N,d] x [B,H,d,N]
    from fvcore.nn.jit_handles import get_shape  # noqa: PLC0415

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    b_h = int(np.prod(q[:-2]))
    return 2 * b_h * q[-2] * k[-2] * q[-1]  # fvcore counts one multiply-add as one flop


def step_flops(meta: SSLMetaArch, batch: dict, device: torch.device) -> float | None:
    """Approximate FLOPs (2 x multiply-adds) of one micro-batch: student forward+backward (3x forward) on all
    crops, teacher forward on the global crops, Gram teacher forward on its crops. Counted by fvcore on one image
    and scaled by the batch size; None when fvcore cannot trace the model."""
    try:
        from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415
    except ImportError:
        return None
    n_global = int(meta.cfg.crops.get("global_crops_number", 2))
    g = batch["collated_global_crops"]
    B = g.shape[0] // n_global
    local = batch.get("collated_local_crops")
    n_local = 0 if local is None or local.numel() == 0 else local.shape[0] // B
    backbone = meta.student["backbone"]

    def count(x: torch.Tensor) -> float:
        class _Fwd(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.forward_features(x)["x_norm_patchtokens"]

        analysis = FlopCountAnalysis(_Fwd(backbone).eval(), (x.to(device),))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return 2.0 * float(analysis.total())

    try:
        with torch.no_grad():
            f_global = count(g[:1])
            f_local = count(local[:1]) if n_local else 0.0
            f_gram = 0.0
            if meta.use_gram and batch.get("collated_gram_teacher_crops") is not None:
                f_gram = count(batch["collated_gram_teacher_crops"][:1])
    except Exception as err:  # noqa: BLE001 - FLOP counting is best effort
        print(f"[pretrain] FLOP counting skipped: {err}", flush=True)
        return None
    per_image = 3 * (n_global * f_global + n_local * f_local) + n_global * f_global + n_global * f_gram
    return per_image * B


def peak_flops(cfg, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = cfg.compute.get("peak_tflops", None)
    if peak is None:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in _PEAK_TFLOPS_BF16.items() if k in name), None)
    return None if peak is None else float(peak) * 1e12


# ---------------------------------------------------------------------------------------------- initialisation
def initialise_weights(meta: SSLMetaArch, cfg, init_from: str | None) -> None:
    """Stage start: random (seeded), a backbone file (``init.backbone`` / ``--init-from``), or an earlier stage's
    checkpoint (``init.checkpoint`` with ``init.mode`` = ``continue`` | ``from_teacher``)."""
    init = cfg.get("init", {}) or {}
    backbone_path = init_from or init.get("backbone", None)
    stage_ckpt = init.get("checkpoint", None)
    if backbone_path and stage_ckpt:
        raise ValueError("give either init.backbone (--init-from) or init.checkpoint, not both")
    if backbone_path:
        meta.load_backbone_weights(load_backbone_state(backbone_path, cfg), str(backbone_path))
        meta.sync_teacher_from_student()
    elif stage_ckpt:
        state = ckpt_io.load_checkpoint(stage_ckpt)
        mode = str(init.get("mode", "continue"))
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
    source = gt.get("source", None)
    if source == "checkpoint":
        if not gt.get("checkpoint"):
            raise ValueError("gram.teacher.source=checkpoint needs gram.teacher.checkpoint=PATH")
        meta.load_gram_teacher(load_backbone_state(gt.checkpoint, cfg), str(gt.checkpoint))
    elif source == "stage1_iteration":
        if not gt.get("run_dir"):
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
    every = int(gt.get("refresh_every", 0) or 0)
    if every <= 0 or refreshes_done >= int(gt.get("max_refreshes", 0) or 0):
        return False
    start = int(gt.get("refresh_start", 0) or 0)
    return iteration > start and (iteration - start) % every == 0


# ---------------------------------------------------------------------------------------------- main entry
def train(cfg, *, output_dir: str | Path | None = None, init_from: str | None = None, resume: str | None = None,
          batches=None) -> TrainResult:
    """Run one stage. ``batches`` (an iterator of batch dicts) replaces ``pretrain.data.build_ssl_loader`` in
    benchmarks; normal runs leave it None.

    SIGUSR1/SIGTERM are caught from the very start (``train.handle_preemption``): setting up a large run (process
    group, model, checkpoint, loader workers) takes minutes, and SLURM's warning signal arriving then must not kill
    the job with its default action; the loop sees the flag after its first iteration, checkpoints and exits."""
    preempt = D.PreemptionHandler().install() if bool(cfg.train.get("handle_preemption", True)) else None
    try:
        return _train(cfg, preempt, output_dir=output_dir, init_from=init_from, resume=resume, batches=batches)
    finally:
        if preempt is not None:
            preempt.uninstall()


def _train(cfg, preempt, *, output_dir, init_from, resume, batches) -> TrainResult:
    dist_env = D.init_distributed(D.read_dist_env())
    device = D.default_device(dist_env)
    output_dir = Path(output_dir or cfg.train.output_dir)
    cfg.train.output_dir = str(output_dir)
    if cfg.compute.get("num_threads"):
        torch.set_num_threads(int(cfg.compute.num_threads))
    per_gpu, accum, global_batch = resolve_batch_geometry(cfg, dist_env.world_size)
    total = int(cfg.train.iterations)
    is_main = dist_env.is_main
    ckpt_dir = output_dir / "checkpoints"
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), output_dir / "config.yaml")
    D.barrier()

    seed = int(cfg.train.seed)
    seed_everything(seed)  # identical initial weights on every rank
    meta = SSLMetaArch(cfg)
    if int(cfg.crops.get("patch_size", meta.patch_size)) != meta.patch_size:
        raise ValueError(
            f"crops.patch_size={cfg.crops.patch_size} differs from the backbone patch size {meta.patch_size}: "
            "the iBOT mask grid would not match the patch tokens"
        )
    initialise_weights(meta, cfg, init_from)
    initialise_gram_teacher(meta, cfg)
    meta.to(device)
    meta.train()
    mode = wrap_model(meta, cfg, device, dist_env)
    optimizer = build_optimizer(meta.student, meta.n_blocks, cfg.optim)
    schedules = build_schedules(cfg, global_batch)
    autocast_dtype = autocast_dtype_for(cfg, device)
    seed_everything(seed + 1000 * dist_env.rank + 1)  # per-rank stream for drop-path etc.

    start_iter = 0
    resume_path = ckpt_io.find_resume_checkpoint(output_dir, resume)
    init_ckpt = (cfg.get("init", {}) or {}).get("checkpoint", None)
    if resume_path is None and init_ckpt and bool((cfg.get("init", {}) or {}).get("load_optimizer", False)):
        load_optimizer_state(meta, optimizer, ckpt_io.load_checkpoint(init_ckpt)["optimizer"], mode)
    if resume_path is not None:
        state = ckpt_io.load_checkpoint(resume_path)
        load_model_state(meta, state, mode, str(resume_path))
        load_optimizer_state(meta, optimizer, state["optimizer"], mode)
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
        from pretrain.data import build_ssl_loader  # noqa: PLC0415 - owned by the pretrain-data engineer

        batches = build_ssl_loader(cfg, rank=dist_env.rank, world_size=dist_env.world_size,
                                   start_iter=start_iter * accum)
    batch_iter = iter(batches)
    logger = MetricsLogger(output_dir, cfg, total, start_iter, is_main)
    if is_main:
        print(
            f"[pretrain] {cfg.get('stage', 'pretrain')}: {total} iterations, world {dist_env.world_size} "
            f"({dist_env.launcher}, {mode}), batch/GPU {per_gpu} x accum {accum} = global {global_batch}, "
            f"device {device}, output {output_dir}",
            flush=True,
        )

    snapshots = {int(i) for i in (cfg.checkpointing.get("teacher_snapshots", None) or [])}
    save_every = int(cfg.checkpointing.period)
    keep_last = int(cfg.checkpointing.keep_last)
    clip = cfg.optim.get("clip_grad", None)
    flops_per_iter: float | None = None
    peak = peak_flops(cfg, device)
    last_ckpt = ckpt_io.latest_checkpoint(ckpt_dir)
    history: list[dict] = []
    result = TrainResult(output_dir=output_dir, iteration=start_iter, finished=False)

    def save(iteration: int) -> Path | None:
        states = model_state(meta, mode)
        opt_state = optimizer_state(meta, optimizer, mode)
        rngs = gather_rng_states()
        path = ckpt_io.checkpoint_path(ckpt_dir, iteration)
        if is_main:
            ckpt_io.atomic_save(
                {
                    "format": ckpt_io.FORMAT,
                    "iteration": iteration,
                    **states,
                    "optimizer": opt_state,
                    "loader": {"batches_consumed": iteration * accum, "world_size": dist_env.world_size},
                    "rng": rngs,
                    "gram": {"initialized": meta.gram_teacher_initialized, "refreshes_done": meta.gram_refreshes_done},
                    "config": OmegaConf.to_yaml(cfg, resolve=True),
                },
                path,
            )
            ckpt_io.prune_checkpoints(ckpt_dir, keep_last)
        D.barrier()
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
            n_images = 0
            for micro in range(accum):
                try:
                    batch = next(batch_iter)
                except StopIteration as err:
                    raise RuntimeError(
                        f"the SSL loader ran out of batches at iteration {it}: it must be infinite"
                    ) from err
                if flops_per_iter is None and bool(cfg.logging.get("flops", True)):
                    f = step_flops(meta, batch, device)
                    flops_per_iter = (f or 0.0) * accum
                sync = (
                    student_no_sync(meta) if (mode == "ddp" and micro < accum - 1) else nullcontext()
                )
                with sync:
                    out = meta.forward_backward(
                        batch,
                        teacher_temp=sched["teacher_temp"],
                        gram_weight=sched.get("gram_weight"),
                        loss_scale=1.0 / accum,
                        device=device,
                        autocast_dtype=autocast_dtype,
                    )
                for k, v in out.logs.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
                n_images += batch["collated_global_crops"].shape[0] // int(cfg.crops.get("global_crops_number", 2))
                res = batch["collated_global_crops"].shape[-1]
            bad = not all(math.isfinite(v) for v in sums.values())
            if D.any_rank(bad):
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {it} (rank {dist_env.rank}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in sums.items())
                    + f"). Training stopped; the last good checkpoint is kept: {last_ckpt or 'none yet'}. "
                    "Lower optim.lr or check the input data, then resume with --resume auto."
                )
            grad_norms = None
            if clip is not None and float(clip) > 0:
                grad_norms = clip_student_gradients(meta.student, float(clip))
            optimizer.step()
            if mode == "fsdp":  # FSDP2 keeps root parameters unsharded after forward: back to shards for the EMA
                for fwd in (meta.student_forward, meta._teacher_forward):
                    fwd.reshard()
            meta.update_teacher(sched["mom"])

            metrics = {k: v for k, v in sums.items()}
            if D.is_dist():
                keys = sorted(metrics)
                vec = D.all_reduce_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64))
                metrics = dict(zip(keys, vec.tolist()))
            record = {"iteration": it, **metrics, **sched, "global_crops_size": int(res)}
            if "local_crops_size" not in record and batch.get("collated_local_crops") is not None:
                lc = batch["collated_local_crops"]
                if lc.numel():
                    record["local_crops_size"] = int(lc.shape[-1])
            if grad_norms is not None:
                record.update({("grad_norm" if k == "total" else f"grad_norm_{k}"): v for k, v in grad_norms.items()})
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
                teacher_bb = {
                    k[len("backbone."):]: v for k, v in model_state(meta, mode)["teacher"].items()
                    if k.startswith("backbone.")
                }
                if is_main:
                    ckpt_io.export_backbone(teacher_bb, gram_snapshot_path(output_dir, done))
            stop = preempt is not None and D.any_rank(preempt.requested)
            if done % save_every == 0 or done == total or stop:
                last_ckpt = save(done)
                result.last_checkpoint = last_ckpt
            if stop:
                result.preempted = True
                if is_main:
                    print(f"[pretrain] {preempt.signal_name or 'signal'} received: checkpointed at iteration "
                          f"{done}", flush=True)
                    if D.in_slurm_job() and bool(cfg.train.get("requeue_on_preemption", True)):
                        D.requeue_slurm_job()
                break
        else:
            result.finished = True
        if result.finished:
            teacher_bb = {
                k[len("backbone."):]: v for k, v in model_state(meta, mode)["teacher"].items()
                if k.startswith("backbone.")
            }
            if is_main:
                result.teacher_backbone = ckpt_io.export_backbone(teacher_bb, output_dir / "teacher_backbone.pth")
                result.last_checkpoint = ckpt_io.latest_checkpoint(ckpt_dir)
                print(f"[pretrain] done: teacher backbone exported to {result.teacher_backbone}", flush=True)
            if result.last_checkpoint is None:
                result.last_checkpoint = ckpt_io.checkpoint_path(ckpt_dir, total)
            D.barrier()
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
