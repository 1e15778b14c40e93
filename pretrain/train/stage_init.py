"""How a stage starts: the initial weights of student and teacher, and the frozen Gram teacher.

- Stage 1 starts from a backbone file (``init.backbone`` / ``--init-from``: official DINOv3 ``.pth``, our export,
  any file :func:`pretrain.models.load_backbone` reads) or from seeded random weights.
- Stages 2-3 start from an earlier stage's checkpoint (``init.checkpoint``; ``init.mode`` = ``continue``:
  student <- student, teacher <- teacher, or ``from_teacher``: both <- teacher).
- The Gram teacher (stages 2-3, ``gram.teacher``) is a file, a stage-1 EMA-teacher snapshot, or the current EMA
  teacher, refreshed every ``gram.teacher.refresh_every`` iterations as DINOv3 does (:class:`GramRefresh`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from meddino_common.config import ConfigError
from pretrain.train import checkpointing as ckpt_io
from pretrain.train.meta_arch import SSLMetaArch, backbone_overrides

INIT_MODES = ("continue", "from_teacher")
GRAM_SOURCES = ("checkpoint", "stage1_iteration", "ema")


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

    model = load_backbone(str(path), arch=cfg.student.arch, **backbone_overrides(cfg.student))
    return model.state_dict()


def initialise_weights(meta: SSLMetaArch, cfg, init_from: str | None) -> None:
    """Stage start: random (seeded), a backbone file (``init.backbone`` / ``--init-from``), or an earlier stage's
    checkpoint (``init.checkpoint`` with ``init.mode``)."""
    init = cfg.init
    backbone_path = init_from or init.backbone
    if backbone_path and init.checkpoint:
        raise ConfigError("give either init.backbone (--init-from) or init.checkpoint, not both")
    if backbone_path:
        meta.load_backbone_weights(load_backbone_state(backbone_path, cfg), str(backbone_path))
        meta.sync_teacher_from_student()
    elif init.checkpoint:
        mode = str(init.mode)
        if mode not in INIT_MODES:
            raise ConfigError(f"init.mode must be one of {', '.join(INIT_MODES)}, got {mode!r}")
        state = ckpt_io.load_checkpoint(init.checkpoint)
        meta.student.load_state_dict(state["student" if mode == "continue" else "teacher"])
        meta.teacher.load_state_dict(state["teacher"])
    else:
        meta.sync_teacher_from_student()


def gram_snapshot_path(run_dir: str | Path, iteration: int) -> Path:
    """Where a stage writes its EMA-teacher snapshot of ``iteration`` (``checkpointing.teacher_snapshots``)."""
    return Path(run_dir) / "teacher_snapshots" / f"teacher_backbone_{iteration:08d}.pth"


def initialise_gram_teacher(meta: SSLMetaArch, cfg) -> None:
    """Load the frozen Gram teacher chosen by ``gram.teacher`` (see ``configs/pretrain/base.yaml``)."""
    if not meta.use_gram:
        return
    gt = cfg.gram.teacher
    source = gt.source
    if source == "checkpoint":
        if not gt.checkpoint:
            raise ConfigError("gram.teacher.source=checkpoint needs gram.teacher.checkpoint=PATH")
        meta.load_gram_teacher(load_backbone_state(gt.checkpoint, cfg), str(gt.checkpoint))
    elif source == "stage1_iteration":
        if not gt.run_dir:
            raise ConfigError("gram.teacher.source=stage1_iteration needs gram.teacher.run_dir (the stage-1 output dir)")
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
        raise ConfigError(f"gram.use_loss=true needs gram.teacher.source in ({', '.join(GRAM_SOURCES)}), "
                         f"got {source!r}")


@dataclass(frozen=True)
class GramRefresh:
    """DINOv3's repeated Gram-teacher update: every ``every`` iterations after ``start``, at most ``max_refreshes``
    times (``gram.teacher.refresh_*``; ``every`` <= 0: never)."""

    every: int
    start: int
    max_refreshes: int

    @classmethod
    def from_config(cls, cfg) -> "GramRefresh":
        gt = cfg.gram.teacher
        return cls(int(gt.refresh_every), int(gt.refresh_start), int(gt.max_refreshes))

    def due(self, iteration: int, refreshes_done: int) -> bool:
        if self.every <= 0 or refreshes_done >= self.max_refreshes:
            return False
        return iteration > self.start and (iteration - self.start) % self.every == 0
