"""Training checkpoints: atomic, full state, keep-last-K, auto-resume; teacher export in the official format.

A checkpoint is one file ``<output_dir>/checkpoints/checkpoint_<iteration:08d>.pth`` (``iteration`` = number of
completed iterations) holding::

    {"iteration": int, "student": {...}, "teacher": {...}, "gram_teacher": {...} | None,
     "optimizer": optimizer state, "loader": {"batches_consumed": int}, "rng": [per-rank RNG states],
     "gram": {"initialized": bool, "refreshes_done": int}, "config": resolved YAML text, "format": "meddinov3-ssl-1"}

``student`` / ``teacher`` keys are ``backbone.<official DINOv3 key>``, ``dino_head.*``, ``ibot_head.*`` (the layout
of DINOv3's own training checkpoints). Files are written to a temporary name and renamed, so a crash never leaves
a half-written checkpoint under the final name; everything is read back with ``weights_only=True``.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddino_common.atomic import atomic_write, atomic_write_text

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})\.pth$")
FORMAT = "meddinov3-ssl-1"
COMPLETE_NAME = "stage_complete.json"


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read or is not ours: one line naming the file."""


class CheckpointWriteError(OSError):
    """A checkpoint or export could not be written (disk full, no permission): one line naming the file."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def checkpoint_path(ckpt_dir: str | Path, iteration: int) -> Path:
    return Path(ckpt_dir) / f"checkpoint_{iteration:08d}.pth"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every complete checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`meddino_common.atomic.atomic_write` (temporary file, fsync, rename).

    An I/O error (``ENOSPC`` on a full disk, ``EACCES``, ...) leaves any previous file under ``path`` untouched and
    no temporary file, and is raised as one :class:`CheckpointWriteError` line naming the file and the cause."""
    path = Path(path)
    sink: _WriteErrorRecorder | None = None

    def write(f) -> None:
        nonlocal sink
        sink = _WriteErrorRecorder(f)
        torch.save(obj, sink)

    try:
        return atomic_write(path, write)
    except OSError as err:
        raise CheckpointWriteError(err.errno or errno.EIO, _write_error(path, err)) from err
    except RuntimeError as err:
        if sink is None or sink.error is None:
            raise
        # torch.save reports a failed write as "unexpected pos ...": name the OS error it swallowed
        raise CheckpointWriteError(sink.error.errno or errno.EIO, _write_error(path, sink.error)) from err


class _WriteErrorRecorder:
    """A writable file for ``torch.save`` that remembers the OS error of a failed ``write`` (torch replaces it by
    an opaque RuntimeError)."""

    def __init__(self, f) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._f.flush()


def _write_error(path: Path, err: BaseException) -> str:
    reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err).splitlines()[0]
    free = ""
    try:
        stat = os.statvfs(path.parent if path.parent.exists() else Path.cwd())
        free = f"; {stat.f_bavail * stat.f_frsize / 2**30:.2f} GiB free there"
    except OSError:
        pass
    return f"cannot write {path}: {reason}{free}. Nothing was lost: earlier checkpoints are intact; free space " \
           "or fix the folder, then resume with --resume auto"


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text write (config copy, completion record) with :func:`atomic_save`'s one-line error."""
    try:
        return atomic_write_text(path, text)
    except OSError as err:
        raise CheckpointWriteError(err.errno or errno.EIO, _write_error(Path(path), err)) from err


def write_completion(output_dir: str | Path, *, stage: str, iteration: int, final_checkpoint: Path,
                     teacher_backbone: Path) -> Path:
    """``<output_dir>/stage_complete.json``: written last, after the final checkpoint and the export, so its
    presence means the stage reached its last iteration. The next stage (``slurm/common.sh``,
    ``pretrain.pipeline``) continues only from the checkpoint it names."""
    record = {"stage": stage, "iteration": int(iteration), "final_checkpoint": str(Path(final_checkpoint).resolve()),
              "teacher_backbone": str(Path(teacher_backbone).resolve())}
    return write_text(Path(output_dir) / COMPLETE_NAME, json.dumps(record, indent=1) + "\n")


def read_completion(output_dir: str | Path) -> dict | None:
    """The completion record of a finished stage, or None when the stage has not completed."""
    path = Path(output_dir) / COMPLETE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable stage completion record ({err}); re-run that stage") from err
    if not Path(record.get("final_checkpoint", "")).is_file():
        raise FileNotFoundError(f"{path} names {record.get('final_checkpoint')!r}, which does not exist")
    return record


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted paths."""
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - max(1, int(keep_last)))]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    npd = state["numpy"]
    np.random.set_state(
        (npd["name"], npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"], npd["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuple(v) for v in x)
    return x


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (``weights_only=True``) with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointReadError(f"cannot read checkpoint {path}: {str(err).splitlines()[0] if str(err) else err!r}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointReadError(f"{path} is not a pretrain.train checkpoint (format {FORMAT!r} expected)")
    return state


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``resume``: None/``"none"`` -> no resume; ``"auto"`` -> newest checkpoint in ``output_dir/checkpoints``
    (None when there is none yet: a fresh start); anything else -> that file (must exist)."""
    if resume in (None, "", "none", "no", "false"):
        return None
    if resume == "auto":
        return latest_checkpoint(Path(output_dir) / "checkpoints")
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def teacher_backbone_state(ckpt: dict) -> dict:
    """Flat official-layout backbone state dict of the EMA teacher in a loaded checkpoint."""
    return strip_prefix(ckpt["teacher"], "backbone.")


def export_backbone(state_dict: dict, path: str | Path) -> Path:
    """Write a flat backbone state dict (official DINOv3 ``.pth`` layout, CPU fp32 tensors) atomically."""
    flat = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    return atomic_save(flat, path)


# ---------------------------------------------------------------------------------------------- model / optimizer state
# ``meta`` is a pretrain.train.meta_arch.SSLMetaArch; under FSDP2 these calls are collective.
def model_state(meta, mode: str) -> dict[str, dict | None]:
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


def load_model_state(meta, states: dict, mode: str, source: str) -> None:
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


def optimizer_state(meta, optimizer: torch.optim.Optimizer, mode: str) -> dict:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: PLC0415

        return get_optimizer_state_dict(
            meta.student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(meta, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415

        set_optimizer_state_dict(meta.student, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- the training state
def save_training_state(path: Path, meta, optimizer: torch.optim.Optimizer, mode: str, comm, *, iteration: int,
                        batches_consumed: int, plan: dict, world_size: int, config_yaml: str, is_main: bool) -> Path:
    """One full checkpoint (layout in the module docstring). Collective: every rank calls it (FSDP2 gathers the
    state, every rank contributes its RNG streams); rank 0 writes."""
    states = model_state(meta, mode)
    opt_state = optimizer_state(meta, optimizer, mode)
    rngs = comm.gather_objects(rng_state())
    if is_main:
        atomic_save({"format": FORMAT, "iteration": iteration, **states, "optimizer": opt_state,
                     "loader": {"batches_consumed": batches_consumed, "world_size": world_size}, "plan": plan,
                     "rng": rngs, "gram": {"initialized": meta.gram_teacher_initialized,
                                           "refreshes_done": meta.gram_refreshes_done},
                     "config": config_yaml}, path)
    return path


def restore_training_state(path: Path, meta, optimizer: torch.optim.Optimizer, mode: str, rank: int,
                           world_size: int) -> int:
    """Load model, optimizer, Gram-teacher status and this rank's RNG streams from ``path``; returns the iteration
    to continue from. A different world size re-seeds nothing and keeps the current streams (said once)."""
    state = load_checkpoint(path)
    load_model_state(meta, state, mode, str(path))
    load_optimizer_state(meta, optimizer, state["optimizer"], mode)
    gram = state["gram"]
    meta.gram_teacher_initialized = bool(gram["initialized"])
    meta.gram_refreshes_done = int(gram["refreshes_done"])
    rngs = state["rng"]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    elif rank == 0:
        print(f"[pretrain] world size changed ({len(rngs)} -> {world_size}): RNG streams not restored", flush=True)
    return int(state["iteration"])
